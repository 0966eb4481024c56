"""Tasks and verifiers: right answers rewarded; wrong, malformed and hostile ones not; nothing executed."""
from __future__ import annotations

import ast
import builtins
import subprocess
import sys
import textwrap

import pytest

from ryzen_plugin_rlvr.tasks import (ArithmeticTask, CountdownTask, Problem, available_tasks,
                                     evaluate_expression, get_task)


@pytest.fixture
def no_eval(monkeypatch):
    """Any eval/exec, or compiling to code rather than to a syntax tree, fails the test."""
    real_compile = builtins.compile

    def forbidden(*args, **kwargs):
        raise AssertionError("a verifier executed model output")

    def ast_only_compile(source, filename, mode, flags=0, *args, **kwargs):
        if not flags & ast.PyCF_ONLY_AST:
            raise AssertionError("a verifier compiled model output to code")
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    monkeypatch.setattr(builtins, "compile", ast_only_compile)


def test_arithmetic_problems_are_seeded_split_apart_and_equal_length():
    task = ArithmeticTask(digits=2, terms=3)
    a = task.problems(50, seed=3, split="train")
    assert a == task.problems(50, seed=3, split="train")
    assert a != task.problems(50, seed=4, split="train")
    test = task.problems(50, seed=3, split="test")
    assert [p.prompt for p in test] != [p.prompt for p in a]  # held-out problems have their own stream
    assert len({len(p.prompt) for p in a + test}) == 1  # zero-padded: one prompt length
    for p in a:
        values = [int(x) for x in p.prompt.rstrip("=").split("+")]
        assert p.target == sum(values)
        assert task.reward(p, p.solution) == 1.0


def test_arithmetic_chain_solutions_use_varied_orders():
    task = ArithmeticTask(digits=2, terms=3)
    first_positions = [p.numbers.index(int(p.solution.split("+")[0])) for p in task.problems(300, seed=0)]
    # Every term comes first about a third of the time: otherwise sampling has no paths to vary.
    assert all(70 < first_positions.count(i) < 130 for i in range(3))


@pytest.mark.parametrize("completion,reward", [
    ("28+30=58,58+5=63", 1.0),
    ("28+30=58,58+5=63<|endoftext|>junk", 1.0),
    ("28+30=58,58+5=64", 0.0),            # wrong answer
    ("63", 0.0),                          # direct answer where a chain is expected: malformed
    ("28+30=58,58+5=63abc", 0.0),         # trailing garbage
    ("28+30=58,,58+5=63", 0.0),
    ("28+30=58,58+5=", 0.0),
    ("", 0.0),
    ("=63", 0.0),
    ("28+30=58,58+5=٦٣", 0.0),            # non-ASCII digits are not an answer
    ("28+30=58,58+5=6.3e1", 0.0),
])
def test_arithmetic_chain_verifier(completion, reward):
    task = ArithmeticTask(digits=2, terms=3)
    problem = Problem("30+28+05=", 63, "28+30=58,58+5=63", (30, 28, 5))
    assert task.reward(problem, completion) == reward


@pytest.mark.parametrize("completion,reward", [
    ("-224", 1.0), (" -224 ", 1.0), ("-224<|endoftext|>", 1.0), ("224", 0.0), ("-2 24", 0.0), ("-224x", 0.0),
    ("--224", 0.0), ("", 0.0), ("-224.0", 0.0),
])
def test_arithmetic_direct_verifier(completion, reward):
    task = ArithmeticTask(digits=3, terms=2, ops="+-", chain=False)
    problem = Problem("041-265=", -224, "-224", (41, 265))
    assert task.reward(problem, completion) == reward


def test_arithmetic_rejects_bad_options():
    with pytest.raises(ValueError):
        ArithmeticTask(terms=3, ops="*")
    with pytest.raises(ValueError):
        ArithmeticTask(ops="/")
    with pytest.raises(ValueError):
        ArithmeticTask(digits=0)


def test_countdown_problems_are_solvable_and_their_prompts_parse():
    task = CountdownTask()
    for p in task.problems(100, seed=0, split="test"):
        assert task.reward(p, p.solution) == 1.0
        parsed = task.problem_from_prompt(p.prompt)
        assert parsed.target == p.target and parsed.numbers == p.numbers
    assert len({len(p.prompt) for p in task.problems(100, seed=0)}) == 1


COUNTDOWN = Problem("05 09 16->224:", 224, "(5+9)*16", (5, 9, 16))


@pytest.mark.parametrize("completion,reward", [
    ("(5+9)*16", 1.0),
    ("16*(9+5)", 1.0),
    (" ( 5 + 9 ) * 16 <|endoftext|>", 1.0),
    ("16*14", 0.0),                      # 14 was not given
    ("(5+9)*16+5-5", 0.0),               # 5 used three times
    ("5+9+16", 0.0),                     # wrong value
    ("224", 0.0),                        # not given
    ("(5+9)*16)", 0.0),                  # syntax error
    ("", 0.0),
])
def test_countdown_verifier(completion, reward, no_eval):
    assert CountdownTask().reward(COUNTDOWN, completion) == reward


@pytest.mark.parametrize("hostile", [
    "__import__('os').system('echo pwned')",
    "().__class__.__bases__[0].__subclasses__()",
    "9**9**9**9",
    "16**2-32",
    "(lambda: 224)()",
    "True*224",
    "224.0",
    "1e3",
    "-5+9*16",                           # unary minus is not an allowed operation
    "[5,9,16]",
    "'5'*16",
    "x",
    "5 if 9 else 16",
    "(" * 40 + "5" + ")" * 40,           # too long
    "5" * 70,                            # too long
    "16/(9-9)",                          # division by zero
    "16 and 9",
    "~5",
    "5\n+9",
])
def test_countdown_verifier_rejects_hostile_expressions_without_executing_them(hostile, no_eval):
    assert CountdownTask().reward(COUNTDOWN, hostile) == 0.0


def test_evaluate_expression_is_exact():
    from fractions import Fraction

    assert evaluate_expression("7/3*3") == 7
    assert evaluate_expression("1/3") == Fraction(1, 3)
    with pytest.raises(ValueError):
        evaluate_expression("2**3")
    with pytest.raises(ValueError):
        evaluate_expression("1/0")


def test_a_task_named_module_colon_class_is_imported_without_packaging(tmp_path, monkeypatch):
    (tmp_path / "my_echo_task.py").write_text(textwrap.dedent('''
        from ryzen_plugin_rlvr.tasks import Problem, Task

        class EchoTask(Task):
            name = "echo"
            max_new_tokens = 8

            def problems(self, n, seed=0, split="train"):
                return [Problem(f"say {w}:", w, w) for w in ["cat", "dog", "owl"][:n]]

            def parse(self, completion):
                return completion.split("<|endoftext|>")[0].strip() or None

            def reward(self, problem, completion):
                return float(self.parse(completion) == problem.target)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        task = get_task("my_echo_task:EchoTask")
        assert task.reward(task.problems(1)[0], "cat") == 1.0
        with pytest.raises(ValueError, match="'my_echo_task:NoSuchTask' cannot be imported"):
            get_task("my_echo_task:NoSuchTask")
        with pytest.raises(ValueError, match="'no_such_module:EchoTask' cannot be imported"):
            get_task("no_such_module:EchoTask")
    finally:
        sys.modules.pop("my_echo_task", None)


def test_tasks_from_installed_packages_are_found_through_the_entry_point(tmp_path, monkeypatch):
    (tmp_path / "third_party_task.py").write_text(textwrap.dedent('''
        from ryzen_plugin_rlvr.tasks import Problem, Task

        class ParityTask(Task):
            name = "parity"
            max_new_tokens = 2

            def __init__(self, width=4):
                self.width = width

            def problems(self, n, seed=0, split="train"):
                return [Problem(f"{i:0{self.width}b}?", i % 2, str(i % 2)) for i in range(n)]

            def parse(self, completion):
                text = completion.split("<|endoftext|>")[0].strip()
                return int(text) if text in ("0", "1") else None

            def reward(self, problem, completion):
                return float(self.parse(completion) == problem.target)
    '''))
    info = tmp_path / "third_party_task-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party-task\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ryzen_rlvr.tasks]\nparity = third_party_task:ParityTask\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "parity" in available_tasks()
    task = get_task("parity", width=3)
    problem = task.problems(6)[5]
    assert problem.prompt == "101?" and task.reward(problem, "1") == 1.0 and task.reward(problem, "x") == 0.0
    sys.modules.pop("third_party_task", None)


def test_unknown_task_names_the_available_ones():
    with pytest.raises(ValueError, match="arithmetic"):
        get_task("no-such-task")


def test_arithmetic_diagnose_tells_operand_from_arithmetic_errors():
    task = ArithmeticTask(digits=2, terms=3)
    problem = Problem("30+28+05=", 63, "28+30=58,58+5=63", (30, 28, 5))
    assert task.diagnose(problem, "28+30=58,58+5=63") == "right"
    assert task.diagnose(problem, "28+36=64,64+5=69") == "operand"      # 36 is not in the prompt
    assert task.diagnose(problem, "28+30=58,58+5=64") == "arithmetic"   # right terms, wrong sum
    assert task.diagnose(problem, "28+30=58,58+5") == "malformed"


def test_arithmetic_diagnose_is_bounded_on_long_output():
    # Before the bound, 10 MB of digits took hours (a quadratic search); the guard only catches a hang.
    script = ("from ryzen_plugin_rlvr.tasks import ArithmeticTask, Problem\n"
              "task = ArithmeticTask(digits=2, terms=3)\n"
              "problem = Problem('30+28+05=', 63, '', (30, 28, 5))\n"
              "print(task.diagnose(problem, '1' * 10_000_000), task.diagnose(problem, '28+30=58,' * 200_000))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1800)
    assert result.stdout.split() == ["malformed", "malformed"], result.stderr


@pytest.mark.parametrize("expression, value", [
    ("0x2d", None), ("1_5*3", None), ("1e3", None), ("1.5*2", None), ("15*3", 45), ("15*03", 45), ("(03+07)*2", 20),
])
def test_countdown_reads_plain_decimal_literals_only(expression, value):
    if value is None:
        with pytest.raises(ValueError, match="only decimal integers"):
            evaluate_expression(expression)
    else:
        assert evaluate_expression(expression) == value
    task = CountdownTask()
    problem = Problem("03 15 07->045:", 45, "", (3, 15, 7))
    assert task.reward(problem, expression) == (1.0 if value == 45 else 0.0)
