"""Export a causal LM to ONNX with the KV cache as graph inputs and outputs.

Graph interface (one graph serves prefill and decode):
  inputs   input_ids [batch, seq] int64,
           past_key_{i} / past_value_{i} [batch, kv_heads, past_len, head_dim] float32
           (prefill feeds past tensors whose past_len axis is 0)
  outputs  logits [batch, seq, vocab] float32,
           present_key_{i} / present_value_{i} [batch, kv_heads, past_len + seq, head_dim]
Positions are derived from past_len inside the graph, so there are no position or
attention-mask inputs: rows of a batch share one length (no padding), as in the torch loop.

Exporter: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript). It handles both
the built-in Transformer (through `BuiltinKVWrapper`) and transformers-5 Llama models
(through `HFKVWrapper`, which builds the DynamicCache inside the traced module), so the
legacy TorchScript exporter is not used. Two quirks shape the code below:
  * torch.export specialises any dynamic axis whose example size is 0 or 1, so the
    example inputs use batch 2, seq 3 and past_len 2; the exported graph is still valid
    for batch 1 and past_len 0 (the tests run both).
  * the built-in Transformer's attention branches in Python on past_len == 0 and
    new_len == 1; a symbolic shape cannot take a branch, so the wrapper uses one explicit
    mask that is correct for every (past_len, seq) and reuses the model's own submodules.
    The parity check compares the graph against the unwrapped model, so a drift between
    the two would fail the export instead of passing silently.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ryzen_core import RyzenError, hf_forward_with_cache

FORMAT = "ryzen-onnx"
FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "export.json"
# 18 is the oldest opset the dynamo exporter writes natively; asking for 17 goes through a
# version converter that produces an invalid Split node.
DEFAULT_OPSET = 18
# Above this many parameter bytes the weights go to model.onnx.data: protobuf caps a
# single message at 2 GiB.
EXTERNAL_DATA_BYTES = 1_500_000_000
# Linear layers lower to MatMul (or Gemm when they carry a bias); attention's
# activation x activation MatMuls are left in float (MatMulConstBOnly, the dynamic default).
INT8_OP_TYPES = ("MatMul", "Gemm")


class ExportError(RyzenError):
    """The model or the export directory cannot be handled; the message is one line."""

    exit_code = 2


@dataclass(frozen=True)
class KVLayout:
    """What the runtime needs to know to feed and grow the cache."""

    kind: str  # "builtin" or "hf:<model_type>"
    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    # The built-in model has a learned position table: positions past it do not exist.
    # RoPE models extrapolate, so their context length is advisory.
    hard_context_limit: bool

    def input_names(self) -> list[str]:
        return ["input_ids"] + [f"past_{kv}_{i}" for i in range(self.layers) for kv in ("key", "value")]

    def output_names(self) -> list[str]:
        return ["logits"] + [f"present_{kv}_{i}" for i in range(self.layers) for kv in ("key", "value")]


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


class BuiltinKVWrapper(nn.Module):
    """ryzen_core Transformer with flat past tensors in and flat present tensors out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        model, config = self.model, self.model.config
        batch, new_len = input_ids.shape
        past_len = past[0].shape[2]
        positions = torch.arange(new_len, device=input_ids.device) + past_len
        x = model.emb_dropout(model.tok_emb(input_ids) + model.pos_emb(positions))
        # Query i sits at absolute position past_len + i and sees keys 0 .. past_len + i;
        # this single mask covers prefill, decode and chunked prefill.
        key_positions = torch.arange(past_len + new_len, device=input_ids.device)
        mask = key_positions.unsqueeze(0) <= positions.unsqueeze(1)
        presents: list[torch.Tensor] = []
        for layer_index, block in enumerate(model.blocks):
            attn = block.attn
            q, k, v = attn.qkv(block.norm_attn(x)).split(config.d_model, dim=2)
            q, k, v = (t.view(batch, new_len, attn.n_heads, attn.head_dim).transpose(1, 2) for t in (q, k, v))
            k = torch.cat([past[2 * layer_index], k], dim=2)
            v = torch.cat([past[2 * layer_index + 1], v], dim=2)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            y = y.transpose(1, 2).reshape(batch, new_len, config.d_model)
            x = x + attn.resid_dropout(attn.proj(y))
            x = x + block.mlp(block.norm_mlp(x))
            presents += [k, v]
        logits = model.lm_head(model.norm_final(x))
        return (logits, *presents)


class HFKVWrapper(nn.Module):
    """A transformers causal LM whose DynamicCache is built from, and flattened back to, plain tensors."""

    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids: torch.Tensor, past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        batch, new_len = input_ids.shape
        past_len = past[0].shape[2]
        cache = DynamicCache(config=self.model.config)
        for layer_index in range(self.layers):
            cache.update(past[2 * layer_index], past[2 * layer_index + 1], layer_index)
        positions = (torch.arange(new_len, device=input_ids.device) + past_len).unsqueeze(0).expand(batch, new_len)
        logits, cache = hf_forward_with_cache(self.model, cache, input_ids=input_ids, position_ids=positions)
        presents: list[torch.Tensor] = []
        for layer in cache.layers:
            presents += [layer.keys, layer.values]
        return (logits, *presents)


def kv_layout(model: nn.Module) -> KVLayout:
    """The cache layout of a built-in Transformer or a transformers causal LM."""
    from ryzen_core import Transformer, is_hf_model

    inner = unwrap(model)
    if isinstance(inner, Transformer):
        config = inner.config
        return KVLayout("builtin", config.n_layers, config.n_heads, config.head_dim, config.vocab_size,
                        config.context_length, hard_context_limit=True)
    if is_hf_model(inner):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        config = inner.config.get_text_config(decoder=True)
        # The graph's cache grows without bound; sliding-window layers would need their
        # window inside the graph, so they are refused rather than exported wrong.
        layer_kinds = {type(layer).__name__ for layer in DynamicCache(config=inner.config).layers
                       if type(layer) is not DynamicLayer}
        if layer_kinds:
            raise ExportError(f"{type(inner).__name__}: cache layers {sorted(layer_kinds)} are not supported "
                              "by the onnx export (only full-attention DynamicLayer)")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return KVLayout(f"hf:{config.model_type}", config.num_hidden_layers, kv_heads, head_dim,
                        config.vocab_size, int(getattr(config, "max_position_embeddings", 0) or 0),
                        hard_context_limit=False)
    raise ExportError(f"cannot export a {type(inner).__name__}: expected a ryzen_core Transformer "
                      "or a transformers PreTrainedModel")


def kv_wrapper(model: nn.Module, layout: KVLayout) -> nn.Module:
    inner = unwrap(model)
    return BuiltinKVWrapper(inner) if layout.kind == "builtin" else HFKVWrapper(inner, layout.layers)


def empty_past(layout: KVLayout, batch: int) -> list[torch.Tensor]:
    """Past tensors with a 0-length past_len axis: what prefill feeds."""
    return [torch.zeros(batch, layout.kv_heads, 0, layout.head_dim) for _ in range(2 * layout.layers)]


@contextlib.contextmanager
def _quiet_exporter():
    # The exporter logs one warning per missing torchvision op on every call; they are
    # irrelevant to language models and drown the run log.
    # Two warnings are expected on every export and say nothing about this model: the
    # past_len/batch axes shared by several inputs "will not be used" as names (they are
    # used once), and a pytree deprecation inside torch.export.
    registration_logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous = registration_logger.level
    registration_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used", category=UserWarning)
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        registration_logger.setLevel(previous)


def _export_graph(wrapper: nn.Module, layout: KVLayout, path: Path, opset: int, external_data: bool) -> None:
    from torch.export import Dim

    # Sizes >= 2 so that torch.export keeps every axis symbolic (see the module docstring).
    example_batch, example_seq, example_past = 2, 3, 2
    # A private generator: exporting must not advance the caller's global RNG.
    input_ids = torch.randint(0, layout.vocab_size, (example_batch, example_seq),
                              generator=torch.Generator().manual_seed(0))
    past = tuple(torch.zeros(example_batch, layout.kv_heads, example_past, layout.head_dim)
                 for _ in range(2 * layout.layers))
    batch, seq, past_len = Dim("batch"), Dim("seq"), Dim("past_len")
    dynamic_shapes = ({0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in past))
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            wrapper, (input_ids, past), str(path), dynamo=True, opset_version=opset,
            input_names=layout.input_names(), output_names=layout.output_names(),
            dynamic_shapes=dynamic_shapes, external_data=external_data, optimize=True, verbose=False,
        )


def _written_opset(path: Path) -> int:
    import onnx

    graph_model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in graph_model.opset_import if entry.domain in ("", "ai.onnx"))


def _parameter_bytes(model: nn.Module) -> int:
    unique = {id(p): p for p in model.parameters()}  # tied weights once
    return sum(p.numel() * 4 for p in unique.values())


def export_files(export_dir: Path) -> list[Path]:
    """The files of the graph (model.onnx plus its external weights, if any)."""
    return sorted(p for p in export_dir.iterdir() if p.name.startswith(MODEL_FILE))


POSITION_TABLES = ("pos_emb.weight", "cos_cache")  # the fused graph's learned positions / rotary table


def graph_facts(model_path: str | Path) -> tuple[int, int | None]:
    """From one read of the graph (weights left on disk): the bytes of constants a decode step reads (all
    but tables only indexed by a Gather: a lookup reads one row) and the rows of the fused graph's position
    table (the positions it can address; None without one)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    read_otherwise = {name for n in graph.node if n.op_type != "Gather" for name in n.input}
    weight_bytes = 0
    for init in graph.initializer:
        if init.name in gathered and init.name not in read_otherwise:
            continue
        external = {entry.key: entry.value for entry in init.external_data}
        weight_bytes += (int(external["length"]) if "length" in external
                         else len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes)
    positions = next((int(init.dims[0]) for init in graph.initializer if init.name in POSITION_TABLES), None)
    return weight_bytes, positions


def export_size_bytes(export_dir: str | Path) -> int:
    return sum(p.stat().st_size for p in export_files(Path(export_dir)))


def write_manifest(export_dir: Path, manifest: dict[str, Any]) -> None:
    (export_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(export_dir: str | Path) -> dict[str, Any] | None:
    """export.json of one of our exports, or None when the directory is not one."""
    path = Path(export_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    return manifest


def fresh_dir(out_dir: Path) -> None:
    # Never merge into an older export: stale external-data files would be picked up.
    if out_dir.exists():
        if read_manifest(out_dir) is None and any(out_dir.iterdir()):
            raise ExportError(f"{out_dir} exists, is not empty and is not an onnx export; refusing to overwrite it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)


def export_onnx(model: nn.Module, tokenizer: Any, out_dir: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Export `model` (fp32) with its KV cache to out_dir/model.onnx, plus the tokenizer and export.json.

    `tokenizer` is a ryzen_core Tokenizer (saved with `Tokenizer.save`) or None.
    Returns out_dir. The model is put in eval mode for the export and restored after.
    """
    out_dir = Path(out_dir)
    layout = kv_layout(model)
    inner = unwrap(model)
    if any(p.dtype != torch.float32 for p in inner.parameters()):
        raise ExportError("onnx export needs float32 weights; call model.float() first "
                          f"(found {sorted({str(p.dtype) for p in inner.parameters()})})")
    fresh_dir(out_dir)
    external_data = _parameter_bytes(inner) > EXTERNAL_DATA_BYTES
    was_training = inner.training
    inner.eval()
    try:
        _export_graph(kv_wrapper(inner, layout).eval(), layout, out_dir / MODEL_FILE, opset, external_data)
    finally:
        inner.train(was_training)
    if tokenizer is not None:
        tokenizer.save(out_dir)
    write_manifest(out_dir, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "precision": "fp32",
        **asdict(layout),
        "eos_token_id": getattr(tokenizer, "eos_id", None),
        "input_names": layout.input_names(),
        "output_names": layout.output_names(),
        "opset": _written_opset(out_dir / MODEL_FILE),
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "external_data": external_data,
        "tokenizer": tokenizer is not None,
    })
    return out_dir


def _fold_transposed_weights(graph_model):
    """Give each MatMul fed by Transpose(initializer) its own pre-transposed initializer.

    A tied LM head reads the embedding table through a Transpose (the table is shared with
    the Gather, so the exporter cannot fold it); the dynamic quantizer only quantizes a
    MatMul whose B is an initializer, so without this the largest matmul of a small model,
    vocab x d_model, would stay fp32. The Gather keeps the fp32 table.
    """
    from onnx import numpy_helper

    graph = graph_model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    folded: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        transpose = producers.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        if perm not in (None, [1, 0]):
            continue
        source = transpose.input[0]
        if source not in folded:
            weight = numpy_helper.to_array(initializers[source])
            if weight.ndim != 2:
                continue
            folded[source] = f"{source}.transposed"
            graph.initializer.append(numpy_helper.from_array(weight.T.copy(), folded[source]))
        node.input[1] = folded[source]
    # Drop Transposes nobody reads any more.
    consumed = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    dead = [node for node in graph.node if node.op_type == "Transpose" and not set(node.output) & consumed]
    for node in dead:
        graph.node.remove(node)
    return graph_model


def quantize_int8(fp32_dir: str | Path, out_dir: str | Path, *, per_channel: bool = True,
                  reduce_range: bool = False) -> Path:
    """Dynamic int8 quantization of an fp32 export into a sibling export directory.

    Weights of MatMul/Gemm become QInt8 (symmetric), activations are quantized to uint8
    per call at run time. Defaults, for CPUs with VNNI (AVX-512 VNNI or AVX-VNNI):
      * per_channel=True: one scale per output column keeps small-norm columns from being
        flushed by the tensor-wide max (the scales are applied to the int32 accumulator,
        where a vector costs no more than a scalar).
      * reduce_range=False: 7-bit weights only help on CPUs without VNNI, where the
        u8 x s8 multiply-add (VPMADDUBSW) can saturate its int16 intermediate; VNNI
        accumulates straight to int32, so the 8th bit is free accuracy.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_dir, out_dir = Path(fp32_dir), Path(out_dir)
    manifest = read_manifest(fp32_dir)
    if manifest is None or manifest.get("precision") != "fp32":
        raise ExportError(f"{fp32_dir} is not an fp32 onnx export")
    if out_dir.resolve() == fp32_dir.resolve():
        raise ExportError("the int8 export needs its own directory")
    fresh_dir(out_dir)
    # The quantizer logs a root-level warning suggesting pre-processing (symbolic shape
    # inference + ORT fusions); sessions apply the same fusions at load time anyway.
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            _fold_transposed_weights(onnx.load(str(fp32_dir / MODEL_FILE))), out_dir / MODEL_FILE, op_types_to_quantize=list(INT8_OP_TYPES),
            per_channel=per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8,
            use_external_data_format=bool(manifest.get("external_data")),
            # The fused graph's contrib ops have no shape inference in onnx; their outputs are float.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(previous)
    for name in ("tokenizer.json", "tokenizer_config.json", "genai_config.json"):
        if (fp32_dir / name).is_file():
            shutil.copy2(fp32_dir / name, out_dir / name)
    write_manifest(out_dir, {
        **manifest,
        "precision": "int8",
        "quantization": {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8",
                         "activation_type": "QUInt8 (dynamic)", "op_types": list(INT8_OP_TYPES),
                         "per_channel": per_channel, "reduce_range": reduce_range},
    })
    return out_dir
