"""Multi-path generation: batched equals alone, sampled paths reproducible from their seeds, and
the solver's N-prefix and adaptive-N guarantees."""
from __future__ import annotations

import pytest
import torch

from ryzen_core import TorchBackend, filter_logits, generate, train_tokenizer
from ryzen_plugin_rlvr.multipath import SolveConfig, multipath_generate, solve
from ryzen_plugin_rlvr.sampling import TaskCodec, generate_paths, path_seed, sample_rows
from ryzen_plugin_rlvr.tasks import ArithmeticTask


def _prompts(codec, n=4):
    return [codec.prompt_ids(p.prompt) for p in ArithmeticTask(digits=2, terms=3).problems(n, seed=5)]


def test_codec_encodes_one_character_per_token_even_with_a_merging_bpe(tmp_path):
    bpe = train_tokenizer(["123 456 789 12 23 34 45 56 67 78 89 " * 50], 300, tmp_path)
    assert len(bpe.encode("123456")) < 6  # this tokenizer merges digits...
    codec = TaskCodec(bpe)
    assert len(codec.encode("123456")) == 6  # ...task text does not meet the merges
    ids = codec.completion_ids("579")
    assert ids[-1] == bpe.eos_id and codec.decode(ids + [7, 7]) == "579"
    assert codec.prompt_ids("1+2=")[0] == bpe.eos_id


def test_batched_greedy_paths_equal_each_prompt_alone_and_the_core_loop(tiny_model, char_tokenizer):
    codec = TaskCodec(char_tokenizer)
    prompts = _prompts(codec)
    batched = generate_paths(tiny_model, prompts, 1, 12, eos_id=None, temperature=0.0)
    for i, prompt in enumerate(prompts):
        alone = generate_paths(tiny_model, [prompt], 1, 12, eos_id=None, temperature=0.0)
        assert torch.equal(batched.tokens[i], alone.tokens[0])
        core = generate(tiny_model, torch.tensor([prompt]), 12, temperature=0.0)
        assert core[0, len(prompt):].tolist() == alone.tokens[0].tolist()


def test_sampled_paths_are_reproducible_from_their_seeds_whatever_the_batch(tiny_model, char_tokenizer):
    codec = TaskCodec(char_tokenizer)
    prompts = _prompts(codec, 3)
    seeds = [[path_seed(7, i, k) for k in range(4)] for i in range(3)]
    kwargs = dict(eos_id=codec.eos_id, temperature=1.0, top_p=0.9)
    batched = generate_paths(tiny_model, prompts, 4, 10, seeds=seeds, **kwargs)
    again = generate_paths(tiny_model, prompts, 4, 10, seeds=seeds, **kwargs)
    assert torch.equal(batched.tokens, again.tokens)
    rows = []
    for i, prompt in enumerate(prompts):
        for k in range(4):
            alone = generate_paths(tiny_model, [prompt], 1, 10, seeds=[[seeds[i][k]]], **kwargs)
            n = int(alone.lengths[0])
            assert batched.tokens[i * 4 + k, :n].tolist() == alone.tokens[0, :n].tolist()
            assert int(batched.lengths[i * 4 + k]) == n
            rows.append(tuple(alone.tokens[0, :n].tolist()))
    assert len(set(rows)) > 3, "different seeds should give different paths"


def test_shared_prefill_equals_repeating_the_prompt(tiny_model, char_tokenizer):
    codec = TaskCodec(char_tokenizer)
    prompt = _prompts(codec, 1)[0]
    seeds = [path_seed(1, 0, k) for k in range(6)]
    shared = generate_paths(tiny_model, [prompt], 6, 10, eos_id=None, temperature=0.8, seeds=[seeds])
    repeated = generate_paths(tiny_model, [prompt] * 6, 1, 10, eos_id=None, temperature=0.8,
                              seeds=[[s] for s in seeds])
    assert torch.equal(shared.tokens, repeated.tokens)


def test_paths_stop_at_end_of_text_and_pad_with_it(tiny_model, char_tokenizer):
    codec = TaskCodec(char_tokenizer)
    prompts = _prompts(codec, 2)
    eos = int(generate_paths(tiny_model, prompts, 1, 1, eos_id=None, temperature=0.0).tokens[0, 0])
    # Declare the first greedy token of prompt 0 to be end-of-text: that path must stop at once.
    paths = generate_paths(tiny_model, prompts, 1, 8, eos_id=eos, temperature=0.0)
    assert int(paths.lengths[0]) == 1
    assert (paths.tokens[0] == eos).all()


def test_gumbel_sampling_follows_the_distribution_and_respects_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generators = [torch.Generator().manual_seed(s) for s in range(4000)]
    draws = torch.cat([sample_rows(logits, 1.0, 1.0, [g]) for g in generators])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    nucleus = torch.cat([sample_rows(logits, 1.0, 0.7, [g]) for g in generators[:500]])
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is cut
    assert torch.isinf(filter_logits(logits, 1.0, top_p=0.7)[0, 2:]).all()
    assert sample_rows(logits, 0.0, 1.0, None).item() == 0


def test_solve_small_n_sees_the_first_paths_of_large_n(tiny_model, char_tokenizer):
    codec, task = TaskCodec(char_tokenizer), ArithmeticTask(digits=2, terms=3)
    problems = task.problems(5, seed=2)
    big = solve(tiny_model, codec, task, problems, SolveConfig(paths=8, temperature=1.0, top_p=1.0, seed=3))
    small = solve(tiny_model, codec, task, problems, SolveConfig(paths=2, temperature=1.0, top_p=1.0, seed=3))
    for b, s in zip(big, small):
        assert s.completions == b.completions[:2]
        assert b.paths_used == 8 and s.paths_used == 2


def test_adaptive_n_gives_the_full_n_answer_with_fewer_paths(char_tokenizer, monkeypatch):
    # Scripted paths: the answer of path k of problem i, whoever generates it and in whichever round.
    import ryzen_plugin_rlvr.multipath as multipath
    from ryzen_plugin_rlvr.sampling import Paths

    codec, task = TaskCodec(char_tokenizer), ArithmeticTask(digits=2, terms=2, chain=False)
    script = {0: "77777777", 1: "57555555", 2: "12121212", 3: "xx333333"}
    answer_of = {path_seed(1, i, k): text[k] for i, text in script.items() for k in range(8)}

    def scripted(model, prompts, n, max_new_tokens, *, eos_id, seeds, **kwargs):
        rows = [codec.encode(answer_of[s]) + [eos_id] for row in seeds for s in row]
        return Paths(torch.tensor(rows), torch.tensor([len(r) for r in rows]), n)

    monkeypatch.setattr(multipath, "generate_paths", scripted)
    problems = task.problems(4, seed=0)
    full = solve(None, codec, task, problems, SolveConfig(paths=8, temperature=1.0, seed=1))
    adaptive = solve(None, codec, task, problems, SolveConfig(paths=8, temperature=1.0, seed=1, adaptive=True,
                                                              round_size=2))
    assert [s.answer for s in full] == [7, 5, 1, 3]
    assert [s.answer for s in adaptive] == [7, 5, 1, 3]
    # Unanimous after 4 (4 more cannot beat 4, and a tie goes to the first seen); decided after 6;
    # never decided before the end; 'x' casts no vote, so 3 leads 4-0 after 6 paths.
    assert [s.paths_used for s in adaptive] == [4, 6, 8, 6]
    for a, f in zip(adaptive, full):
        assert a.completions == f.completions[: a.paths_used]


def test_on_infer_wrapper_returns_one_selected_path_per_row(tiny_model, char_tokenizer):
    backend = TorchBackend(tiny_model)
    task = ArithmeticTask(digits=2, terms=3)
    wrapped = multipath_generate(backend.plain_generate, tiny_model, char_tokenizer, task, paths=4,
                                 temperature=1.0, top_p=1.0)
    prompts = torch.tensor(_prompts(TaskCodec(char_tokenizer), 3))
    steps = []
    out = wrapped(prompts, 6, temperature=0.0, eos_token_id=None, on_token=steps.append,
                  generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, prompts.shape[1] + 6)
    assert torch.equal(out[:, : prompts.shape[1]], prompts)
    assert steps == list(range(6))  # one decoding loop for all rows and paths: timeable per token
    again = wrapped(prompts, 6, eos_token_id=None, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_on_infer_wrapper_composes_with_another_plugins_generate(tiny_model, char_tokenizer):
    calls = []

    def other_generate(input_ids, max_new_tokens, **sampling):
        calls.append(input_ids.shape[0])
        return generate(tiny_model, input_ids, max_new_tokens, temperature=sampling["temperature"],
                        generator=sampling.get("generator"))

    task = ArithmeticTask(digits=2, terms=3)
    wrapped = multipath_generate(other_generate, tiny_model, char_tokenizer, task, paths=4, temperature=1.0,
                                 top_p=1.0)
    prompts = torch.tensor(_prompts(TaskCodec(char_tokenizer), 2))
    out = wrapped(prompts, 5, generator=torch.Generator().manual_seed(0))
    assert calls == [8] and out.shape == (2, prompts.shape[1] + 5)


def test_generate_paths_rejects_mixed_prompt_lengths_and_missing_seeds(tiny_model):
    with pytest.raises(ValueError, match="one non-zero length"):
        generate_paths(tiny_model, [[1, 2], [1, 2, 3]], 1, 3, eos_id=None, temperature=0.0)
    with pytest.raises(ValueError, match="seeds"):
        generate_paths(tiny_model, [[1, 2]], 2, 3, eos_id=None, temperature=1.0)
    with pytest.raises(ValueError, match="context"):
        generate_paths(tiny_model, [[1, 2]], 1, 100, eos_id=None, temperature=0.0)


def test_adaptive_best_of_n_keeps_sampling_until_a_path_verifies(char_tokenizer, monkeypatch):
    import ryzen_plugin_rlvr.multipath as multipath
    from ryzen_plugin_rlvr.sampling import Paths
    from ryzen_plugin_rlvr.tasks import CountdownTask

    codec, task = TaskCodec(char_tokenizer), CountdownTask()
    problems = task.problems(2, seed=0)
    # Problem 0: four identical wrong paths (a decided vote), then its solution; problem 1: solved at once.
    script = {0: ["1+1"] * 4 + [problems[0].solution] + ["1+1"] * 3, 1: [problems[1].solution] + ["1"] * 7}
    text_of = {path_seed(1, i, k): paths[k] for i, paths in script.items() for k in range(8)}

    def scripted(model, prompts, n, max_new_tokens, *, eos_id, seeds, **kwargs):
        rows = [codec.encode(text_of[s]) + [eos_id] for row in seeds for s in row]
        width = max(len(r) for r in rows)
        tokens = torch.tensor([r + [eos_id] * (width - len(r)) for r in rows])
        return Paths(tokens, torch.tensor([len(r) for r in rows]), n)

    monkeypatch.setattr(multipath, "generate_paths", scripted)
    config = dict(paths=8, temperature=1.0, seed=1, selection="best_of_n")
    full = solve(None, codec, task, problems, SolveConfig(**config))
    adaptive = solve(None, codec, task, problems, SolveConfig(**config, adaptive=True, round_size=4))
    assert [s.completion for s in full] == [s.completion for s in adaptive] == [p.solution for p in problems]
    assert [s.paths_used for s in adaptive] == [8, 4]
