"""Speculative decoding against plain decoding on a trained run's model, batch 1, greedy.

Two kinds of prompt, both from the held-out (test) split of the run's own data, Python stdlib code:
- input-grounded: `--grounded-prompt` tokens of a file, continued for `--new-tokens` (code repeats its
  own names and lines, so prompt lookup finds drafts);
- open-ended: the first `--open-prompt` tokens of a row, continued as far (little to copy from).

For each: whether the outputs are token-identical to plain greedy (ryzen_core.generate), the acceptance
figures, and the decode tokens/s ratio, measured plain and speculative interleaved (paired ratios, 95%
bootstrap interval). Usage:

    .venv/bin/python plugins/speculative/benchmarks/bench_speculative.py RUN_DIR [--prompts 8] [--threads 2]

RUN_DIR is a `ryzen run` or `ryzen train` directory (or one variant's). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ryzen_core import (compare_pairs, format_ratio, generate, load_config, load_data, load_trained_model,
                        markdown_table)
from ryzen_plugin_speculative import SpeculationStats, speculative_generate


def prompt_sets(run_dir: Path, args) -> dict[str, list[torch.Tensor]]:
    config_file = next(p for p in (run_dir / "config.json", run_dir.parent / "config.json") if p.is_file())
    test = load_data(load_config(config_file)).test
    rows = test[:: max(1, len(test) // args.prompts)][:args.prompts]
    return {"input-grounded": [row[None, :args.grounded_prompt] for row in rows],
            "open-ended": [row[None, :args.open_prompt] for row in rows]}


def decode_rate(fn, prompt: torch.Tensor, new_tokens: int) -> float:
    """New tokens per second after the first (what report.md's decode tok/s measures)."""
    stamps: list[float] = []
    fn(prompt, new_tokens, on_token=lambda i: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def measure(model, prompts: list[torch.Tensor], new_tokens: int, rounds: int) -> list[str]:
    stats = SpeculationStats()
    identical = sum(torch.equal(generate(model, p, new_tokens), speculative_generate(model, p, new_tokens, stats=stats))
                    for p in prompts)
    plain = lambda p, n, **kw: generate(model, p, n, **kw)  # noqa: E731
    spec = lambda p, n, **kw: speculative_generate(model, p, n, **kw)  # noqa: E731
    plain_rates, spec_rates = [], []
    for _ in range(rounds):
        for prompt in prompts:  # interleaved: each pair ran under the same machine conditions
            plain_rates.append(decode_rate(plain, prompt, new_tokens))
            spec_rates.append(decode_rate(spec, prompt, new_tokens))
    summary = stats.summary()
    return [f"{identical}/{len(prompts)}", f"{summary['acceptance_rate'] or 0:.2f}",
            f"{summary['mean_accepted_length'] or 0:.2f}", f"{summary['target_forwards_per_token']:.2f}",
            format_ratio(compare_pairs(plain_rates, spec_rates, higher_is_better=True))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--grounded-prompt", type=int, default=96)
    parser.add_argument("--open-prompt", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _, loaded = load_trained_model(args.run_dir)
    rows = []
    for kind, prompts in prompt_sets(args.run_dir, args).items():
        rows.append([kind, f"{prompts[0].shape[1]} + {args.new_tokens}",
                     *measure(model, prompts, args.new_tokens, args.rounds)])
    print(f"model: {loaded}; threads {torch.get_num_threads()}; batch 1, greedy\n")
    print(markdown_table(["prompts", "tokens (prompt + new)", "identical to plain greedy", "acceptance rate",
                          "mean accepted length", "target forwards per token", "decode tok/s vs plain [95%]"], rows))


if __name__ == "__main__":
    main()
