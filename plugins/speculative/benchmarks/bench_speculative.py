"""Speculative decoding against plain decoding on a trained run's model, batch 1, greedy.

Two kinds of prompt, both from the held-out (test) split of the run's own data, Python stdlib code:
- input-grounded: `--grounded-prompt` tokens of a file, continued for `--new-tokens` (code repeats its
  own names and lines, so prompt lookup finds drafts);
- open-ended: the first `--open-prompt` tokens of a row, continued as far (little to copy from).

For each prompt kind and drafter (prompt lookup; with `--draft-run`, the draft model alone and prompt
lookup then the draft model, the plugin's `drafter: auto`): whether the outputs are token-identical to
plain greedy (ryzen_core.generate), the acceptance figures, and the decode tokens/s ratio, measured plain
and speculative interleaved (paired ratios, 95% bootstrap interval).

Speculative generation goes through the plugin (`on_infer`), one plugin instance per prompt kind and
drafter serving the identity pass and every timed round, as one variant's plugin serves a run's
validation: the draft model's cost is measured when it loads (or `--draft-cost`), and its schedule
carries over from one generation to the next. `--fresh-schedule` makes a new plugin for every
generation instead: what the first generation of a run sees. The acceptance figures count every
generation (identity pass and timed rounds). The load average is printed before and after.

With `--draft-run`, also:
- `--bf16`: the share of prompts whose speculative output in bf16 (target and draft cast to bf16) differs
  from plain bf16 greedy decoding (one verification forward over k+1 tokens does not round like k+1
  one-token forwards);
- `--crossover`: where a draft model of this size starts to pay. A target's one-token cached step, its
  verification forwards over k+1 tokens and the draft's one-token step are timed round-robin, on the
  trained target and on untrained built-in targets of growing size (timing does not depend on the
  weights). With drafts kept independently with probability a, a verification of k drafts yields
  (1 - a^(k+1)) / (1 - a) tokens for k draft steps and one verification forward (Leviathan et al.
  2023); the table gives, per target, the acceptance rate a at which the best k breaks even and reaches
  1.5x, and the expected speed-up at a = 0.8.

Usage:

    .venv/bin/python plugins/speculative/benchmarks/bench_speculative.py RUN_DIR [--draft-run DRAFT_RUN]
        [--prompts 8] [--threads 2] [--draft-cost C] [--fresh-schedule] [--bf16] [--crossover]

RUN_DIR and DRAFT_RUN are `ryzen run` or `ryzen train` directories (or one variant's). Prints markdown tables.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ryzen_core import (ConfigError, Transformer, TransformerConfig, compare_pairs, format_ratio, generate,
                        load_config, load_data, load_trained_model, markdown_table, model_outputs)
from ryzen_plugin_speculative import SpeculationStats, SpeculativeSettings
from ryzen_plugin_speculative.draft_run import check_run_directory, load_draft_model
from ryzen_plugin_speculative.kv_cache import crop_cache
from ryzen_plugin_speculative.plugin import SpeculativePlugin

DRAFT_LENGTHS = (1, 2, 4, 6, 8)  # fixed draft lengths the crossover estimate chooses from
HEADERS = ["prompts", "drafter", "tokens (prompt + new)", "identical to plain greedy", "acceptance rate",
           "mean accepted length", "target forwards per token", "draft forwards per token",
           "draft step / target step", "decode tok/s vs plain [95%]"]


def prompt_sets(run_dir: Path, args) -> dict[str, list[torch.Tensor]]:
    config_file = next(p for p in (run_dir / "config.json", run_dir.parent / "config.json") if p.is_file())
    test = load_data(load_config(config_file)).test
    rows = test[:: max(1, len(test) // args.prompts)][:args.prompts]
    return {"input-grounded": [row[None, :args.grounded_prompt] for row in rows],
            "open-ended": [row[None, :args.open_prompt] for row in rows]}


DRAFTERS = {"prompt lookup": "lookup", "draft model": "model", "lookup, then model": "auto"}


def speculative_plugin(model, tokenizer, args, drafter: str) -> tuple[Callable, SpeculativePlugin]:
    """The plugin's speculative generate for `model` (`drafter` a `speculative.drafter` value) and the plugin."""
    draft_run = None if drafter == "lookup" else args.draft_run
    settings = SpeculativeSettings(drafter=drafter, draft_run=draft_run,
                                   draft_cost=args.draft_cost if draft_run is not None else None)
    plugin = SpeculativePlugin(settings)
    generate_fn = plugin.on_infer(generate=None, model=model, tokenizer=tokenizer, record=lambda *a, **k: None)
    if generate_fn is None:
        raise SystemExit(f"error: the speculative plugin stepped aside for drafter {drafter}")
    return generate_fn, plugin


def drafter_names(args) -> dict[str, str]:
    return {name: value for name, value in DRAFTERS.items() if value == "lookup" or args.draft_run is not None}


def decode_rate(fn, prompt: torch.Tensor, new_tokens: int) -> float:
    """New tokens per second after the first (what report.md's decode tok/s measures)."""
    stamps: list[float] = []
    fn(prompt, new_tokens, on_token=lambda i: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def measure(model, tokenizer, prompts: list[torch.Tensor], args, drafter: str) -> list[str]:
    spec, plugin = speculative_plugin(model, tokenizer, args, drafter)
    totals, costs = SpeculationStats(), [plugin.draft_cost]

    def speculative(prompt, new_tokens, **sampling):
        nonlocal spec, plugin
        if args.fresh_schedule:
            totals.add(plugin.totals)
            spec, plugin = speculative_plugin(model, tokenizer, args, drafter)
            costs.append(plugin.draft_cost)
        return spec(prompt, new_tokens, **sampling)

    identical = sum(torch.equal(generate(model, p, args.new_tokens), speculative(p, args.new_tokens)) for p in prompts)
    plain = lambda p, n, **kw: generate(model, p, n, **kw)  # noqa: E731
    plain_rates, spec_rates = [], []
    for _ in range(args.rounds):
        for prompt in prompts:  # interleaved: each pair ran under the same machine conditions
            plain_rates.append(decode_rate(plain, prompt, args.new_tokens))
            spec_rates.append(decode_rate(speculative, prompt, args.new_tokens))
    totals.add(plugin.totals)
    summary = totals.summary()
    return [f"{identical}/{len(prompts)}", f"{summary['acceptance_rate'] or 0:.2f}",
            f"{summary['mean_accepted_length'] or 0:.2f}", f"{summary['target_forwards_per_token']:.2f}",
            f"{totals.draft_forwards / totals.tokens:.2f}",
            f"{statistics.median(costs):.2f}" if drafter != "lookup" else "-",
            format_ratio(compare_pairs(plain_rates, spec_rates, higher_is_better=True))]


def bf16_divergence(model, tokenizer, prompts: list[torch.Tensor], args) -> list[list[str]]:
    """Per drafter: prompts whose speculative bf16 greedy output differs from plain bf16 greedy (the plugin
    casts the draft model to the target's dtype)."""
    target16 = model.to(torch.bfloat16)
    try:
        rows = []
        for name, drafter in drafter_names(args).items():
            spec, _ = speculative_plugin(target16, tokenizer, args, drafter)
            differ = sum(not torch.equal(generate(target16, p, args.new_tokens), spec(p, args.new_tokens))
                         for p in prompts)
            rows.append([name, f"{differ}/{len(prompts)}"])
        return rows
    finally:
        model.float()


def prepared_forward(model, context: int, tokens: int):
    """A call of one cached forward over `tokens` new tokens after `context` cached ones, batch 1; the cache is
    cropped back after each call (a transformers cache grows in place)."""
    vocab = model.config.vocab_size
    step = torch.randint(0, vocab, (1, tokens))
    _, cache = model_outputs(model, torch.randint(0, vocab, (1, context)))

    def call():
        _, grown = model_outputs(model, step, cache)
        crop_cache(grown, context)

    return call


@torch.inference_mode()
def forward_costs(target, draft, context: int, rounds: int = 9) -> dict:
    """Median seconds of a target one-token step ("step"), a target verification over k+1 tokens (k), and a
    draft one-token step ("draft"), timed round-robin so that every figure saw the same machine."""
    calls = {"step": prepared_forward(target, context, 1), "draft": prepared_forward(draft, context, 1),
             **{k: prepared_forward(target, context, k + 1) for k in DRAFT_LENGTHS}}
    times = {name: [] for name in calls}
    for round_ in range(rounds + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def speedup(costs: dict, alpha: float) -> float:
    """Expected plain step time over speculative time per token with drafts kept independently with
    probability alpha (Leviathan et al. 2023), for the best fixed draft length."""
    best = 0.0
    for k in DRAFT_LENGTHS:
        tokens = (1 - alpha ** (k + 1)) / (1 - alpha)  # per verification: kept drafts + the target's token
        best = max(best, tokens * costs["step"] / (k * costs["draft"] + costs[k]))
    return best


def crossover(model, draft, context: int) -> list[list[str]]:
    """Per target size: the draft's and a verification's cost in target steps (timed), and the acceptance rate
    a draft of this size needs to break even and to reach 1.5x (README)."""
    vocab = model.config.vocab_size
    targets = [("the trained target", model)] + [
        (f"d_model {d}, {layers} layers", Transformer(TransformerConfig(
            vocab_size=vocab, d_model=d, n_heads=d // 64, n_layers=layers, d_ff=2 * d, context_length=256)).eval())
        for d, layers in ((768, 6), (1024, 8), (1280, 12))]
    grid = [a / 100 for a in range(5, 100, 1)]
    rows = []
    for name, target in targets:
        costs = forward_costs(target, draft, context)
        needed = [next((f"{a:.2f}" for a in grid if speedup(costs, a) >= goal), "> 0.99") for goal in (1.0, 1.5)]
        rows.append([name, f"{sum(p.numel() for p in target.parameters()) / 1e6:.1f}M", f"{costs['step'] * 1e3:.2f}",
                     f"{costs['draft'] / costs['step']:.2f}", f"{costs[4] / costs['step']:.2f}", *needed,
                     f"{speedup(costs, 0.8):.2f}x"])
    return rows


def load_draft(path: Path, model, tokenizer):
    try:
        return load_draft_model(check_run_directory(path), model, tokenizer)
    except (ValueError, ConfigError) as exc:
        print(f"error: --draft-run: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--draft-run", type=Path, default=None)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--grounded-prompt", type=int, default=96)
    parser.add_argument("--open-prompt", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--draft-cost", type=float, default=None,
                        help="speculative.draft_cost (the draft model's step in target steps); default: measured")
    parser.add_argument("--fresh-schedule", action="store_true",
                        help="a new plugin (schedule, measured cost) for every generation")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--crossover", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model, tokenizer, loaded = load_trained_model(args.run_dir)
    draft = load_draft(args.draft_run, model, tokenizer) if args.draft_run else None
    rows = []
    for kind, prompts in prompt_sets(args.run_dir, args).items():
        for name, drafter in drafter_names(args).items():
            row = measure(model, tokenizer, prompts, args, drafter)
            rows.append([kind, name, f"{prompts[0].shape[1]} + {args.new_tokens}", *row])
    sizes = f"target {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters" + (
        f", draft {sum(p.numel() for p in draft.parameters()) / 1e6:.2f}M" if draft is not None else "")
    schedule = "a new plugin per generation" if args.fresh_schedule else "one plugin per row"
    print(f"model: {loaded} ({sizes}); threads {torch.get_num_threads()}; batch 1, greedy; {schedule}; "
          f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}\n")
    print(markdown_table(HEADERS, rows))
    if args.bf16:
        prompts = [p for kind in prompt_sets(args.run_dir, args).values() for p in kind]
        print(f"\nbf16 greedy, {len(prompts)} prompts: speculative output differs from plain bf16 greedy\n")
        print(markdown_table(["drafter", "prompts differing"], bf16_divergence(model, tokenizer, prompts, args)))
    if args.crossover and draft is not None:
        print(f"\ncrossover: this draft ({sum(p.numel() for p in draft.parameters()) / 1e6:.2f}M) for targets of "
              f"growing size (untrained ones timed), context {args.grounded_prompt}, batch 1\n")
        print(markdown_table(["target", "parameters", "target step ms", "draft step / target step",
                              "verify 5 tokens / target step", "acceptance rate for 1.0x", "for 1.5x",
                              "expected at acceptance 0.8"], crossover(model, draft, args.grounded_prompt)))


if __name__ == "__main__":
    main()
