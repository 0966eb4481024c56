"""Majority vote, best-of-N and the early-stopping rule of adaptive N, on constructed cases."""
from __future__ import annotations

import itertools

import pytest

from ryzen_plugin_rlvr.multipath import _select
from ryzen_plugin_rlvr.selection import best_of_n, majority_vote, vote_decided
from ryzen_plugin_rlvr.tasks import ArithmeticTask, CountdownTask, Problem


def test_majority_vote_counts_parsed_answers_and_ignores_unparsable_ones():
    assert majority_vote([7, None, 3, 7, None, None, 3, 7]) == (7, 3)
    assert majority_vote([None, None]) == (None, 0)
    assert majority_vote([]) == (None, 0)


def test_majority_vote_ties_go_to_the_answer_seen_first():
    assert majority_vote([4, 9, 9, 4]) == (4, 2)
    assert majority_vote([None, 9, 4, 4, 9]) == (9, 2)


def test_best_of_n_picks_the_first_highest_reward():
    assert best_of_n([0.0, 0.5, 1.0, 1.0]) == 2
    assert best_of_n([0.0, 0.0]) == 0
    with pytest.raises(ValueError):
        best_of_n([])


@pytest.mark.parametrize("seen", [
    [], [1], [1, 1], [1, 2], [1, 1, 2], [2, 1, 1], [1, None, 1], [1, 2, 3], [1, 1, 1, 2], [2, 2, 1, 1, 1],
    [None, None], [3, 1, 1, 3], [1, 1, 1, 1],
])
@pytest.mark.parametrize("remaining", [0, 1, 2, 3, 4])
def test_vote_decided_exactly_when_no_continuation_changes_the_winner(seen, remaining):
    # Brute force: every way the remaining votes could fall (known answers, a new one, or unparsable).
    winner = majority_vote(seen)[0]
    alphabet = [1, 2, 3, 99, None]
    unchanged = all(majority_vote(seen + list(rest))[0] == winner
                    for rest in itertools.product(alphabet, repeat=remaining))
    assert vote_decided(seen, remaining) == unchanged


def test_select_majority_picks_the_path_of_the_most_common_answer():
    task = ArithmeticTask(digits=2, terms=2, chain=False)
    problem = Problem("12+30=", 42, "42", (12, 30))
    completions = ["41", "42", "x", "42", "43", "41", "42"]
    answer, index = _select(task, problem, completions, [task.parse(c) for c in completions], None, "majority")
    assert (answer, index) == (42, 1)


def test_select_best_of_n_trusts_the_verifier_over_the_crowd():
    task = CountdownTask()
    problem = Problem("05 09 16->224:", 224, "(5+9)*16", (5, 9, 16))
    completions = ["5+9+16", "5+9+16", "(5+9)*16", "5+9+16", "16*14"]
    rewards = [task.reward(problem, c) for c in completions]
    answer, index = _select(task, problem, completions, [task.parse(c) for c in completions], rewards, "best_of_n")
    assert (answer, index) == ("(5+9)*16", 2)
    # The vote would have chosen the wrong, most common expression.
    assert _select(task, problem, completions, [task.parse(c) for c in completions], None, "majority")[1] == 0


def test_select_best_of_n_falls_back_to_the_vote_when_nothing_verifies():
    task = CountdownTask()
    problem = Problem("05 09 16->224:", 224, "(5+9)*16", (5, 9, 16))
    completions = ["5+9", "5+16", "5+16"]
    rewards = [task.reward(problem, c) for c in completions]
    assert _select(task, problem, completions, [task.parse(c) for c in completions], rewards, "best_of_n") == ("5+16", 1)
