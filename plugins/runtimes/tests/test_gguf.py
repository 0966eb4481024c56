"""GGUF for llama.cpp: what the file holds, read back with gguf's own reader (no llama.cpp needed),
and, where llama-cpp-python is installed, llama.cpp itself on the file."""
from __future__ import annotations

import numpy as np
import pytest
import tokenizers
import torch

from ryzen_core import generate, lm_logits
from ryzen_plugin_runtimes.gguf_engine import MODEL_FILE, hf_tensors, rope_permute, write_gguf
from ryzen_plugin_runtimes.hf_source import write_hf_source
from ryzen_plugin_runtimes.manifest import write_manifest
from ryzen_plugin_runtimes.plugin import load_backend
from ryzen_plugin_runtimes.texts import IDENTITY_TEXTS

gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install gguf)")


@pytest.fixture(scope="module", params=["builtin", "llama"])
def source(request, tokenizer, tmp_path_factory):
    model = request.getfixturevalue(f"{request.param}_model")
    return model, write_hf_source(model, tokenizer, tmp_path_factory.mktemp("hf"))


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {name: reader.get_field(name).contents() for name in reader.fields}
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    return fields, tensors, {t.name: t.tensor_type.name for t in reader.tensors}


def test_tokenizer_metadata_round_trips_and_tokenizes_like_ryzen(source, tokenizer, tmp_path):
    _, directory = source
    fields, _, _ = read(write_gguf(directory, tmp_path / "model.gguf", "F16"))
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    control = [i for i, kind in enumerate(fields["tokenizer.ggml.token_type"]) if kind == gguf.TokenType.CONTROL]
    assert control == [tokenizer.eos_id]
    # A byte-level BPE rebuilt from nothing but the GGUF fields must give Ryzen's ids on the fixed texts.
    tokens, merges = fields["tokenizer.ggml.tokens"], [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
    rebuilt = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    rebuilt.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    for text in IDENTITY_TEXTS:
        assert rebuilt.encode(text).ids == tokenizer.encode(text), text


def test_model_metadata_matches_the_config(source, tmp_path):
    model, directory = source
    fields, _, _ = read(write_gguf(directory, tmp_path / "model.gguf", "Q8_0"))
    arch = fields["general.architecture"]
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    if arch == "gpt2":
        cfg = model.config
        expected = {"context_length": cfg.context_length, "embedding_length": cfg.d_model, "block_count": cfg.n_layers,
                    "feed_forward_length": cfg.d_ff, "attention.head_count": cfg.n_heads}
    else:
        cfg = model.config
        expected = {"context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
                    "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
                    "attention.head_count": cfg.num_attention_heads,
                    "attention.head_count_kv": cfg.num_key_value_heads,
                    "rope.dimension_count": cfg.hidden_size // cfg.num_attention_heads}
    assert {key: fields[f"{arch}.{key}"] for key in expected} == expected


@pytest.mark.parametrize("precision, tolerance", [("F16", 2e-3), ("Q8_0", 2e-2), ("Q4_0", 0.3)])
def test_weights_round_trip_within_the_precision(source, tmp_path, precision, tolerance):
    """Every HF tensor is in the file under llama.cpp's name and layout, and reads back within the precision."""
    model, directory = source
    _, tensors, types = read(write_gguf(directory, tmp_path / "model.gguf", precision))
    import json

    config = json.loads((directory / "config.json").read_text())
    expected = hf_tensors(directory, config)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, config["model_type"].upper()), 2)
    assert len(tensors) == len(expected)
    for hf_name, weight in expected.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        got = tensors[name].reshape(weight.shape)
        scale = max(float(np.abs(weight).max()), 1e-6)
        assert float(np.abs(got - weight).max()) <= tolerance * scale, (name, types[name])
        if weight.ndim == 2 and precision != "F16" and not name.startswith("position_embd"):
            assert types[name] == precision, name


def test_tq2_0_holds_ternary_weights_and_keeps_embeddings_and_head_in_f16(tokenizer, tmp_path):
    """llama.cpp's ternary format: weights already ternary per tensor (t * scale, as the bitnet plugin trains
    them) read back as themselves, up to the fp16 block scale; embeddings and LM head stay F16."""
    import json

    from ryzen_core import hf_model_from_config, tiny_llama_config

    torch.manual_seed(0)  # rows of 256 and 512: whole TQ2_0 blocks
    model = hf_model_from_config(tiny_llama_config(vocab_size=tokenizer.vocab_size, hidden=256, layers=1, heads=4,
                                                   kv_heads=2, intermediate=512))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                scale = module.weight.abs().mean()
                module.weight.copy_((module.weight / scale).round().clamp(-1, 1) * scale)
    directory = write_hf_source(model, tokenizer, tmp_path / "hf")
    _, tensors, types = read(write_gguf(directory, tmp_path / "model.gguf", "TQ2_0"))
    expected = hf_tensors(directory, json.loads((directory / "config.json").read_text()))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)
    for hf_name, weight in expected.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if weight.ndim == 1:
            continue
        if name.split(".")[0] in ("token_embd", "output"):
            assert types[name] == "F16", name
            continue
        assert types[name] == "TQ2_0", name
        got = tensors[name].reshape(weight.shape)
        assert np.allclose(got, weight, rtol=1e-3, atol=0), name  # the per-block scale is stored in fp16


def test_rope_permutation_is_a_reordering_of_rows():
    weight = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    permuted = rope_permute(weight, heads=2)
    # Per head of 4 rows, HF's halves (0,1 | 2,3) become llama.cpp's adjacent pairs (0,2,1,3).
    assert permuted[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]
    assert sorted(permuted.ravel().tolist()) == weight.ravel().tolist()


# ----------------------------------------------------------------------------- llama.cpp itself


@pytest.fixture(scope="module")
def llamacpp_exports(source, tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds from source; "
                        "pip install 'ryzen-plugin-runtimes[llamacpp]')")
    model, directory = source
    exports = {}
    for precision in ("F16", "Q8_0"):
        out = tmp_path_factory.mktemp(precision)
        write_gguf(directory, out / MODEL_FILE, precision)
        context = model.config.context_length if hasattr(model.config, "context_length") else None
        write_manifest(out, "llamacpp", precision, name=f"llamacpp-{precision.lower()}", file=MODEL_FILE,
                       context_length=context)
        exports[precision] = load_backend(out)
    return model, exports


def test_llamacpp_tokenizes_like_ryzen(llamacpp_exports, tokenizer):
    _, exports = llamacpp_exports
    for text in IDENTITY_TEXTS:
        assert exports["F16"].encode(text) == tokenizer.encode(text), text


def test_llamacpp_f16_logits_and_greedy_tokens_follow_torch(llamacpp_exports, prompts):
    model, exports = llamacpp_exports
    with torch.inference_mode():
        expected = lm_logits(model, prompts)
        expected_ids = generate(model, prompts, 8)
    got = exports["F16"].logits(prompts)
    # F16 weights, and llama.cpp's GELU is the tanh approximation: close, not equal.
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    steps = []
    out = exports["F16"].generate(prompts, 8, on_token=steps.append)
    assert steps == list(range(8)) and out.shape == expected_ids.shape
    assert (out == expected_ids).float().mean() >= 0.8


def test_llamacpp_decodes_a_batch_together_as_each_row_alone(llamacpp_exports, prompts):
    """Rows of a batch are separate sequences of one llama.cpp context: the same logits as the
    one-sequence `Llama` gives for each row (prefill and cached steps), and no row sees another."""
    _, exports = llamacpp_exports
    backend = exports["Q8_0"]
    together = backend.generate(prompts, 6)
    alone = torch.cat([backend.generate(prompts[i:i + 1], 6) for i in range(len(prompts))])
    assert backend.sequences.keys() == {1, len(prompts)}
    assert torch.equal(together, alone)
    context = backend.sequences[len(prompts)]
    context.reset()
    prompt_logits = context.step(prompts.numpy())
    step_logits = context.step(together[:, prompts.shape[1]:prompts.shape[1] + 1].numpy())
    whole = backend.logits(together[:, :prompts.shape[1] + 1])
    # Q8_0 products of a batch and of one row take different kernels: equal to rounding, not bit for bit.
    np.testing.assert_allclose(prompt_logits, whole[:, -2].numpy(), atol=1e-2 * float(whole.abs().max()))
    np.testing.assert_allclose(step_logits, whole[:, -1].numpy(), atol=1e-2 * float(whole.abs().max()))
    with pytest.raises(ValueError, match="exceed"):
        context.step(np.zeros((len(prompts), context.capacity), dtype=np.int64))


def test_matrices_are_stored_as_nn_linear_weights_out_by_in(source, tmp_path):
    """llama.cpp reads every matrix as [out, in] (ne0 = in), which is nn.Linear's layout: checked against the
    torch model's own modules, not against the converter's reading of the HF files."""
    model, directory = source
    _, tensors, _ = read(write_gguf(directory, tmp_path / "model.gguf", "F16"))

    def same(name: str, weight: torch.Tensor) -> None:
        expected = weight.detach().float().numpy()
        np.testing.assert_allclose(tensors[name].reshape(expected.shape), expected, atol=2e-3 * np.abs(expected).max())

    if hasattr(model, "blocks"):  # the built-in model as llama.cpp's gpt2
        block = model.blocks[0]
        same("token_embd.weight", model.tok_emb.weight)
        same("blk.0.attn_qkv.weight", block.attn.qkv.weight)
        same("blk.0.attn_output.weight", block.attn.proj.weight)
        same("blk.0.ffn_up.weight", block.mlp.up.weight)
        same("blk.0.ffn_down.weight", block.mlp.down.weight)
        same("output.weight", model.lm_head.weight)
    else:
        layer, heads = model.model.layers[0], model.config.num_attention_heads
        q = rope_permute(layer.self_attn.q_proj.weight.detach().numpy(), heads)
        same("blk.0.attn_q.weight", torch.from_numpy(q))
        same("blk.0.attn_v.weight", layer.self_attn.v_proj.weight)
        same("blk.0.ffn_gate.weight", layer.mlp.gate_proj.weight)
        same("output.weight", model.lm_head.weight)
