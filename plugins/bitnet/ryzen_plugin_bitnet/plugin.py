"""Hook implementations of the bitnet plugin (entry-point name `bitnet`), one `BitNetPlugin` per variant.

on_model_load       turns the model's Linear layers (not embeddings, not the LM head) into BitLinear;
on_train_start      scales the peak learning rate and sets the weight decay of the matrices, if asked;
on_train_batch_end  turns weight decay off after `decay_until` of the step budget, if asked;
on_train_end        writes the packed ternary weights next to the checkpoint, reads them back to check
                    they are bit-exact, and reports bytes per format;
on_infer            generates with the ternary model read from the packed file (the C++ 2-bit kernel,
                    or torch's int8 one where it cannot be built), or with the fake-quant BitLinear
                    model, so the validator measures what BitNet runs.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field

from ryzen_core import (InferencePath, Plugin, PluginError, PluginSettings, ReportSection, hookimpl, lm_logits,
                        markdown_table)
from ryzen_core import generate as torch_generate

from .cpp_kernel import KernelUnavailable
from .head import head_kind
from .kernel import kernel_description, ternary_model
from .llama_decoder import decoder_for
from .packed import FILE_NAME, load_packed, save_packed
from .quant import BitLinear, quantizable_linears, swap_in_bitlinear

log = logging.getLogger(__name__)


class BitNetSettings(PluginSettings):
    input_norm: Literal["rms", "none"] = "rms"
    """A parameter-free RMSNorm on each BitLinear's input before it is quantized (the paper's norm), or none."""
    lr_scale: float = Field(1.0, gt=0, le=100)
    """Multiplies the run's peak learning rate (train.lr) for this variant; 1 keeps the baseline's."""
    weight_decay: float | None = Field(None, ge=0)
    """Weight decay of the matrix parameters (latent ternary weights, embeddings); None keeps train.weight_decay."""
    decay_until: float = Field(1.0, gt=0, le=1)
    """Fraction of train.max_steps after which weight decay is 0 (BitNet b1.58's second stage used 0.5)."""
    pack: bool = True
    """Write ternary.safetensors (2 bits per weight) into the variant directory at the end of training."""
    inference: Literal["ternary", "fake-quant"] = "ternary"
    """What the validator runs: the ternary kernel on the packed weights, or training's fake quantization."""
    head: Literal["int8", "fp32"] = "int8"
    """The ternary inference model's LM head: int8 weights per row with int8 activations (head.py; a quarter
    of the bytes a decode step reads there), or the trained fp32 head (`inference: fake-quant` always keeps it)."""
    lean_decoder: bool = True
    """A ternary HF Llama decodes through llama_decoder.py's lean step (same arithmetic, a third of the Python
    operations of transformers' modules); false, or any other model: Ryzen's generic KV-cache loop."""
    kernel: Literal["auto", "cpp", "torch"] = "auto"
    """The ternary product: the C++ 2-bit kernel where it builds, else torch's int8 one (`auto`); only the C++
    one (an error where it cannot be built); or only torch's int8 one."""


class ModelPath:
    """A model the validator generates with and reads logits from (the ternary copy, or the fake-quant one);
    `generate` defaults to Ryzen's KV-cache loop."""

    def __init__(self, model: torch.nn.Module, generate=None):
        self.model, self._generate = model.eval(), generate

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens, **sampling):
        if self._generate is not None:
            return self._generate(input_ids, max_new_tokens, **sampling)
        return torch_generate(self.model, input_ids, max_new_tokens, **sampling)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return lm_logits(self.model, input_ids).float()


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every buffer and parameter once, but embedding tables
    (one row per step), as the core counts them."""
    lookup = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head", None)
    if head is not None:
        lookup.discard(id(head.weight))
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    # torch's dynamic int8 Linear (the int8 head) keeps its weight in packed params, not parameters:
    # int8 weight plus a float scale per row
    packed = sum(m.weight().numel() + 4 * m.out_features for m in model.modules()
                 if callable(getattr(m, "weight", None)) and hasattr(m, "_packed_params"))
    return packed + sum(t.numel() * t.element_size() for k, t in tensors.items() if k not in lookup)


def bytes_table(stats: dict) -> str:
    weights = stats["weights"]
    rows = [["fp32 (training's latent weights)", stats["fp32_bytes"], 32.0],
            ["bf16", stats["bf16_bytes"], 16.0],
            ["int8 ternary (what the torch int8 fallback reads per step)", weights, 8.0],
            ["packed 2-bit + fp32 scale (ternary.safetensors tensors)", stats["packed_bytes"],
             8 * stats["packed_bytes"] / weights]]
    return markdown_table(["format", "bytes", "bits/weight"],
                          [[name, f"{size:,}", f"{bits:.2f}"] for name, size, bits in rows])


class BitNetPlugin(Plugin):
    """One per variant; the model carries the BitLinear layers, the instance what it wrote."""

    Settings = BitNetSettings
    reapply_on_load = True  # a rebuilt model (validation workers, the fidelity reference) is BitLinear again

    def __init__(self, settings: BitNetSettings | None = None, context=None):
        super().__init__(settings, context)
        self.decay_stopped = False

    @property
    def input_norm(self) -> bool:
        return self.settings.input_norm == "rms"

    @hookimpl
    def on_model_load(self, model, record):
        names = swap_in_bitlinear(model, self.input_norm)
        weights = sum(model.get_submodule(n).weight.numel() for n in names)
        record("bitlinear", layers=len(names), weights=weights, input_norm=self.settings.input_norm,
               first_layers=names[:4])

    @hookimpl
    def on_train_start(self, optimizer, record):
        settings = self.settings
        for group in optimizer.param_groups:
            group["lr"] *= settings.lr_scale
            if settings.weight_decay is not None and group["weight_decay"] > 0:
                group["weight_decay"] = settings.weight_decay
        record("schedule", lr_scale=settings.lr_scale, peak_lr=optimizer.param_groups[0]["lr"],
               weight_decay=[g["weight_decay"] for g in optimizer.param_groups], decay_until=settings.decay_until)

    @hookimpl
    def on_train_batch_end(self, step, optimizer, config, record):
        total = config.train.max_steps
        if self.decay_stopped or self.settings.decay_until >= 1 or total is None:
            return
        if step >= self.settings.decay_until * total:
            for group in optimizer.param_groups:
                group["weight_decay"] = 0.0
            self.decay_stopped = True
            record("weight_decay_off", step=step)

    @hookimpl
    def on_train_end(self, model, record, context):
        if not self.settings.pack:
            return None
        path = context.variant_dir / FILE_NAME
        stats = save_packed(model, path)
        exact = self._round_trip_exact(model, path)
        record("packed", path=str(path), round_trip_exact=exact, **stats)
        if not exact:
            raise ValueError(f"{path} does not read back as the model's ternary weights")
        ratio = stats["bf16_bytes"] / stats["packed_bytes"]
        return ReportSection(
            f"Ternary weights of {stats['layers']} layers ({stats['weights']:,} weights) written to "
            f"`{path.name}` and read back bit-exactly. Embeddings, norms and the LM head stay fp32.\n\n"
            f"{bytes_table(stats)}\n\nPacked is {ratio:.2f}x smaller than bf16 for the quantized layers.")

    @staticmethod
    def _round_trip_exact(model, path) -> bool:
        loaded = load_packed(path)
        try:
            ternary_model(model, loaded, kernel="int32")  # raises when any layer's integers or scale differ
        except ValueError:
            return False
        return set(loaded) == set(quantizable_linears(model))

    @hookimpl
    def on_infer(self, model, record, context):
        if self.settings.inference == "fake-quant":
            reference = ModelPath(_fake_quant_copy(model, self.input_norm))
            path = InferencePath(reference.generate, logits=reference.logits)
            path.precision, path.weight_bytes = "fp32", decode_weight_bytes(reference.model)
            record("inference", path="fake-quant", note="generates with BitLinear's fake quantization")
            return path
        file = None if context is None else context.variant_dir / FILE_NAME
        packed = load_packed(file) if file is not None and file.is_file() else None
        kernel = None if self.settings.kernel == "auto" else self.settings.kernel
        try:
            inference_model = ternary_model(model, packed, self.input_norm, kernel, self.settings.head)
        except KernelUnavailable as exc:
            raise PluginError(f"bitnet.kernel=cpp: {exc}") from None
        decoder, why_not = (decoder_for(inference_model) if self.settings.lean_decoder
                            else (None, "bitnet.lean_decoder is false"))
        ternary = ModelPath(inference_model, None if decoder is None else decoder.generate)
        loop = "lean Llama step (llama_decoder.py)" if decoder is not None else f"Ryzen's KV-cache loop ({why_not})"
        kernels = sorted({m.kernel for m in ternary.model.modules() if hasattr(m, "kernel")})
        description = kernel_description(ternary.model)
        path = InferencePath(ternary.generate, logits=ternary.logits)
        path.precision, path.weight_bytes = "ternary", decode_weight_bytes(ternary.model)
        path.kernel = description
        record("inference", path="ternary", kernel=description, kernels=kernels, head=head_kind(ternary.model),
               loop=loop,
               weight_bytes=path.weight_bytes,
               weights_from=str(file) if packed is not None else "quantized from the model (no packed file)",
               note="replaces generation with the ternary model")
        log.info("bitnet: generating with the ternary model, kernel: %s; weights from %s", description,
                 file if packed is not None else "the model")
        return path


def _fake_quant_copy(model: torch.nn.Module, input_norm: bool) -> torch.nn.Module:
    import copy

    copied = copy.deepcopy(model)
    swap_in_bitlinear(copied, input_norm)
    return copied


__all__ = ["BitNetPlugin", "BitNetSettings", "BitLinear"]
