"""The OpenVINO model of a GPT-2 or Llama HF model, written from its weights with OpenVINO's graph API.

What users who pick OpenVINO run is what optimum-intel exports, and this writes the same kind
of model: stateful (the KV cache lives inside the model as ReadValue/Assign variables, one
pair per layer), ScaledDotProductAttention, every linear layer a MatMul against its own
constant [out, in] weight (what nncf's weight compression rewrites to int8/int4).

  inputs   input_ids [batch, seq] i64, attention_mask [batch, past + seq] i64,
           position_ids [batch, seq] i64, beam_idx [batch] i32 (the rows of the cache each
           row continues: arange(batch) for plain decoding)
  output   logits [batch, seq, vocab] f32
  state    past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim] f32

Per layer the cache is ReadValue -> Gather(beam_idx) -> Concat(new keys, sequence axis) ->
[Unsqueeze -> Broadcast -> Reshape for grouped-query heads] -> ScaledDotProductAttention, and
the Concat also feeds the Assign: the pattern OpenVINO's CPU plugin fuses into its attention
with an in-place cache (StatefulSDPAFusion). OpenVINO's `causal=True` masks top-left aligned
(query i sees keys 0..i), wrong once there is a past, so the mask is explicit: query i of L
new tokens, at absolute position S - L + i, sees keys 0..S - L + i whose attention_mask is 1.

A request's state persists across infer calls: reset it (`reset_state()`) before each new sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .manifest import EngineSkipped

MASKED = float(np.finfo(np.float32).min)  # added to masked scores; finite, so a row with no key is not NaN
GELU_MODES = {"gelu": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
ROPE_TYPES = ("default", "linear", "llama3")  # inv_freq fixed by the config; others change with the length


def _ops():
    import openvino.opset13 as ops

    return ops


def _f32(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().to(torch.float32).cpu().numpy())


def _i64(*values: int):
    return _ops().constant(np.array(values, dtype=np.int64))


@dataclass(frozen=True)
class AttentionShape:
    """What the attention of every layer needs to know."""

    heads: int
    kv_heads: int
    head_dim: int


@dataclass
class Inputs:
    """The model's parameters and what every layer shares: the batch size node and the attention mask."""

    input_ids: Any
    attention_mask: Any
    position_ids: Any
    beam_idx: Any
    batch: Any = None  # [1] i64
    mask: Any = None  # [batch, 1, seq, past + seq] f32, 0 where a query may attend, MASKED elsewhere

    @classmethod
    def create(cls) -> "Inputs":
        ops = _ops()

        def parameter(name: str, rank: int, dtype) -> Any:
            node = ops.parameter([-1] * rank, dtype, name=name)
            node.output(0).get_tensor().set_names({name})
            return node

        made = cls(parameter("input_ids", 2, np.int64), parameter("attention_mask", 2, np.int64),
                   parameter("position_ids", 2, np.int64), parameter("beam_idx", 1, np.int32))
        made.batch = ops.gather(ops.shape_of(made.input_ids), _i64(0), _i64(0))
        made.mask = made.attention_bias()
        return made

    def parameters(self) -> list:
        return [self.input_ids, self.attention_mask, self.position_ids, self.beam_idx]

    def attention_bias(self) -> Any:
        ops = _ops()
        total = ops.gather(ops.shape_of(self.attention_mask), _i64(1), _i64(0))  # S = past + L, [1]
        new = ops.gather(ops.shape_of(self.input_ids), _i64(1), _i64(0))  # L, [1]
        scalar = lambda node: ops.squeeze(node, _i64(0))  # noqa: E731
        one = ops.constant(np.int64(1))
        keys = ops.range(ops.constant(np.int64(0)), scalar(total), one, "i64")
        queries = ops.range(scalar(ops.subtract(total, new)), scalar(total), one, "i64")
        causal = ops.less_equal(ops.unsqueeze(keys, _i64(0)), ops.unsqueeze(queries, _i64(1)))  # [L, S]
        present = ops.unsqueeze(ops.greater(self.attention_mask, ops.constant(np.int64(0))), _i64(1, 2))
        allowed = ops.logical_and(ops.unsqueeze(causal, _i64(0, 1)), present)  # [B, 1, L, S]
        return ops.select(allowed, ops.constant(np.float32(0)), ops.constant(np.float32(MASKED)))


def linear(x: Any, weight_out_in: np.ndarray, bias: np.ndarray | None = None) -> Any:
    """x @ W^T (+ b): MatMul with the [out, in] weight transposed, as nn.Linear and optimum-intel's models have it.
    An all-zero bias (the built-in model's GPT-2 form) is left out."""
    ops = _ops()
    out = ops.matmul(x, ops.constant(np.ascontiguousarray(weight_out_in, dtype=np.float32)), False, True)
    if bias is not None and np.any(bias):
        out = ops.add(out, ops.constant(np.ascontiguousarray(bias, dtype=np.float32)))
    return out


def layer_norm(x: Any, gamma: np.ndarray, beta: np.ndarray | None, eps: float) -> Any:
    ops = _ops()
    out = ops.multiply(ops.mvn(x, _i64(-1), True, eps, "inside_sqrt"), ops.constant(gamma))
    return ops.add(out, ops.constant(beta)) if beta is not None and np.any(beta) else out


def rms_norm(x: Any, gamma: np.ndarray, eps: float) -> Any:
    """HF's LlamaRMSNorm, x / sqrt(mean(x^2) + eps) * gamma, in the form OpenVINO's RMS fusion matches."""
    ops = _ops()
    mean_square = ops.reduce_mean(ops.power(x, ops.constant(np.float32(2))), _i64(-1), True)
    root = ops.sqrt(ops.add(mean_square, ops.constant(np.float32(eps))))
    return ops.multiply(ops.multiply(x, ops.divide(ops.constant(np.float32(1)), root)), ops.constant(gamma))


def heads_first(x: Any, heads: int, head_dim: int) -> Any:
    """[B, L, heads * head_dim] -> [B, heads, L, head_dim]."""
    ops = _ops()
    return ops.transpose(ops.reshape(x, _i64(0, 0, heads, head_dim), True), _i64(0, 2, 1, 3))


def rotary_tables(inputs: Inputs, inv_freq: np.ndarray, scaling: float) -> tuple[Any, Any]:
    """cos and sin [B, 1, L, head_dim] at position_ids, computed as HF's LlamaRotaryEmbedding does (float32)."""
    ops = _ops()
    positions = ops.unsqueeze(ops.convert(inputs.position_ids, "f32"), _i64(2))  # [B, L, 1]
    freqs = ops.multiply(positions, ops.constant(inv_freq.astype(np.float32).reshape(1, 1, -1)))
    angles = ops.unsqueeze(ops.concat([freqs, freqs], -1), _i64(1))
    cos, sin = ops.cos(angles), ops.sin(angles)
    if scaling != 1.0:
        cos = ops.multiply(cos, ops.constant(np.float32(scaling)))
        sin = ops.multiply(sin, ops.constant(np.float32(scaling)))
    return cos, sin


def apply_rotary(x: Any, cos: Any, sin: Any) -> Any:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] (HF Llama's convention, not interleaved)."""
    ops = _ops()
    first, second = ops.split(x, ops.constant(np.int64(-1)), 2).outputs()
    rotated = ops.concat([ops.negative(second), first], -1)
    return ops.add(ops.multiply(x, cos), ops.multiply(rotated, sin))


def cached(inputs: Inputs, new: Any, name: str, shape: AttentionShape) -> tuple[Any, Any]:
    """The cache variable `name` with `new` [B, kv_heads, L, D] appended: (past + new, its Assign)."""
    from openvino import PartialShape, Type
    from openvino.op import assign
    from openvino.op.util import Variable, VariableInfo

    ops = _ops()
    info = VariableInfo()
    info.variable_id, info.data_type = name, Type.f32
    info.data_shape = PartialShape([-1, shape.kv_heads, -1, shape.head_dim])
    variable = Variable(info)
    empty_shape = ops.concat([inputs.batch, _i64(shape.kv_heads, 0, shape.head_dim)], 0)
    empty = ops.broadcast(ops.constant(np.float32(0)), empty_shape)
    past = ops.gather(ops.read_value(empty, variable), inputs.beam_idx, ops.constant(np.int64(0)))
    whole = ops.concat([past, new], 2)
    return whole, assign(whole, variable)


def repeat_kv(kv: Any, shape: AttentionShape) -> Any:
    """[B, kv_heads, S, D] -> [B, heads, S, D], each kv head serving heads / kv_heads query heads."""
    if shape.heads == shape.kv_heads:
        return kv
    ops = _ops()
    groups = shape.heads // shape.kv_heads
    spread = ops.broadcast(ops.unsqueeze(kv, _i64(2)), _i64(1, 1, groups, 1, 1), broadcast_spec="BIDIRECTIONAL")
    return ops.reshape(spread, _i64(0, shape.heads, -1, shape.head_dim), True)


def attention(inputs: Inputs, qkv: Any, layer: int, shape: AttentionShape, sinks: list,
              rotary: tuple[Any, Any] | None) -> Any:
    """Self-attention of one layer from its fused qkv projection [B, L, (heads + 2 kv_heads) * D]; returns
    [B, L, heads * D] and appends the layer's two Assigns to `sinks`."""
    ops = _ops()
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    q, k, v = ops.variadic_split(qkv, ops.constant(np.int64(-1)), _i64(q_width, kv_width, kv_width)).outputs()
    q, k, v = heads_first(q, shape.heads, shape.head_dim), *(heads_first(t, shape.kv_heads, shape.head_dim)
                                                               for t in (k, v))
    if rotary is not None:
        q, k = (apply_rotary(t, *rotary) for t in (q, k))
    keys, assign_k = cached(inputs, k, f"past_key_values.{layer}.key", shape)
    values, assign_v = cached(inputs, v, f"past_key_values.{layer}.value", shape)
    sinks += [assign_k, assign_v]
    scale = ops.constant(np.float32(shape.head_dim ** -0.5))
    out = ops.scaled_dot_product_attention(q, repeat_kv(keys, shape), repeat_kv(values, shape), inputs.mask, scale,
                                           causal=False)
    return ops.reshape(ops.transpose(out, _i64(0, 2, 1, 3)), _i64(0, 0, q_width), True)


def finish(inputs: Inputs, logits: Any, sinks: list, name: str):
    import openvino as ov

    result = _ops().result(logits)
    result.output(0).get_tensor().set_names({"logits"})
    return ov.Model([result], sinks, inputs.parameters(), name)


def build_gpt2(model: Any):
    """GPT2LMHeadModel (what hf_source writes for the built-in model): learned positions, pre-LayerNorm,
    fused qkv (Conv1D weights are [in, out]), GELU MLP."""
    config = model.config
    if not getattr(config, "scale_attn_weights", True) or getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise EngineSkipped("GPT-2 attention scaling other than 1/sqrt(head_dim) is not written by the builder")
    if config.activation_function not in GELU_MODES:
        raise EngineSkipped(f"GPT-2 activation {config.activation_function!r} is not written by the builder")
    ops = _ops()
    heads = config.n_head
    shape = AttentionShape(heads, heads, config.n_embd // heads)
    body, inputs, sinks = model.transformer, Inputs.create(), []
    tokens = ops.gather(ops.constant(_f32(body.wte.weight)), inputs.input_ids, ops.constant(np.int64(0)))
    positions = ops.gather(ops.constant(_f32(body.wpe.weight)), inputs.position_ids, ops.constant(np.int64(0)))
    x = ops.add(tokens, positions)
    eps = config.layer_norm_epsilon
    for i, block in enumerate(body.h):
        h = layer_norm(x, _f32(block.ln_1.weight), _f32(block.ln_1.bias), eps)
        qkv = linear(h, _f32(block.attn.c_attn.weight).T, _f32(block.attn.c_attn.bias))
        out = attention(inputs, qkv, i, shape, sinks, rotary=None)
        x = ops.add(x, linear(out, _f32(block.attn.c_proj.weight).T, _f32(block.attn.c_proj.bias)))
        h = layer_norm(x, _f32(block.ln_2.weight), _f32(block.ln_2.bias), eps)
        up = ops.gelu(linear(h, _f32(block.mlp.c_fc.weight).T, _f32(block.mlp.c_fc.bias)),
                      GELU_MODES[config.activation_function])
        x = ops.add(x, linear(up, _f32(block.mlp.c_proj.weight).T, _f32(block.mlp.c_proj.bias)))
    hidden = layer_norm(x, _f32(body.ln_f.weight), _f32(body.ln_f.bias), eps)
    # A tied head gets its own constant: nncf compresses a MatMul's weight, the Gather keeps the table.
    return finish(inputs, linear(hidden, _f32(model.lm_head.weight)), sinks, "ryzen-gpt2")


def build_llama(model: Any):
    """LlamaForCausalLM: RMSNorm, rotary positions, grouped-query attention, SiLU-gated MLP."""
    config = model.config
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise EngineSkipped(f"rope_type {rope.get('rope_type')!r} is not written by the builder")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise EngineSkipped(f"hidden_act {config.hidden_act!r} is not written by the builder")
    ops = _ops()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    shape = AttentionShape(heads, config.num_key_value_heads or heads, head_dim)
    body, inputs, sinks = model.model, Inputs.create(), []
    rotary_emb = body.rotary_emb
    inv_freq = rotary_emb.inv_freq.detach().to(torch.float32).cpu().numpy()
    if inv_freq.size * 2 != head_dim:
        raise EngineSkipped(f"partial rotary ({inv_freq.size * 2} of {head_dim} dims) is not written by the builder")
    rotary = rotary_tables(inputs, inv_freq, float(getattr(rotary_emb, "attention_scaling", 1.0)))
    x = ops.gather(ops.constant(_f32(body.embed_tokens.weight)), inputs.input_ids, ops.constant(np.int64(0)))
    bias = lambda linear_module: None if linear_module.bias is None else _f32(linear_module.bias)  # noqa: E731
    for i, layer in enumerate(body.layers):
        attn, mlp = layer.self_attn, layer.mlp
        h = rms_norm(x, _f32(layer.input_layernorm.weight), layer.input_layernorm.variance_epsilon)
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        biases = [bias(p) for p in projections]
        qkv_bias = None if all(b is None for b in biases) else np.concatenate(
            [b if b is not None else np.zeros(p.out_features, np.float32) for b, p in zip(biases, projections)])
        qkv = linear(h, np.concatenate([_f32(p.weight) for p in projections]), qkv_bias)
        out = attention(inputs, qkv, i, shape, sinks, rotary)
        x = ops.add(x, linear(out, _f32(attn.o_proj.weight), bias(attn.o_proj)))
        norm = layer.post_attention_layernorm
        h = rms_norm(x, _f32(norm.weight), norm.variance_epsilon)
        gate = ops.swish(linear(h, _f32(mlp.gate_proj.weight), bias(mlp.gate_proj)))
        gated = ops.multiply(gate, linear(h, _f32(mlp.up_proj.weight), bias(mlp.up_proj)))
        x = ops.add(x, linear(gated, _f32(mlp.down_proj.weight), bias(mlp.down_proj)))
    hidden = rms_norm(x, _f32(body.norm.weight), body.norm.variance_epsilon)
    return finish(inputs, linear(hidden, _f32(model.lm_head.weight), bias(model.lm_head)), sinks, "ryzen-llama")


BUILDERS = {"gpt2": build_gpt2, "llama": build_llama}


def build_model(hf_model: Any):
    """The stateful OpenVINO model (`openvino.Model`) of a GPT-2 or Llama HF model; EngineSkipped for others."""
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    if model_type not in BUILDERS:
        raise EngineSkipped(f"the OpenVINO builder writes {' and '.join(BUILDERS)} models, not {model_type!r}")
    with torch.inference_mode():
        return BUILDERS[model_type](hf_model)
