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
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ryzen_core import (ConfigError, RyzenError, compare_pairs, cpu_description, format_ratio, load_config,
                        load_data, load_snapshot, load_trained_model, markdown_table, model_outputs)
from ryzen_plugin_kv_cache import KVCacheSettings, QuantizedKVCache, cached_forward, compare_logits, incremental_logits

DEFAULTS = KVCacheSettings()
# name -> cache settings; None: the model's own fp32 cache (what plain `ryzen_core.generate` uses)
VARIANTS: dict[str, dict | None] = {
    "fp32, model's own cache": None,
    "fp32, this plugin's forward": {"residual": None},
    "int8": {"bits": 8},
    "4-bit": {"bits": 4},
    "int8, dequantize scratch": {"bits": 8, "read": "dequantize"},
    "4-bit, dequantize scratch": {"bits": 4, "read": "dequantize"},
}
PREFILL_CHUNK = 128
LONG_CONTEXT = 1024  # the default key group for the 1-2k contexts measured here: 128


def new_cache(settings: dict) -> QuantizedKVCache:
    merged = {"group_size": DEFAULTS.key_group_for(LONG_CONTEXT), "residual": DEFAULTS.residual,
              "value_group_size": DEFAULTS.value_group_size, "read": DEFAULTS.read, **settings}
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


def quality(model, ids: torch.Tensor) -> dict:
    with torch.inference_mode():
        reference = incremental_logits(model, ids, QuantizedKVCache(residual=None))
        results = {}
        for name, settings in VARIANTS.items():
            if settings is None or settings.get("residual", 0) is None or "read" in settings:
                continue  # the dequantize reads compute the same values (tests check they agree)
            cache = new_cache(settings)
            results[name] = compare_logits(reference, incremental_logits(model, ids, cache), ids)
            quantized_part = cache.nbytes - sum(2 * l.recent_keys.numel() * 4 for l in cache.layers)
            per_token_head = quantized_part / (ids.shape[0] * cache.layers[0].quantized_tokens
                                               * cache.layers[0].recent_keys.shape[1] * len(cache.layers))
            results[name].update(
                kv_bytes_per_token=cache.nbytes / ids.numel(), fp32_tokens=cache.fp32_tokens,
                quantized_bytes_per_token_per_head=per_token_head,
                bf16_bytes_per_token_per_head=2 * 2 * cache.layers[0].recent_keys.shape[-1],
                kv_bytes_per_token_bf16=cache.full_precision_nbytes(2) / ids.numel())
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
    decoder = Decoder(model, VARIANTS[name])
    with torch.inference_mode():
        decoder.decode(decoder.prefill(ids[:, :-steps]), steps - 1)
    return {"vmhwm_kib": vm_kib("VmHWM"), "rss_after_load_kib": after_load, "kv_bytes": decoder.kv_bytes(),
            "scratch_bytes": decoder.cache.scratch_nbytes if isinstance(decoder.cache, QuantizedKVCache) else 0}


def memory(run_dir: Path, ids: torch.Tensor, steps: int) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        ids_file = Path(directory) / "ids.pt"
        torch.save(ids, ids_file)
        for name in VARIANTS:
            command = [sys.executable, __file__, str(run_dir), "--memory-child", name, "--ids", str(ids_file),
                       "--steps", str(steps)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
    return results


def speed(model, ids: torch.Tensor, rounds: int, steps: int) -> dict:
    decoders, first_tokens = {}, {}
    with torch.inference_mode():
        for name, settings in VARIANTS.items():
            decoders[name] = Decoder(model, settings)
            first_tokens[name] = decoders[name].prefill(ids[:, :-steps])
        tokens_per_s = {name: [] for name in VARIANTS}
        names = list(VARIANTS)
        for round_index in range(rounds + 1):  # round 0 is a warm-up
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
            for name, values in tokens_per_s.items()}


def report(results: dict) -> str:
    rows = []
    for name in VARIANTS:
        q = results["quality"].get(name)
        m, s = results["memory"][name], results["speed"][name]
        peak = m["vmhwm_kib"] / 1024
        rows.append([
            name,
            "" if q is None else f"{q['perplexity_quantized_cache']:.3f} vs {q['perplexity_fp32_cache']:.3f}",
            "" if q is None else f"{100 * q['top1_agreement']:.2f}%",
            "" if q is None else f"{q['kl_fp32_to_quantized']:.2e}",
            "" if q is None else
            f"{q['quantized_bytes_per_token_per_head']:.0f} (bf16 {q['bf16_bytes_per_token_per_head']})",
            f"{m['kv_bytes'] / 2**20:.1f}"
            + (f" + {m['scratch_bytes'] / 2**20:.1f} scratch" if m["scratch_bytes"] else ""),
            f"{peak:.0f} ({peak - m['rss_after_load_kib'] / 1024:+.0f})",
            f"{sorted(s['tokens_per_s'])[len(s['tokens_per_s']) // 2]:.1f}",
            format_ratio(s["vs_model_cache"]),
        ])
    header = ["cache", "token-by-token ppl (vs fp32 cache)", "top-1 agreement", "KL",
              "bytes/token/head, quantized part", "KV MiB held at the end", "peak RSS MiB (over model load)",
              "decode tok/s (median)", "tok/s vs model's cache"]
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
                        help="which to measure; the others are taken from --out if it exists")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.run_dir, args.memory_child, args.ids, args.steps)))
        return
    ids = held_out(args.run_dir, max(args.batch, args.quality_rows), args.context)
    parts = set(args.parts.split(","))
    model, _, loaded = load_trained_model(args.run_dir)
    results = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    results.update(machine=cpu_description(), model=str(loaded), context=args.context, batch=args.batch)
    if "quality" in parts:
        results["quality"] = quality(model, ids[:args.quality_rows])
    if "memory" in parts:
        results["memory"] = memory(args.run_dir, ids[:args.batch], args.steps)
    if "speed" in parts:
        load_before = load_snapshot()
        results["speed"] = speed(model, ids[:args.batch], args.rounds, args.steps)
        results["speed_conditions"] = {"threads": torch.get_num_threads(), "steps": args.steps, "rounds": args.rounds,
                                       "load_before": load_before, "load_after": load_snapshot()}
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    try:
        main()
    except RyzenError as error:  # a missing run, a config it cannot read, too short a test split
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
