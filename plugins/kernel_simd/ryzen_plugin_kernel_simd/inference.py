"""Inference for torch: fp32, int8 dynamic quantization of the Linear layers, or bf16 autocast,
whichever decodes fastest while its logits stay close to fp32's.

Measured the way the training choices are: each candidate decodes the same prompt,
interleaved with fp32 (A B A B), and is kept when the 95% interval of its median speed ratio
lies above 1 (`ryzen_core.measure`; rounds are added up to twice `infer_rounds` while it is wide) and
its logits on a sequence the fp32 model itself generated (so the input is in-distribution)
are within `infer_logits_tolerance` relative L2 error of fp32's, with the same greedy
next token at at least 90% of positions. int8 dynamic quantization uses VNNI where the CPU
has it (fbgemm/oneDNN pick the kernel; we do not tune it).
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch

from ryzen_core import describe_error, format_ratio, lm_logits, paired_ratios
from ryzen_core import generate as torch_generate

from .tune import MAX_ROUNDS_FACTOR

MIN_GREEDY_AGREEMENT = 0.9


def quantized_int8(model: torch.nn.Module) -> torch.nn.Module:
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear}, dtype=torch.qint8)


class TorchPath:
    """A model plus the precision it runs in; `generate` and `logits` as the validator calls them."""

    def __init__(self, name: str, model: torch.nn.Module, bf16: bool = False):
        self.name, self.model, self.bf16 = name, model, bf16

    def generate(self, input_ids, max_new_tokens, **sampling):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return torch_generate(self.model, input_ids, max_new_tokens, **sampling)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return lm_logits(self.model, input_ids).float()


def build_path(name: str, model: torch.nn.Module) -> TorchPath:
    if name == "int8":
        return TorchPath("int8", quantized_int8(model))
    return TorchPath(name, model, bf16=name == "bf16")


def logits_agreement(candidate: TorchPath, reference: TorchPath, ids: torch.Tensor) -> dict[str, float]:
    ref, got = reference.logits(ids), candidate.logits(ids)
    return {"logits_relative_error": float((got - ref).norm() / ref.norm()),
            "greedy_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}


def tune_inference(model: torch.nn.Module, candidates: list[str], settings, vocab_size: int,
                   log_line: Callable[[str], None]) -> dict[str, Any]:
    """Time each candidate against fp32 decoding; return the trials and the chosen path's name."""
    model.eval()
    reference = TorchPath("fp32", model)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab_size, (1, settings.infer_prompt_tokens), generator=gen)
    new_tokens = settings.infer_new_tokens
    held = reference.generate(prompt, new_tokens)  # what the model itself writes: in-distribution input

    def seconds(path: TorchPath) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            path.generate(prompt, new_tokens)
            return time.perf_counter() - start
        return run

    trials, best, best_ratio = [], "fp32", 1.0
    for name in candidates:
        trial: dict[str, Any] = {"candidate": name, "error": None}
        try:
            path = build_path(name, model)
            trial.update(logits_agreement(path, reference, held))
            comparison = paired_ratios(seconds(reference), seconds(path), warmup=1, repeats=settings.infer_rounds,
                                       higher_is_better=False, max_repeats=MAX_ROUNDS_FACTOR * settings.infer_rounds)
        except Exception as exc:
            trial.update(error=describe_error(exc), sound=False, accepted=False)
            trials.append(trial)
            log_line(f"kernel infer: {name}: failed ({trial['error']})")
            continue
        sound = (trial["logits_relative_error"] <= settings.infer_logits_tolerance
                 and trial["greedy_agreement"] >= MIN_GREEDY_AGREEMENT)
        trial.update(speedup=comparison.to_dict(), sound=sound, accepted=sound and comparison.verdict == "faster")
        trials.append(trial)
        log_line(f"kernel infer: {name}: decode {format_ratio(comparison)} fp32 ({comparison.verdict}), logits within {trial['logits_relative_error']:.2%}, greedy agreement "
                 f"{trial['greedy_agreement']:.0%}; {'kept' if trial['accepted'] else 'not kept'}")
        if trial["accepted"] and comparison.median_ratio > best_ratio:
            best, best_ratio = name, comparison.median_ratio
    return {"trials": trials, "chosen": best, "prompt_tokens": settings.infer_prompt_tokens, "new_tokens": new_tokens,
            "rounds": settings.infer_rounds}
