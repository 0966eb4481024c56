"""The ternary model's decode speed against the engines a user would pick instead, in one interleaved run.

A 102M-parameter Llama (plugins/runtimes/benchmarks/llama-100m.config.json: hidden 768, 12 layers, 12/4 heads,
MLP 2560, vocab 8192) with random weights (speed does not depend on them; a tokenizer is trained on the
stdlib corpus so the engines can be built), then, each backend alone in a worker process with the same threads,
measured by `ryzen_core.validate` (interleaved rounds, median of per-round ratios with a 95% bootstrap interval):

- `ternary` — this plugin's inference model (C++ 2-bit kernel on every Linear, LM head int8; `--head fp32`
  for the trained head), decoding through the plugin's lean Llama step (llama_decoder.py);
- `ternary-generic-loop` — the same model in Ryzen's generic KV-cache loop (transformers' modules);
- `onnx-int8`, `onnx-int4` — the onnx plugin's fused graph, Ryzen's best 8-bit and 4-bit paths;
- `genai-int4` — onnxruntime-genai's model builder, int4 (MatMulNBits, block 32);
- `llamacpp-q4_0` — llama.cpp Q4_0;
- `llamacpp-tq2_0` — llama.cpp's ternary format (2.06 bits/weight) holding the same ternary weights (each
  layer's weight replaced by t * scale): the natural peer of the packed weights.

Engines that are not installed are left out and said so. The ternary backend is the validation's baseline;
every ratio printed is ternary over the peer (> 1: ternary decodes faster), computed round by round.

    .venv/bin/python plugins/bitnet/benchmarks/bench_engines.py --out /tmp/bitnet_engines [--threads 2]
        [--rounds 8] [--new-tokens 128] [--batches 1 8] [--head int8|fp32] [--reuse-exports]

Writes engines.json (the validation report plus the ratios) and engines.md into --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ryzen_core import (RunConfig, TorchBackend, compare_pairs, cpu_description, format_ratio, hf_model_from_config,
                        load_documents, load_hf_model, load_plugins, markdown_table, save_hf_model, train_tokenizer,
                        validate)

CONFIG = Path(__file__).resolve().parents[2] / "runtimes" / "benchmarks" / "llama-100m.config.json"
VOCAB = 8192


@dataclass(frozen=True)
class TernaryRecipe:
    """The ternary inference model of the HF model saved in `source`, built in the worker."""

    source: str
    head: str
    name: str = "ternary"
    lean: bool = True
    """The plugin's lean Llama step (llama_decoder.py), or Ryzen's generic KV-cache loop."""

    def build(self):
        from ryzen_plugin_bitnet.kernel import ternary_model
        from ryzen_plugin_bitnet.llama_decoder import decoder_for

        model = ternary_model(load_hf_model(self.source), kernel="cpp", head=self.head)
        decoder, why_not = decoder_for(model) if self.lean else (None, "asked for")
        if self.lean and decoder is None:
            raise RuntimeError(f"the lean decoder does not apply: {why_not}")
        backend = TorchBackend(model, self.name, None if decoder is None else decoder.generate)
        backend.precision = "ternary"
        return backend


@dataclass(frozen=True)
class LoadedExport:
    """An export directory of the onnx or runtimes plugin, loaded through the plugins' load_backend."""

    path: str
    name: str

    def build(self):
        host = load_plugins(["onnx", "runtimes"], autoload=False)
        backend = host.first("load_backend", host.loaded_names(), path=Path(self.path))
        if backend is None:
            raise RuntimeError(f"no installed plugin loads {self.path}")
        backend.name = self.name
        return backend


def source_model(out: Path, seed: int):
    """(model, tokenizer, saved HF directory) of the 102M Llama."""
    tokenizer = train_tokenizer((d.text for d in load_documents("stdlib")), VOCAB, out / "cache")
    torch.manual_seed(seed)
    model = hf_model_from_config(str(CONFIG), vocab_size=tokenizer.vocab_size).eval()
    return model, tokenizer, save_hf_model(model, out / "hf_model")


def ternarized(model):
    """A copy whose quantized layers hold exactly their ternary weights t * scale (what TQ2_0 stores)."""
    from ryzen_plugin_bitnet.quant import quantizable_linears, ternary_weights

    copied = copy.deepcopy(model)
    with torch.no_grad():
        for name in quantizable_linears(copied):
            layer = copied.get_submodule(name)
            t, scale = ternary_weights(layer.weight)
            layer.weight.copy_(t * scale)
    return copied


# Random weights give nearly tied logits, so the exports' top-1 parity checks (which drop a quantized export
# that disagrees with torch) mean nothing here and are turned off; the plugins' tests check parity.
NO_PARITY_GATE = dict(int8_tolerance=1e9, int8_min_top1=0.0, int4_tolerance=1e9, int4_min_top1=0.0)


def exports(model, tokenizer, out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """({backend name: export directory}, {export name: why it is missing})."""
    built, skipped = {}, {}
    try:
        from ryzen_plugin_onnx_export.plugin import OnnxSettings, export_and_check

        result = export_and_check(model, tokenizer, out / "onnx", OnnxSettings(**NO_PARITY_GATE))
        built.update({f"onnx-{p}": str(result.exports[n]) for p in ("int8", "int4") for n in result.exports
                      if n.endswith(p)})
    except ImportError as exc:
        skipped["onnx"] = f"ryzen-plugin-onnx is not installed ({exc})"
    try:
        from ryzen_plugin_runtimes.plugin import RuntimesSettings, export_all
    except ImportError as exc:
        skipped["runtimes"] = f"ryzen-plugin-runtimes is not installed ({exc})"
        return built, skipped
    peers = export_all(model, tokenizer, out / "runtimes",
                       RuntimesSettings(engines=["genai", "llamacpp"], genai=["int4"], llamacpp=["Q4_0"], min_top1=0))
    ternary = export_all(ternarized(model), tokenizer, out / "runtimes-ternary",
                         RuntimesSettings(engines=["llamacpp"], llamacpp=["TQ2_0"], min_top1=0))
    for result in (peers, ternary):
        built.update({name: str(path) for name, path in result.exports.items()})
        skipped.update(result.details["skipped"])
    return built, skipped


def ratios(report: dict) -> dict[int, dict[str, dict]]:
    """Per batch size and peer: ternary / peer decode tokens/s, paired round by round."""
    table = {}
    for batch in report["batches"]:
        rows = {}
        for peer, metrics in batch["comparisons"].items():
            cmp = metrics["decode_tokens_per_s"]
            rows[peer] = compare_pairs(cmp["values_b"], cmp["values_a"], higher_is_better=True).to_dict()
        table[batch["batch_size"]] = rows
    return table


def markdown(report: dict, paired: dict, args, skipped: dict) -> str:
    cpu = cpu_description()
    machine = f"{cpu['model']} ({cpu['usable_cores']} usable cores, {', '.join(cpu['flags'])})"
    lines = [f"Machine: {machine}, {args.threads} threads per backend, each in its own worker process; "
             f"prompt {args.prompt_len} tokens, {args.new_tokens} new, greedy. Command: `{args.command}`", ""]
    for batch in report["batches"]:
        b = batch["batch_size"]
        rows = []
        for name, result in batch["backends"].items():
            ratio = paired[b].get(name)
            rows.append([name, f"{result['decode_tokens_per_s']['p50']:.1f}", f"{result['memory']['peak_rss_mib']:.0f}",
                         "-" if ratio is None else format_ratio(ratio)])
        busy = "; ".join(batch["conditions"].get("reasons", [])) or "quiet"
        lines += [f"Batch {b}, {batch['rounds']['rounds']} rounds, highest 1-minute load average "
                  f"{batch['conditions']['load_1m_max']:.2f} ({busy}):", "",
                  markdown_table(["backend", "decode tok/s p50", "peak RSS MiB", "ternary vs this [95%]"], rows), ""]
    if skipped:
        lines += ["Not measured: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--head", choices=["int8", "fp32"], default="int8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-exports", action="store_true", help="keep the exports an earlier run left in --out")
    args = parser.parse_args()
    args.command = "bench_engines.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                   if k not in ("out", "command", "reuse_exports"))
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    model, tokenizer, source = source_model(args.out, args.seed)
    listing = args.out / "exports.json"  # --reuse-exports: the directories an earlier run wrote for this seed
    if args.reuse_exports and listing.is_file() and json.loads(listing.read_text())["seed"] == args.seed:
        built, skipped = (json.loads(listing.read_text())[k] for k in ("built", "skipped"))
    else:
        built, skipped = exports(model, tokenizer, args.out)
        listing.write_text(json.dumps({"seed": args.seed, "built": built, "skipped": skipped}))
    backends = {"ternary": TernaryRecipe(str(source), args.head),
                "ternary-generic-loop": TernaryRecipe(str(source), args.head, "ternary-generic-loop", lean=False),
                **{name: LoadedExport(path, name) for name, path in sorted(built.items())}}
    print(f"backends: {', '.join(backends)}; not built: {skipped or 'none'}", flush=True)
    cfg = RunConfig.model_validate({"validate": {
        "batch_sizes": args.batches, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "repeats": args.rounds, "max_repeats": args.rounds, "threads": args.threads, "perplexity_batches": 1,
        "worker_timeout_s": 900}}).validate_
    rows = torch.randint(0, tokenizer.vocab_size, (max(8, *args.batches), args.prompt_len + 64),
                         generator=torch.Generator().manual_seed(args.seed))
    report = validate(backends, "ternary", rows, cfg, rows)
    paired = ratios(report)
    (args.out / "engines.json").write_text(json.dumps({"report": report, "ternary_vs": paired,
                                                       "skipped": skipped, "command": args.command,
                                                       "load_average": os.getloadavg()}, indent=1, default=str))
    text = markdown(report, paired, args, skipped)
    (args.out / "engines.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
