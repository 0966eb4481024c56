"""llama.cpp: a GGUF file written with the `gguf` package, run through llama-cpp-python.

The built-in model goes in as llama.cpp's `gpt2` architecture, an HF Llama as `llama`. The
tokenizer is written as `tokenizer.ggml.model = gpt2` (byte-level BPE: the token strings in
id order and the merges in rank order) with the GPT-2 pre-tokenizer, which splits text as the
`tokenizers` ByteLevel pre-tokenizer Ryzen trains with.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ryzen_core import OnToken

from .loop import check_request, decode_loop, default_threads
from .manifest import EngineSkipped, write_manifest

ENGINE = "llamacpp"
PRECISIONS = ("F16", "Q8_0", "Q4_0", "TQ2_0")
TERNARY = ("TQ2_0",)  # llama.cpp's lossless format for BitNet b1.58 weights; lossy for any other model
MODEL_FILE = "model.gguf"
ARCHITECTURES = {"gpt2": "gpt2", "llama": "llama"}
CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def missing() -> str | None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "gguf is not installed (pip install gguf)"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install 'ryzen-plugin-runtimes[llamacpp]', builds from source)"
    return None


# ----------------------------------------------------------------------------- writing


def export(source: Path, out_dir: Path, precision: str, details: dict[str, Any]) -> Path:
    write_gguf(source, out_dir / MODEL_FILE, precision)
    write_manifest(out_dir, ENGINE, precision, file=MODEL_FILE, **details)
    return out_dir


def write_gguf(source: Path, path: Path, precision: str) -> Path:
    """The HF directory `source` (weights and tokenizer) as one GGUF file with weights in `precision`."""
    import gguf

    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    arch = ARCHITECTURES.get(config.get("model_type"))
    if arch is None:
        raise EngineSkipped(f"no GGUF mapping for model_type {config.get('model_type')!r} "
                            f"(have {sorted(ARCHITECTURES)})")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(source.name)
    writer.add_file_type(getattr(gguf.LlamaFileType, "MOSTLY_" + precision))
    (add_gpt2_hparams if arch == "gpt2" else add_llama_hparams)(writer, config)
    add_tokenizer(writer, source)
    tensors = hf_tensors(source, config)
    layers = hparam(config, "n_layer", "num_hidden_layers")
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), layers)
    for hf_name, tensor in tensors.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise EngineSkipped(f"no GGUF name for tensor {hf_name}")
        add_weight(writer, name, tensor, precision)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hparam(config: dict[str, Any], *keys: str) -> Any:
    return next(config[k] for k in keys if k in config)


def add_gpt2_hparams(writer, config: dict[str, Any]) -> None:
    writer.add_context_length(config["n_positions"])
    writer.add_embedding_length(config["n_embd"])
    writer.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
    writer.add_block_count(config["n_layer"])
    writer.add_head_count(config["n_head"])
    writer.add_layer_norm_eps(config["layer_norm_epsilon"])


def add_llama_hparams(writer, config: dict[str, Any]) -> None:
    heads = config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or {}  # transformers 5 moved rope_theta in here
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))


def hf_tensors(source: Path, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Float32 weights of the HF directory, in the layouts llama.cpp expects."""
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors.update({k: v.astype(np.float32) for k, v in load_file(str(file)).items()})
    if not tensors:
        raise EngineSkipped(f"{source} has no safetensors weights")
    tensors = {k: v for k, v in tensors.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    embedding = "transformer.wte.weight" if config["model_type"] == "gpt2" else "model.embed_tokens.weight"
    tensors.setdefault("lm_head.weight", tensors[embedding])  # tied embeddings are saved once
    for name in tensors:
        if name.endswith(CONV1D_SUFFIXES) and config["model_type"] == "gpt2":
            tensors[name] = np.ascontiguousarray(tensors[name].T)  # HF Conv1D is [in, out]; GGUF wants [out, in]
    if config["model_type"] == "llama":
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        for name in [n for n in tensors if n.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight"))]:
            tensors[name] = rope_permute(tensors[name], heads if ".q_proj" in name else kv_heads)
    return tensors


def rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF rotates the two halves of each head; llama.cpp rotates adjacent pairs. Reorder the rows to match."""
    rows = weight.shape[0]
    return np.ascontiguousarray(
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape))


def add_weight(writer, name: str, tensor: np.ndarray, precision: str) -> None:
    """Matrices in `precision`; vectors and position embeddings in float32, and matrices whose rows do not
    fill whole quantization blocks in float16 (the block formats cannot hold them), as are a ternary file's
    embeddings and LM head."""
    import gguf

    if tensor.ndim == 1 or name.startswith("position_embd"):
        writer.add_tensor(name, tensor.astype(np.float32))
        return
    qtype = getattr(gguf.GGMLQuantizationType, precision)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    # A ternary model keeps its embeddings and LM head in full precision (BitNet b1.58); F16 as bitnet.cpp does.
    full_precision = precision in TERNARY and name.split(".")[0] in ("token_embd", "output")
    if precision == "F16" or full_precision or tensor.shape[-1] % block:
        writer.add_tensor(name, tensor.astype(np.float16))
        return
    writer.add_tensor(name, gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)


def add_tokenizer(writer, source: Path) -> None:
    """Ryzen's byte-level BPE as GGUF's `gpt2` tokenizer model; the eos token is also bos (GPT-2's way)."""
    import gguf

    tokenizer = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    tokens, types, merges = gguf_vocabulary(tokenizer)
    eos_token = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))["eos_token"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos_id = tokens.index(eos_token)
    writer.add_eos_token_id(eos_id)
    writer.add_bos_token_id(eos_id)
    writer.add_add_bos_token(False)


def gguf_vocabulary(tokenizer: dict[str, Any]) -> tuple[list[str], list[int], list[str]]:
    """Token strings by id, their GGUF types (added special tokens are CONTROL) and "left right" merges."""
    import gguf

    model = tokenizer["model"]
    if model.get("type") != "BPE":
        raise EngineSkipped(f"the tokenizer is {model.get('type')}, GGUF's gpt2 tokenizer needs byte-level BPE")
    by_id = {i: t for t, i in model["vocab"].items()}
    special = {}
    for added in tokenizer.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        special[added["id"]] = added.get("special", False)
    if sorted(by_id) != list(range(len(by_id))):
        raise EngineSkipped("token ids are not contiguous from 0; GGUF stores tokens by position")
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [int(gguf.TokenType.CONTROL if special.get(i) else gguf.TokenType.NORMAL) for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


# ----------------------------------------------------------------------------- running


class LlamaCppBackend:
    """A GGUF file run by llama.cpp: generation decodes all rows of a batch together in one context
    (llamacpp_context.py); full-sequence logits and the tokenizer go through llama-cpp-python's `Llama`."""

    def __init__(self, directory: str | Path, manifest: dict[str, Any], threads: int | None = None):
        from llama_cpp import Llama

        self.directory = Path(directory)
        self.name = manifest["name"]
        self.context_length: int | None = manifest.get("context_length")
        self.threads = default_threads(threads)
        self.model_path = self.directory / manifest.get("file", MODEL_FILE)
        # n_ctx 0: the context the GGUF file states (a Llama's max_position_embeddings).
        self.llama = Llama(model_path=str(self.model_path), n_ctx=self.context_length or 0,
                           n_batch=self.context_length or 2048, n_threads=self.threads, n_threads_batch=self.threads,
                           logits_all=True, verbose=False)
        self.max_positions = self.llama.n_ctx()
        self.sequences: dict[int, Any] = {}  # batch size -> LlamaCppSequences, kept: making one allocates its cache

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = check_request(input_ids, context_length=self.context_length)
        rows = []
        for row in ids.tolist():
            self.llama.reset()
            self.llama.eval(row)
            rows.append(np.array(self.llama.scores[: len(row)], dtype=np.float32))
        return torch.from_numpy(np.stack(rows))

    def _context(self, batch: int, positions: int):
        from .llamacpp_context import LlamaCppSequences, capacity_for

        context = self.sequences.get(batch)
        capacity = min(capacity_for(positions), self.max_positions)
        if context is None or context.capacity < positions:
            if context is not None:
                context.close()
            context = LlamaCppSequences(self.llama._model.model, self.llama.n_vocab(), batch,
                                        max(capacity, positions), self.threads)
            self.sequences[batch] = context
        context.reset()
        return context

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, on_token: OnToken | None = None,
                 **sampling) -> torch.Tensor:
        ids = check_request(input_ids, max_new_tokens, self.context_length)
        context = self._context(len(ids), ids.shape[1] + max_new_tokens)
        return decode_loop(context.step, input_ids, ids, max_new_tokens, on_token=on_token, **sampling)

    def encode(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of `text` (special tokens read as text, no bos)."""
        return self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)
