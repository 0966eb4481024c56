"""Hook implementations of the onnx plugin (entry-point name `onnx`); its command is in cli.py.

The plugin keeps no state between hooks, so the hooks are module functions. Heavy imports (torch,
onnx, onnxruntime) happen inside them: this module is imported whenever the `ryzen` command
starts, and `ryzen plugins` must stay fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ryzen_core import ExportResult, PluginSettings, hookimpl

FP32_DIR, INT8_DIR, INT4_DIR = "onnx-fp32", "onnx-int8", "onnx-int4"


class OnnxSettings(PluginSettings):
    graph: Literal["fused", "traced"] = "fused"
    """'fused': the graph written by graph_builder (GroupQueryAttention over an in-place KV buffer, fused norms,
    rotary inside attention), for the built-in model and Llama; other models fall back to 'traced' (the torch
    dynamo export) with the reason recorded. 'traced' always uses the dynamo export."""
    int8: bool = True
    """Also write an int8 export next to the fp32 one."""
    int4: bool = True
    """Also write an int4 export (weight-only MatMulNBits; fused graph only)."""
    int8_method: Literal["weight-only", "dynamic"] = "weight-only"
    """int8: 'weight-only' MatMulNBits (block-wise int8 weights, what onnxruntime-genai writes) or 'dynamic'
    (onnxruntime quantize_dynamic: per-column int8 weights, activations quantized per call)."""
    block_size: Literal[16, 32, 64, 128, 256] = 32
    """Weight-only quantization: input rows per weight scale."""
    accuracy_level: int = Field(4, ge=0, le=4)
    """Weight-only quantization: MatMulNBits compute type; 4 multiplies in int8 with activations quantized per
    block on the fly (onnxruntime-genai's CPU default), 0 dequantizes the weights to fp32."""
    max_positions: int = Field(8192, ge=16, le=1 << 20)
    """Fused graph of a rotary model: positions in the cos/sin tables (the export's context limit)."""
    per_channel: bool = True
    """Dynamic int8: one weight scale per output column (more accurate, same speed)."""
    reduce_range: bool | Literal["auto"] = "auto"
    """Dynamic int8: 7-bit weights. 'auto' uses them only where the CPU has no VNNI (AVX-512 VNNI or AVX-VNNI):
    there the u8 x s8 multiply-add goes through an int16 intermediate that 8-bit weights can saturate."""
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    """onnxruntime graph optimization level of the sessions this plugin creates."""
    threads: int | None = Field(None, gt=0, le=1024)
    """onnxruntime intra-op threads; default: one per physical core."""
    inter_op_threads: int = Field(1, gt=0, le=1024)
    """onnxruntime inter-op threads (sessions run sequentially; a decoder graph is a chain)."""
    allow_spinning: bool | None = None
    """Let onnxruntime workers spin between steps. Default (None): on only in a validator worker process that runs
    this backend alone, where spinning cannot slow anything else; off when sharing a process with torch."""
    opset: int = Field(18, ge=18, le=21)
    """Traced export: ONNX opset (18-21 tested; the dynamo exporter writes 18 natively and 17 comes out invalid)."""
    fp32_tolerance: float = Field(1e-3, gt=0)
    """fp32 parity: max |logit difference| torch vs onnxruntime."""
    int8_tolerance: float = Field(0.1, gt=0)
    """int8 parity: max |logit difference| as a fraction of the largest |torch logit|."""
    int8_min_top1: float = Field(0.9, ge=0, le=1)
    """int8 parity: least fraction of positions whose argmax matches torch."""
    int4_tolerance: float = Field(0.3, gt=0)
    """int4 parity: max |logit difference| as a fraction of the largest |torch logit|."""
    int4_min_top1: float = Field(0.75, ge=0, le=1)
    """int4 parity: least fraction of positions whose argmax matches torch."""
    parity_tokens: int = Field(64, ge=9)
    """Held-out tokens per row (2 rows) for the logits check; capped by the context length."""
    parity_new_tokens: int = Field(16, ge=1)
    """Greedy tokens generated from an 8-token prompt per row for the generation check."""


def resolve_reduce_range(setting: bool | str) -> tuple[bool, str]:
    """The reduce_range to quantize with, and why."""
    if isinstance(setting, bool):
        return setting, "set in config"
    from ryzen_core import cpu_features

    cpu = cpu_features()
    if cpu.vnni:
        return False, f"CPU has {'avx512_vnni' if cpu.has('avx512_vnni') else 'avx_vnni'}: int8 products accumulate straight to int32, 8-bit weights are safe"
    return True, "CPU has no VNNI: 7-bit weights keep the int16 intermediate of VPMADDUBSW from saturating"


def write_exports(model: Any, tokenizer: Any, export_dir: Path, settings: OnnxSettings,
                  record: Any) -> dict[str, Path]:
    """The fp32 export and its quantized siblings, by precision."""
    from .export import export_onnx, quantize_int8
    from .fused_export import export_fused, quantize_weights
    from .graph_builder import UnsupportedModel

    fp32_dir = export_dir / FP32_DIR
    fused = settings.graph == "fused"
    if fused:
        try:
            export_fused(model, tokenizer, fp32_dir, max_positions=settings.max_positions)
        except UnsupportedModel as exc:
            record("fused_graph_unavailable", reason=str(exc), fallback="traced")
            fused = False
    if not fused:
        export_onnx(model, tokenizer, fp32_dir, opset=settings.opset)
    directories = {"fp32": fp32_dir}
    weight_only = {"block_size": settings.block_size, "accuracy_level": settings.accuracy_level}
    if settings.int8 and fused and settings.int8_method == "weight-only":
        directories["int8"] = quantize_weights(fp32_dir, export_dir / INT8_DIR, precision="int8", **weight_only)
    elif settings.int8:
        reduce_range, why = resolve_reduce_range(settings.reduce_range)
        record("int8_format", per_channel=settings.per_channel, reduce_range=reduce_range, reason=why)
        directories["int8"] = quantize_int8(fp32_dir, export_dir / INT8_DIR, per_channel=settings.per_channel,
                                            reduce_range=reduce_range)
    if settings.int4 and fused:
        directories["int4"] = quantize_weights(fp32_dir, export_dir / INT4_DIR, precision="int4", **weight_only)
    elif settings.int4:
        record("int4_skipped", reason="int4 needs the fused graph (weight-only MatMulNBits)")
    return directories


def export_and_check(model: Any, tokenizer: Any, export_dir: str | Path, settings: OnnxSettings | None = None,
                     record: Any = None) -> ExportResult:
    """Export fp32 (and int8, int4) under export_dir and check each against the torch model.

    Returns what on_export returns: the exports that passed, their live backends, and in `details`
    their parity numbers (`parity`) and sizes in bytes (`sizes_bytes`), by backend name. Raises
    ParityError when the fp32 export misses its tolerance; a quantized export that misses its own
    is dropped and recorded (`export_dropped`, with the numbers)."""
    from .export import export_size_bytes, kv_layout
    from .parity import PROMPT_TOKENS, ParityError, check_parity, parity_token_ids
    from .runtime import load_export

    settings = settings or OnnxSettings()
    record = record or (lambda event, **data: None)
    export_dir = Path(export_dir)
    layout = kv_layout(model)
    n_tokens = settings.parity_tokens
    new_tokens = settings.parity_new_tokens
    if layout.hard_context_limit:
        n_tokens = min(n_tokens, layout.context_length)
        new_tokens = max(1, min(new_tokens, layout.context_length - PROMPT_TOKENS))
    token_ids = parity_token_ids(tokenizer, n_tokens, layout.vocab_size)
    tolerances = {"fp32_tolerance": settings.fp32_tolerance, "int8_tolerance": settings.int8_tolerance,
                  "int8_min_top1": settings.int8_min_top1, "int4_tolerance": settings.int4_tolerance,
                  "int4_min_top1": settings.int4_min_top1}
    result = ExportResult(details={"parity": {}, "sizes_bytes": {}})
    for precision, directory in write_exports(model, tokenizer, export_dir, settings, record).items():
        backend = load_export(directory, threads=settings.threads, graph_optimization=settings.graph_optimization,
                              inter_op_threads=settings.inter_op_threads, allow_spinning=settings.allow_spinning)
        size = export_size_bytes(directory)
        record("export", backend=backend.name, path=str(directory), bytes=size, graph=backend.manifest.get("graph", "traced"),
               nodes=backend.manifest.get("nodes"))
        try:
            parity = check_parity(model, backend, token_ids, precision=precision, new_tokens=new_tokens, **tolerances)
        except ParityError as exc:
            if precision == "fp32":  # the graph itself is wrong: nothing built on it can be trusted
                raise
            # A quantized copy too coarse for this model is dropped; the others stand.
            record("export_dropped", backend=backend.name, path=str(directory), reason=str(exc))
            continue
        record("parity", **parity)
        result.exports[backend.name] = directory
        result.backends[backend.name] = backend
        result.details["parity"][backend.name] = parity
        result.details["sizes_bytes"][backend.name] = size
    return result


@hookimpl
def ryzen_settings():
    return OnnxSettings


@hookimpl
def on_export(model, tokenizer, export_dir, settings, record):
    return export_and_check(model, tokenizer, export_dir, settings, record)


@hookimpl
def load_backend(path):
    from .export import read_manifest
    from .runtime import load_export

    if path is None or read_manifest(path) is None:
        return None
    return load_export(path)


@hookimpl
def register_commands(cli):
    from .cli import generate_command

    cli.add_command(generate_command)
