"""Long-context benchmark of the quantized KV cache on a model trained by `ryzen train` (issue 15).

    python plugins/kv_cache/benchmarks/bench_long_context.py RUN_DIR [--context 1024] [--out results.json]

1. Quality: held-out rows of the run's test split, `--context` tokens each, scored token by token through
   the fp32 cache and through each quantized cache: perplexity, top-1 agreement, KL(fp32 || quantized).
2. Peak memory: each variant in a fresh process (this script with --memory-child) builds a batch of
   `--batch` contexts (prefilled in chunks of 128, so no prefill temporary dwarfs the cache), decodes
   `--steps` tokens to the full context and reports VmHWM, the RSS after loading the model, and the KV
   bytes it holds.
3. Decode speed at the full context and batch `--batch`: every variant prefilled once; then `--rounds`
   rounds, each timing `--steps` greedy steps of every variant from a copy of its prefilled cache, in an
   order rotated per round; each variant against the model's own fp32 cache as a paired ratio of tokens/s
   with a bootstrap interval (ryzen_core.compare_pairs).
4. Whole-cache bytes (`--parts bytes`) at each of `--byte-contexts`: an untrained model of the run's shape
   with a context of the longest (the bytes depend on the shapes only), one row prefilled to 128 tokens
   short of the context in chunks of 128, then decoded one token at a time to it; after every step, the
   stored bytes of the whole cache (codes, metadata, fp16 window) against a bf16 cache of the same tokens:
   the lowest ratio of those 128 steps (the fullest window), their mean, and the ratio at the context itself.

`--variants` picks which of VARIANTS run (ids, comma-separated).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ryzen_core import (ConfigError, RyzenError, Transformer, compare_pairs, cpu_description, format_ratio,
                        load_config, load_data, load_snapshot, load_trained_model, markdown_table, model_outputs)
from ryzen_plugin_kv_cache import KVCacheSettings, QuantizedKVCache, cached_forward, compare_logits, incremental_logits

DEFAULTS = KVCacheSettings()
# id -> (label, cache settings); None: the model's own fp32 cache (what plain `ryzen_core.generate` uses)
VARIANTS: dict[str, tuple[str, dict | None]] = {
    "fp32-model": ("fp32, the model's own cache", None),
    "fp32-plugin": ("fp32, this plugin's forward", {"residual": None}),
    "int8": ("int8, keys per token (default)", {"bits": 8}),
    "int8-channel": ("int8, keys per channel", {"bits": 8, "key_grouping": "channel"}),
    "4bit": ("4-bit, keys per channel (default)", {"bits": 4}),
    "int8-scratch": ("int8, dequantize scratch", {"bits": 8, "read": "dequantize"}),
    "4bit-scratch": ("4-bit, dequantize scratch", {"bits": 4, "read": "dequantize"}),
}
PREFILL_CHUNK = 128
LONG_CONTEXT = 1024  # the default key group for the 1-2k contexts measured here: 128


def new_cache(settings: dict) -> QuantizedKVCache:
    bits = settings.get("bits", DEFAULTS.bits)
    merged = {"group_size": DEFAULTS.key_group_for(LONG_CONTEXT), "residual": DEFAULTS.residual,
              "value_group_size": DEFAULTS.value_group_size, "read": DEFAULTS.read,
              "key_grouping": KVCacheSettings(bits=bits).key_grouping_for(), **settings}
    return QuantizedKVCache(**merged)


class Decoder:
    """One variant's cache with a prefill and a greedy step, so all variants run the same loop."""

    def __init__(self, model, settings: dict | None):
        self.model, self.settings = model, settings
        self.cache = None if settings is None else new_cache(settings)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.settings is not None:
            return cached_forward(self.model, self.cache, ids)
        logits, self.cache = model_outputs(self.model, ids, self.cache)
        return logits

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        for start in range(0, ids.shape[1], PREFILL_CHUNK):
            logits = self.forward(ids[:, start:start + PREFILL_CHUNK])
        return logits[:, -1].argmax(-1, keepdim=True)

    def decode(self, token: torch.Tensor, steps: int) -> torch.Tensor:
        for _ in range(steps):
            token = self.forward(token)[:, -1].argmax(-1, keepdim=True)
        return token

    def fork(self) -> "Decoder":
        """The same model with a copy of the cache, to time decoding from the same state again."""
        forked = Decoder.__new__(Decoder)
        forked.model, forked.settings, forked.cache = self.model, self.settings, copy.deepcopy(self.cache)
        return forked

    def kv_bytes(self) -> int:
        if self.settings is not None:
            return self.cache.nbytes
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.cache)


def held_out(run_dir: Path, rows: int, context: int) -> torch.Tensor:
    config = load_config(run_dir / "config.json")
    test = load_data(config).test
    if test.shape[0] < rows or test.shape[1] < context:
        raise ConfigError(f"the test split has {test.shape[0]} rows of {test.shape[1]} tokens; "
                          f"need {rows} of {context}")
    return test[:rows, :context]


def window_nbytes(cache: QuantizedKVCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.recent_keys, layer.recent_values))


def quality(model, ids: torch.Tensor, variants: list[str]) -> dict:
    with torch.inference_mode():
        reference = incremental_logits(model, ids, QuantizedKVCache(residual=None))
        results = {}
        for name in variants:
            settings = VARIANTS[name][1]
            if settings is None or settings.get("residual", 0) is None or "read" in settings:
                continue  # the dequantize reads compute the same values (tests check they agree)
            cache = new_cache(settings)
            results[name] = compare_logits(reference, incremental_logits(model, ids, cache), ids)
            layer = cache.layers[0]
            heads, head_dim = layer.recent_keys.shape[1], layer.recent_keys.shape[-1]
            per_token_head = (cache.nbytes - window_nbytes(cache)) / (
                ids.shape[0] * layer.quantized_tokens * heads * len(cache.layers))
            results[name].update(
                kv_bytes_per_token=cache.nbytes / ids.numel(), window_tokens=cache.window_tokens,
                quantized_bytes_per_token_per_head=per_token_head, bf16_bytes_per_token_per_head=2 * 2 * head_dim,
                kv_bytes_per_token_bf16=cache.full_precision_nbytes(2) / ids.numel())
    return results


def whole_cache_bytes(model, contexts: list[int], variants: list[str]) -> dict:
    """For each quantized variant and context: the whole cache's bytes against bf16 over the 128 decoding
    steps that end at the context (module docstring, part 4)."""
    if not isinstance(model, Transformer):
        raise ConfigError("the whole-cache byte count builds an untrained built-in Transformer of the run's shape")
    longest = Transformer(dataclasses.replace(model.config, context_length=max(contexts))).eval()
    ids = torch.randint(0, longest.config.vocab_size, (1, max(contexts)), generator=torch.Generator().manual_seed(0))
    results = {}
    with torch.inference_mode():
        for name in variants:
            settings = VARIANTS[name][1]
            if settings is None or settings.get("residual", 0) is None or "read" in settings:
                continue
            results[name] = {}
            for context in contexts:
                cache, ratios, windows = new_cache(settings), [], []
                for start in range(0, context - 128, PREFILL_CHUNK):
                    cached_forward(longest, cache, ids[:, start:min(start + PREFILL_CHUNK, context - 128)])
                for t in range(context - 128, context):
                    cached_forward(longest, cache, ids[:, t:t + 1])
                    ratios.append(cache.full_precision_nbytes(2) / cache.nbytes)
                    windows.append(cache.window_tokens)
                results[name][str(context)] = {
                    "lowest": min(ratios), "mean": sum(ratios) / len(ratios), "at_context": ratios[-1],
                    "largest_window": max(windows), "bytes_at_context": cache.nbytes,
                    "bf16_bytes_at_context": cache.full_precision_nbytes(2)}
    return results


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(run_dir: Path, name: str, ids_file: Path, steps: int) -> dict:
    ids = torch.load(ids_file, weights_only=True)  # not the whole dataset: its loading would set the high-water mark
    model, _, _ = load_trained_model(run_dir)
    after_load = vm_kib("VmRSS")
    decoder = Decoder(model, VARIANTS[name][1])
    with torch.inference_mode():
        decoder.decode(decoder.prefill(ids[:, :-steps]), steps - 1)
    return {"vmhwm_kib": vm_kib("VmHWM"), "rss_after_load_kib": after_load, "kv_bytes": decoder.kv_bytes(),
            "scratch_bytes": decoder.cache.scratch_nbytes if isinstance(decoder.cache, QuantizedKVCache) else 0}


def memory(run_dir: Path, ids: torch.Tensor, steps: int, variants: list[str]) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        ids_file = Path(directory) / "ids.pt"
        torch.save(ids, ids_file)
        for name in variants:
            command = [sys.executable, __file__, str(run_dir), "--memory-child", name, "--ids", str(ids_file),
                       "--steps", str(steps)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
    return results


def speed(model, ids: torch.Tensor, rounds: int, steps: int, variants: list[str]) -> dict:
    decoders, first_tokens = {}, {}
    names = ["fp32-model"] + [name for name in variants if name != "fp32-model"]  # the baseline first
    with torch.inference_mode():
        for name in names:
            decoders[name] = Decoder(model, VARIANTS[name][1])
            first_tokens[name] = decoders[name].prefill(ids[:, :-steps])
        tokens_per_s, loads = {name: [] for name in names}, []
        for round_index in range(rounds + 1):  # round 0 is a warm-up
            loads.append(load_snapshot()["load_1m"])
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in order:
                decoder = decoders[name].fork()
                start = time.perf_counter()
                decoder.decode(first_tokens[name], steps)
                elapsed = time.perf_counter() - start
                if round_index:
                    tokens_per_s[name].append(ids.shape[0] * steps / elapsed)
    baseline = names[0]
    return {name: {"tokens_per_s": values,
                   "vs_model_cache": compare_pairs(tokens_per_s[baseline], values, higher_is_better=True).to_dict()}
            for name, values in tokens_per_s.items()}, loads


def report(results: dict) -> str:
    rows = []
    for name, (label, _) in VARIANTS.items():
        q, m, s = (results.get(part, {}).get(name) for part in ("quality", "memory", "speed"))
        w = results.get("whole_cache_bytes", {}).get(name, {})
        if not (q or m or s or w):
            continue
        rows.append([
            label,
            "" if q is None else f"{q['perplexity_quantized_cache']:.3f} vs {q['perplexity_fp32_cache']:.3f}",
            "" if q is None else f"{100 * q['top1_agreement']:.2f}%",
            "" if q is None else f"{q['kl_fp32_to_quantized']:.2e}",
            "" if q is None else
            f"{q['quantized_bytes_per_token_per_head']:.0f} (bf16 {q['bf16_bytes_per_token_per_head']})",
            ", ".join(f"{c}: {r['lowest']:.2f}/{r['mean']:.2f}" for c, r in w.items()),
            "" if m is None else f"{m['kv_bytes'] / 2**20:.1f}"
            + (f" + {m['scratch_bytes'] / 2**20:.1f} scratch" if m["scratch_bytes"] else ""),
            "" if m is None else f"{m['vmhwm_kib'] / 1024:.0f} ({(m['vmhwm_kib'] - m['rss_after_load_kib']) / 1024:+.0f})",
            "" if s is None else f"{sorted(s['tokens_per_s'])[len(s['tokens_per_s']) // 2]:.1f}",
            "" if s is None else format_ratio(s["vs_model_cache"]),
        ])
    header = ["cache", "token-by-token ppl (vs fp32 cache)", "top-1 agreement", "KL",
              "bytes/token/head, quantized part", "whole cache vs bf16 by context (lowest/mean)",
              "KV MiB held at the end", "peak RSS MiB (over model load)", "decode tok/s (median)",
              "tok/s vs model's cache"]
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--quality-rows", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--parts", default="quality,memory,speed",
                        help="which to measure (quality, memory, speed, bytes); the others are taken from --out "
                             "if it exists")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"ids among {', '.join(VARIANTS)}")
    parser.add_argument("--byte-contexts", default="512,1024,2048,4096,8192")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.run_dir, args.memory_child, args.ids, args.steps)))
        return
    variants, parts = args.variants.split(","), set(args.parts.split(","))
    unknown = [name for name in variants if name not in VARIANTS] + sorted(
        parts - {"quality", "memory", "speed", "bytes"})
    if unknown:
        raise ConfigError(f"unknown variants or parts: {', '.join(unknown)}")
    ids = held_out(args.run_dir, max(args.batch, args.quality_rows), args.context)
    model, _, loaded = load_trained_model(args.run_dir)
    results = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    results.update(machine=cpu_description(), model=str(loaded), context=args.context, batch=args.batch)
    if "quality" in parts:
        results["quality"] = quality(model, ids[:args.quality_rows], variants)
    if "bytes" in parts:
        contexts = [int(c) for c in args.byte_contexts.split(",")]
        results["whole_cache_bytes"] = whole_cache_bytes(model, contexts, variants)
    if "memory" in parts:
        results["memory"] = memory(args.run_dir, ids[:args.batch], args.steps, variants)
    if "speed" in parts:
        load_before = load_snapshot()
        results["speed"], loads = speed(model, ids[:args.batch], args.rounds, args.steps, variants)
        results["speed_conditions"] = {"threads": torch.get_num_threads(), "steps": args.steps, "rounds": args.rounds,
                                       "load_before": load_before, "load_by_round": loads,
                                       "load_after": load_snapshot()}
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    try:
        main()
    except RyzenError as error:  # a missing run, a config it cannot read, too short a test split
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
