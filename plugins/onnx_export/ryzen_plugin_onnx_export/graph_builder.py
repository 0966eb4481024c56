"""Write the decoder graph a fast runtime wants, node by node, from the model's weights.

The dynamo exporter (export.py) traces the torch forward and gets 300-400 nodes with the
KV cache concatenated into fresh buffers every step. This builder writes the graph the way
onnxruntime-genai's model builder does, with onnxruntime's fused contrib ops:

  Gather (token [+ position] embedding)
  per layer:  [Skip]LayerNorm -> MatMul(qkv, packed) -> GroupQueryAttention -> MatMul(out)
              SkipLayerNorm -> MatMul(up) -> Gelu -> MatMul(down)      (built-in model)
              SkipSimplifiedLayerNorm -> MatMul(gate), MatMul(up) -> SiLU * up -> MatMul(down)
                                                                       (Llama)
  SkipLayerNorm (final) -> MatMul(lm_head)

about 8-9 nodes per layer. GroupQueryAttention reads and writes the cache in place when
past and present are bound to one buffer (`past_present_share_buffer`), applies rotary
embeddings itself (Llama) and masks by `seqlens_k`, so decode copies no cache. Every
linear layer is a MatMul with a constant [in, out] weight, which is what
onnxruntime's weight-only quantizer (MatMulNBits) rewrites for int8/int4.

Interface (the names optimum's ORTModelForCausalLM and onnxruntime-genai expect):
  inputs   input_ids [batch, seq] int64, attention_mask [batch, total] int64,
           position_ids [batch, seq] int64,
           past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim] float32
  outputs  logits [batch, seq, vocab] float32,
           present.{i}.key / .value [batch, kv_heads, max(total, past), head_dim]
`past` may be the real past length (present grows, as with optimum) or a preallocated
buffer bound to present too (decode writes in place, as onnxruntime-genai does).
Rows of a batch share one length: GroupQueryAttention assumes right padding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .export import KVLayout

OPSET = 17  # LayerNormalization
MS_DOMAIN = "com.microsoft"


class UnsupportedModel(Exception):
    """The builder cannot write this model exactly; the caller falls back to the traced export."""


def input_names(layers: int) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    return names + [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def output_names(layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


@dataclass
class _Graph:
    """Nodes and initializers being written; names are unique by construction."""

    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)

    def weight(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> list[str]:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def matmul(self, x: str, linear: nn.Linear, name: str) -> str:
        """x @ W^T for an nn.Linear without bias: MatMul with the [in, out] weight as a constant."""
        return self.matmul_weight(x, _fp32(linear.weight).T, name)

    def matmul_weight(self, x: str, weight_in_out: np.ndarray, name: str) -> str:
        b = self.weight(f"{name}.weight", weight_in_out)
        return self.node("MatMul", [x, b], [f"{name}/out"], name)[0]


def _fp32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().numpy()


def _plain_linear(module: Any, what: str) -> nn.Linear:
    # A quantized or wrapped layer would be silently exported as something else.
    if type(module) is not nn.Linear or module.weight.dtype != torch.float32:
        raise UnsupportedModel(f"{what} is {type(module).__name__}, not a plain float32 nn.Linear")
    if module.bias is not None:
        raise UnsupportedModel(f"{what} has a bias")
    return module


def _attention_inputs(g: _Graph) -> tuple[str, str]:
    """seqlens_k (int32 [batch], total length - 1 per row) and total_sequence_length (int32 scalar)."""
    one = g.weight("const.one", np.array(1, dtype=np.int64))
    axis = g.weight("const.axis1", np.array([1], dtype=np.int64))
    total = g.node("ReduceSum", ["attention_mask", axis], ["mask/row_len"], "mask/ReduceSum", keepdims=0)[0]
    last = g.node("Sub", [total, one], ["mask/row_len_minus_1"], "mask/Sub")[0]
    seqlens = g.node("Cast", [last], ["seqlens_k"], "mask/Cast", to=6)[0]  # int32
    shape = g.node("Shape", ["attention_mask"], ["mask/shape"], "mask/Shape")[0]
    width = g.node("Gather", [shape, one], ["mask/width"], "mask/Gather", axis=0)[0]
    total_len = g.node("Cast", [width], ["total_sequence_length"], "mask/CastTotal", to=6)[0]
    return seqlens, total_len


def _attention(g: _Graph, x: str, qkv_weight: np.ndarray, i: int, heads: int, kv_heads: int, head_dim: int,
               seqlens: str, total_len: str, rotary: tuple[str, str] | None) -> str:
    qkv = g.matmul_weight(x, qkv_weight, f"layers.{i}.attn.qkv")
    cos, sin = rotary if rotary else ("", "")
    past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    outputs = [f"layers.{i}.attn/out", f"present.{i}.key", f"present.{i}.value"]
    g.node("GroupQueryAttention", [qkv, "", "", *past, seqlens, total_len, cos, sin], outputs,
           f"layers.{i}.attn.GroupQueryAttention", domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv_heads,
           do_rotary=int(rotary is not None), rotary_interleaved=0, scale=float(head_dim ** -0.5))
    return outputs[0]


def _norm(g: _Graph, x: str, residual: str | None, gamma: np.ndarray, eps: float, name: str,
          simplified: bool) -> tuple[str, str]:
    """LayerNorm (or RMSNorm) of x + residual; returns (normed, x + residual)."""
    w = g.weight(f"{name}.weight", gamma)
    if residual is None:
        op, domain = ("SimplifiedLayerNormalization", "") if simplified else ("LayerNormalization", "")
        out = g.node(op, [x, w], [f"{name}/out"], name, domain=domain, axis=-1, epsilon=eps)[0]
        return out, x
    op = "SkipSimplifiedLayerNormalization" if simplified else "SkipLayerNormalization"
    out, _, _, total = g.node(op, [x, residual, w], [f"{name}/out", "", "", f"{name}/sum"], name,
                              domain=MS_DOMAIN, epsilon=eps)
    return out, total


@dataclass(frozen=True)
class BuiltGraph:
    model: Any  # onnx.ModelProto
    layout: KVLayout


def _builtin_layers(g: _Graph, model: nn.Module) -> tuple[str, str, float]:
    """The built-in Transformer's blocks; returns (last block's output, its residual sum, eps)."""
    config = model.config
    seqlens, total_len = _attention_inputs(g)
    tok = g.node("Gather", [g.weight("tok_emb.weight", _fp32(model.tok_emb.weight)), "input_ids"],
                 ["tok_emb/out"], "tok_emb", axis=0)[0]
    pos = g.node("Gather", [g.weight("pos_emb.weight", _fp32(model.pos_emb.weight)), "position_ids"],
                 ["pos_emb/out"], "pos_emb", axis=0)[0]
    x = g.node("Add", [tok, pos], ["embed/out"], "embed")[0]
    delta: str | None = None
    eps = 1e-5
    for i, block in enumerate(model.blocks):
        for norm in (block.norm_attn, block.norm_mlp):
            if type(norm) is not nn.LayerNorm or norm.bias is not None:
                raise UnsupportedModel(f"blocks.{i} norm is not a bias-free LayerNorm")
        if type(block.mlp.activation) is not nn.GELU or block.mlp.activation.approximate != "none":
            raise UnsupportedModel(f"blocks.{i}.mlp.activation is {block.mlp.activation!r}, not exact GELU")
        eps = block.norm_attn.eps
        h, x = _norm(g, delta or x, x if delta else None, _fp32(block.norm_attn.weight), eps,
                     f"layers.{i}.norm_attn", simplified=False)
        qkv = _fp32(_plain_linear(block.attn.qkv, f"blocks.{i}.attn.qkv").weight).T
        attn = _attention(g, h, qkv, i, config.n_heads, config.n_heads, config.head_dim, seqlens, total_len, None)
        attn = g.matmul(attn, _plain_linear(block.attn.proj, f"blocks.{i}.attn.proj"), f"layers.{i}.attn.proj")
        h, x = _norm(g, attn, x, _fp32(block.norm_mlp.weight), block.norm_mlp.eps, f"layers.{i}.norm_mlp",
                     simplified=False)
        up = g.matmul(h, _plain_linear(block.mlp.up, f"blocks.{i}.mlp.up"), f"layers.{i}.mlp.up")
        act = g.node("Gelu", [up], [f"layers.{i}.mlp.gelu/out"], f"layers.{i}.mlp.gelu", domain=MS_DOMAIN)[0]
        delta = g.matmul(act, _plain_linear(block.mlp.down, f"blocks.{i}.mlp.down"), f"layers.{i}.mlp.down")
    return delta, x, eps


def build_builtin(model: nn.Module) -> BuiltGraph:
    """The graph of a ryzen_core Transformer (LayerNorm, learned positions, GELU MLP)."""
    config = model.config
    if config.head_dim % 8:
        raise UnsupportedModel(f"head_dim {config.head_dim} is not a multiple of 8 (GroupQueryAttention)")
    g = _Graph()
    delta, x, _ = _builtin_layers(g, model)
    norm = model.norm_final
    hidden, _ = _norm(g, delta, x, _fp32(norm.weight), norm.eps, "norm_final", simplified=False)
    head = _plain_linear(model.lm_head, "lm_head")
    # A tied head gets its own [in, out] copy: the Gather needs [vocab, d] and the quantizer
    # rewrites only a MatMul whose B is a constant of its own.
    g.matmul_weight(hidden, _fp32(head.weight).T, "lm_head")
    _rename_output(g, "lm_head/out", "logits")
    return _finish(g, "builtin", config.n_layers, config.n_heads, config.head_dim, config.vocab_size,
                   config.context_length, hard_limit=True)


def _rotary_caches(g: _Graph, rotary_emb: nn.Module, positions: int, head_dim: int) -> tuple[str, str]:
    inv_freq = rotary_emb.inv_freq.detach().to(torch.float64).cpu()
    scaling = float(getattr(rotary_emb, "attention_scaling", 1.0))
    if inv_freq.numel() * 2 != head_dim:
        raise UnsupportedModel(f"partial rotary ({inv_freq.numel() * 2} of {head_dim} dims)")
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)
    cos = (angles.cos() * scaling).to(torch.float32).numpy()
    sin = (angles.sin() * scaling).to(torch.float32).numpy()
    return g.weight("cos_cache", cos), g.weight("sin_cache", sin)


def build_llama(model: nn.Module, max_positions: int) -> BuiltGraph:
    """The graph of a transformers LlamaForCausalLM (RMSNorm, rotary, SiLU-gated MLP, GQA)."""
    config = model.config
    if config.model_type != "llama":
        raise UnsupportedModel(f"model_type {config.model_type!r} (the builder writes llama)")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise UnsupportedModel(f"rope_type {rope.get('rope_type')!r} changes with the sequence length")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {config.hidden_act!r}")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim % 16:
        raise UnsupportedModel(f"head_dim {head_dim} is not a multiple of 16 (GroupQueryAttention rotary)")
    positions = min(int(config.max_position_embeddings), max_positions)
    body = model.model
    g = _Graph()
    seqlens, total_len = _attention_inputs(g)
    rotary = _rotary_caches(g, body.rotary_emb, positions, head_dim)
    embed = g.weight("embed_tokens.weight", _fp32(body.embed_tokens.weight))
    x = g.node("Gather", [embed, "input_ids"], ["embed/out"], "embed_tokens", axis=0)[0]
    delta: str | None = None
    for i, layer in enumerate(body.layers):
        attn, mlp = layer.self_attn, layer.mlp
        h, x = _norm(g, delta or x, x if delta else None, _fp32(layer.input_layernorm.weight),
                     layer.input_layernorm.variance_epsilon, f"layers.{i}.input_layernorm", simplified=True)
        qkv = np.concatenate([_fp32(_plain_linear(p, f"layers.{i}.self_attn.{n}").weight)
                              for n, p in (("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj))])
        out = _attention(g, h, qkv.T, i, heads, kv_heads, head_dim, seqlens, total_len, rotary)
        out = g.matmul(out, _plain_linear(attn.o_proj, f"layers.{i}.self_attn.o_proj"), f"layers.{i}.attn.o_proj")
        norm = layer.post_attention_layernorm
        h, x = _norm(g, out, x, _fp32(norm.weight), norm.variance_epsilon, f"layers.{i}.post_attention_layernorm",
                     simplified=True)
        gate = g.matmul(h, _plain_linear(mlp.gate_proj, f"layers.{i}.mlp.gate_proj"), f"layers.{i}.mlp.gate_proj")
        up = g.matmul(h, _plain_linear(mlp.up_proj, f"layers.{i}.mlp.up_proj"), f"layers.{i}.mlp.up_proj")
        sigmoid = g.node("Sigmoid", [gate], [f"layers.{i}.mlp.sigmoid/out"], f"layers.{i}.mlp.sigmoid")[0]
        silu = g.node("Mul", [gate, sigmoid], [f"layers.{i}.mlp.silu/out"], f"layers.{i}.mlp.silu")[0]
        gated = g.node("Mul", [silu, up], [f"layers.{i}.mlp.gated/out"], f"layers.{i}.mlp.gated")[0]
        delta = g.matmul(gated, _plain_linear(mlp.down_proj, f"layers.{i}.mlp.down_proj"), f"layers.{i}.mlp.down_proj")
    hidden, _ = _norm(g, delta, x, _fp32(body.norm.weight), body.norm.variance_epsilon, "norm", simplified=True)
    g.matmul_weight(hidden, _fp32(_plain_linear(model.lm_head, "lm_head").weight).T, "lm_head")
    _rename_output(g, "lm_head/out", "logits")
    return _finish(g, "hf:llama", config.num_hidden_layers, kv_heads, head_dim, config.vocab_size, positions,
                   hard_limit=True)


def _rename_output(g: _Graph, old: str, new: str) -> None:
    for node in g.nodes:
        node.output[:] = [new if name == old else name for name in node.output]


def _finish(g: _Graph, kind: str, layers: int, kv_heads: int, head_dim: int, vocab: int, context: int,
            hard_limit: bool) -> BuiltGraph:
    from onnx import TensorProto, helper

    def tensor(name, elem, shape):
        return helper.make_tensor_value_info(name, elem, shape)

    kv = lambda length: ["batch", kv_heads, length, head_dim]  # noqa: E731
    inputs = [tensor("input_ids", TensorProto.INT64, ["batch", "seq"]),
              tensor("attention_mask", TensorProto.INT64, ["batch", "total"]),
              tensor("position_ids", TensorProto.INT64, ["batch", "seq"])]
    inputs += [tensor(name, TensorProto.FLOAT, kv("past")) for name in input_names(layers)[3:]]
    outputs = [tensor("logits", TensorProto.FLOAT, ["batch", "seq", vocab])]
    outputs += [tensor(name, TensorProto.FLOAT, kv("present")) for name in output_names(layers)[1:]]
    graph = helper.make_graph(g.nodes, f"ryzen-{kind}", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(graph, producer_name="ryzen-onnx-builder",
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    return BuiltGraph(model, KVLayout(kind, layers, kv_heads, head_dim, vocab, context, hard_limit))


def build_graph(model: nn.Module, max_positions: int = 8192) -> BuiltGraph:
    """The fused graph of `model`, or UnsupportedModel when it cannot be written exactly."""
    from ryzen_core import Transformer, is_hf_model

    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, Transformer):
        return build_builtin(inner)
    if is_hf_model(inner):
        return build_llama(inner, max_positions)
    raise UnsupportedModel(f"{type(inner).__name__} is neither a ryzen_core Transformer nor a transformers model")
