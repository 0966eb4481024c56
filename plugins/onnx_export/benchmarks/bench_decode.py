"""Decode speed: onnxruntime (fp32, int8) vs torch eager, batch 1, KV cache, greedy.

    python plugins/onnx_export/benchmarks/bench_decode.py --preset simple --pairs 7

Builds a randomly initialised built-in Transformer (speed does not depend on the
weights' values), exports it, then runs torch and each onnxruntime export interleaved
(torch, ort-fp32, ort-int8, torch, ...) so that machine noise hits all of them alike.
Decode tokens/s counts the tokens after the first (the first comes from the prefill):
(new_tokens - 1) / (time of last token - time of first token). Each round gives one
ratio per backend against the torch run of the same round; the table reports the median
of those ratios with its 95% bootstrap interval and the verdict of `ryzen_core.measure`
(faster/slower only when the interval excludes 1). Runs are separated by a short pause: torch's OpenMP
workers and onnxruntime's workers both spin for a moment after their work ends, and on
2 cores that spin would be charged to whichever backend runs next.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ryzen_core import compare_pairs, cpu_features, format_ratio


def busy_jiffies() -> int:
    """CPU time all processes spent busy (user, nice, system, irq, softirq, steal), in clock ticks."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return user + nice + system + irq + softirq + steal


def decode_tokens_per_s(generate, prompt: torch.Tensor, new_tokens: int) -> float:
    stamps: list[float] = []
    generate(prompt, new_tokens, on_token=lambda step: stamps.append(time.perf_counter()))
    if len(stamps) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} tokens, got {len(stamps)}")
    return (new_tokens - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="simple")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=7, help="measured rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between runs (lets spinning pools park)")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()

    import warnings

    import onnxruntime

    warnings.filterwarnings("ignore")  # exporter deprecation chatter; the table is the output

    from ryzen_core import Transformer, TransformerConfig
    from ryzen_core import generate as torch_generate
    from ryzen_plugin_onnx_export.export import export_onnx, export_size_bytes, quantize_int8
    from ryzen_plugin_onnx_export.runtime import OrtBackend

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = TransformerConfig.from_preset(args.preset, vocab_size=args.vocab_size)
    model = Transformer(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens))

    with tempfile.TemporaryDirectory() as tmp:
        backends = {"onnxruntime-fp32": OrtBackend(export_onnx(model, None, Path(tmp) / "fp32"), threads=args.threads)}
        sizes = {"onnxruntime-fp32": export_size_bytes(Path(tmp) / "fp32")}
        if not args.no_int8:
            quantize_int8(Path(tmp) / "fp32", Path(tmp) / "int8")
            backends["onnxruntime-int8"] = OrtBackend(Path(tmp) / "int8", threads=args.threads)
            sizes["onnxruntime-int8"] = export_size_bytes(Path(tmp) / "int8")

        runners = {"torch": lambda ids, n, **kw: torch_generate(model, ids, n, **kw)}
        runners.update({name: backend.generate for name, backend in backends.items()})
        speeds: dict[str, list[float]] = {name: [] for name in runners}
        # Other processes on the machine steal cores from both backends; report how much.
        ticks = os.sysconf("SC_CLK_TCK")
        busy_before, own_before, wall_before = busy_jiffies(), os.times(), time.perf_counter()
        for round_index in range(args.pairs + 1):
            for name, run in runners.items():
                time.sleep(args.pause)
                speed = decode_tokens_per_s(run, prompt, args.new_tokens)
                if round_index > 0:  # round 0 warms caches and thread pools
                    speeds[name].append(speed)
        own_after = os.times()
        own_cpu = (own_after.user + own_after.system) - (own_before.user + own_before.system)
        other_cores = max(0.0, (busy_jiffies() - busy_before) / ticks - own_cpu) / (time.perf_counter() - wall_before)

    params = model.num_parameters()
    print(f"machine: {cpu_features().model}, {args.threads} threads; torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}")
    print(f"model: built-in '{args.preset}' preset, vocab {config.vocab_size}, {params / 1e6:.2f}M parameters; "
          f"batch 1, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, greedy, {args.pairs} rounds "
          f"(+1 warm-up), {args.pause}s pause between runs")
    print(f"other processes used {other_cores:.2f} cores on average during the rounds")
    print()
    print("| backend | decode tok/s (median) | min-max tok/s | speed vs torch (median ratio [95% interval]) "
          "| verdict | file size |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for name, values in speeds.items():
        vs_torch = compare_pairs(speeds["torch"], values, higher_is_better=True)
        summary[name] = {"tokens_per_s": values, "vs_torch": vs_torch.to_dict()}
        size = f"{sizes[name] / 1e6:.2f} MB" if name in sizes else "-"
        print(f"| {name} | {statistics.median(values):.0f} | {min(values):.0f}-{max(values):.0f} | "
              f"{format_ratio(vs_torch)} | {vs_torch.verdict} | {size} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "cpu": cpu_features().model,
                                         "other_processes_cores": other_cores,
                                         "results": summary, "sizes_bytes": sizes}, indent=2) + "\n")


if __name__ == "__main__":
    main()
