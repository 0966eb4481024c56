"""Write the builder's fused graph as an export directory, and quantize its weights.

An export directory holds model.onnx (plus model.onnx.data above EXTERNAL_DATA_BYTES),
export.json (our manifest), genai_config.json (so onnxruntime-genai can run it) and the
tokenizer. Quantization is weight-only: onnxruntime's MatMulNBitsQuantizer rewrites every
MatMul with a constant weight into MatMulNBits, int8 or int4, symmetric, one fp32 scale per
block of `block_size` input rows. With accuracy_level 4 the kernel quantizes each
activation block to int8 on the fly and multiplies in int8 (VNNI where the CPU has it);
this is what onnxruntime-genai's model builder writes for the CPU.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch.nn as nn

from .export import (EXTERNAL_DATA_BYTES, FORMAT, MODEL_FILE, ExportError, fresh_dir, unwrap,
                     write_manifest, read_manifest)
from .graph_builder import BuiltGraph, build_graph, input_names, output_names

GRAPH = "fused"
FORMAT_VERSION = 2
GENAI_CONFIG = "genai_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
QUANTIZED_BITS = {"int8": 8, "int4": 4}


def _save(graph_model: Any, path: Path) -> bool:
    """Write the graph; weights go to model.onnx.data when they would pass protobuf's 2 GiB cap."""
    import onnx

    external = graph_model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save_model(graph_model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{path.name}.data")
    return external


def genai_config(built: BuiltGraph, hidden_size: int, heads: int, eos_id: int | None) -> dict[str, Any]:
    """onnxruntime-genai's description of a decoder-only model with a shared past/present buffer."""
    eos = 0 if eos_id is None else int(eos_id)
    return {
        "model": {
            "type": "llama",  # genai's generic decoder-only pipeline; the graph itself carries the architecture
            "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos,
            "context_length": built.layout.context_length, "vocab_size": built.layout.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE, "head_size": built.layout.head_dim, "hidden_size": hidden_size,
                "num_attention_heads": heads, "num_hidden_layers": built.layout.layers,
                "num_key_value_heads": built.layout.kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": built.layout.context_length, "min_length": 0,
                   "past_present_share_buffer": True, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "repetition_penalty": 1.0, "early_stopping": True, "num_return_sequences": 1},
    }


def _shape(model: nn.Module) -> tuple[int, int]:
    """(hidden size, attention heads) of a built-in or HF model."""
    config = unwrap(model).config
    if hasattr(config, "d_model"):
        return config.d_model, config.n_heads
    return config.hidden_size, config.num_attention_heads


def export_fused(model: nn.Module, tokenizer: Any, out_dir: str | Path, *, max_positions: int = 8192) -> Path:
    """Build the fused fp32 graph of `model` into out_dir. Raises graph_builder.UnsupportedModel
    (before touching out_dir) when the builder cannot write the model exactly."""
    import onnxruntime

    out_dir = Path(out_dir)
    built = build_graph(model, max_positions=max_positions)
    fresh_dir(out_dir)
    external = _save(built.model, out_dir / MODEL_FILE)
    eos = getattr(tokenizer, "eos_id", None)
    if tokenizer is not None:
        tokenizer.save(out_dir)
    hidden, heads = _shape(model)
    (out_dir / GENAI_CONFIG).write_text(json.dumps(genai_config(built, hidden, heads, eos), indent=2) + "\n",
                                        encoding="utf-8")
    write_manifest(out_dir, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "graph": GRAPH, "precision": "fp32",
        **asdict(built.layout), "eos_token_id": eos,
        "input_names": input_names(built.layout.layers), "output_names": output_names(built.layout.layers),
        "nodes": len(built.model.graph.node),
        "exporter": f"ryzen graph_builder (onnxruntime {onnxruntime.__version__} contrib ops)",
        "external_data": external, "tokenizer": tokenizer is not None,
    })
    return out_dir


def quantize_weights(fp32_dir: str | Path, out_dir: str | Path, *, precision: str, block_size: int = 32,
                     accuracy_level: int = 4) -> Path:
    """Weight-only MatMulNBits quantization (int8 or int4) of a fused fp32 export into out_dir."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    fp32_dir, out_dir = Path(fp32_dir), Path(out_dir)
    manifest = read_manifest(fp32_dir)
    if manifest is None or manifest.get("precision") != "fp32" or manifest.get("graph") != GRAPH:
        raise ExportError(f"{fp32_dir} is not a fused fp32 onnx export")
    if precision not in QUANTIZED_BITS:
        raise ExportError(f"precision must be one of {sorted(QUANTIZED_BITS)}, got {precision!r}")
    if out_dir.resolve() == fp32_dir.resolve():
        raise ExportError("the quantized export needs its own directory")
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_dir / MODEL_FILE)), bits=QUANTIZED_BITS[precision],
                                     block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level)
    # The quantizer logs one INFO line per MatMul at the root logger.
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        root.setLevel(previous)
    fresh_dir(out_dir)
    external = _save(quantizer.model.model, out_dir / MODEL_FILE)
    for name in (*TOKENIZER_FILES, GENAI_CONFIG):
        if (fp32_dir / name).is_file():
            shutil.copy2(fp32_dir / name, out_dir / name)
    write_manifest(out_dir, {
        **manifest, "precision": precision, "external_data": external,
        "nodes": len(quantizer.model.model.graph.node),
        "quantization": {"method": "onnxruntime MatMulNBitsQuantizer (weight-only, round to nearest)",
                         "bits": QUANTIZED_BITS[precision], "block_size": block_size, "symmetric": True,
                         "accuracy_level": accuracy_level},
    })
    return out_dir
