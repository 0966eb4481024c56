"""Parity gate: an export must compute what the torch model computes, or it is refused.

Two measurements on held-out token ids:
  * logits without a cache over [rows, n] tokens: max |torch - onnxruntime|, and the
    fraction of positions whose argmax agrees (top-1 agreement);
  * greedy generation with the KV cache from a short prompt, torch loop vs onnxruntime
    loop, compared token by token.
Tolerances are tiered by precision:
  * fp32: max abs diff <= fp32_tolerance (default 1e-3; the two runtimes differ only by
    float summation order, ~1e-6 on logits of a few units) and greedy tokens identical.
  * int8 (and int4, with its own looser pair of thresholds, defaults 0.3 and 0.75: a
    4-bit weight keeps 1/15 of its block's range, 16x coarser than int8):
    max abs diff <= int8_tolerance x max |torch logit| (default 0.1) and top-1
    agreement >= int8_min_top1 (default 0.9). Dynamic int8 rounds every weight to 1/254
    of its column's range and every activation row to 1/255 of its range; those errors
    add up over the layers. Measured on this repo's tiny models (built-in and Llama,
    random and briefly trained) the largest logit error was 0.3-3.3% of the largest
    logit, so 10% leaves 3x headroom for deeper models, while a wrong or corrupted
    weight moves logits by the order of the logit scale itself. Top-1 agreement was
    0.97-1.0 there; 0.9 tolerates a few near-ties flipping. Greedy agreement is
    reported, not enforced: one flipped near-tie changes every later token.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ryzen_core import RyzenError, lm_logits
from ryzen_core import generate as torch_generate

DEFAULT_FP32_TOLERANCE = 1e-3
DEFAULT_INT8_TOLERANCE = 0.1
DEFAULT_INT8_MIN_TOP1 = 0.9
DEFAULT_INT4_TOLERANCE = 0.3
DEFAULT_INT4_MIN_TOP1 = 0.75
PARITY_ROWS = 2
PROMPT_TOKENS = 8


class ParityError(RyzenError):
    """The export does not reproduce the torch model within its precision's tolerance."""

    exit_code = 1


def reference_text() -> str:
    """Fixed real text for parity ids: this package's own source, which ships with it."""
    package = Path(__file__).resolve().parent
    return "\n".join(path.read_text(encoding="utf-8") for path in sorted(package.glob("*.py")))


def parity_token_ids(tokenizer: Any, n_tokens: int, vocab_size: int, rows: int = PARITY_ROWS,
                     text: str | None = None) -> torch.Tensor:
    """[rows, n_tokens] ids from consecutive windows of the encoded reference text.

    `tokenizer` None uses the text's UTF-8 bytes. Ids are taken modulo vocab_size so a model whose vocabulary is smaller than the
    tokenizer's (an HF model paired with a project tokenizer) still gets valid input.
    """
    if n_tokens < 2:
        raise ValueError(f"parity needs at least 2 tokens, got {n_tokens}")
    text = text if text is not None else reference_text()
    # Without a tokenizer, UTF-8 bytes are still real text-shaped ids.
    ids = tokenizer.encode(text) if tokenizer is not None else list(text.encode("utf-8"))
    if not ids:
        raise ValueError("the parity text encodes to no tokens")
    needed = rows * n_tokens
    ids = (ids * (needed // len(ids) + 1))[:needed]
    return (torch.tensor(ids, dtype=torch.long) % vocab_size).view(rows, n_tokens)


@torch.inference_mode()
def measure_parity(model: nn.Module, backend: Any, token_ids: torch.Tensor, new_tokens: int,
                   prompt_tokens: int = PROMPT_TOKENS) -> dict[str, Any]:
    """Numbers only, no verdict: logits diff and top-1 agreement, greedy token agreement."""
    was_training = model.training
    model.eval()
    try:
        reference = lm_logits(model, token_ids).float()
        candidate = backend.logits(token_ids).float()
        if candidate.shape != reference.shape:
            raise ParityError(f"{backend.name}: logits shape {tuple(candidate.shape)} != torch {tuple(reference.shape)}")
        max_abs_diff = (reference - candidate).abs().max().item()
        logit_scale = reference.abs().max().item()
        top1 = (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item()

        prompt = token_ids[:, :min(prompt_tokens, token_ids.shape[1])]
        torch_tokens = torch_generate(model, prompt, new_tokens)[:, prompt.shape[1]:]
        backend_tokens = backend.generate(prompt, new_tokens)[:, prompt.shape[1]:]
    finally:
        model.train(was_training)
    same = torch_tokens == backend_tokens
    # Tokens before the first disagreement, averaged over rows: a flip changes everything after it.
    agreeing_prefix = same.int().cumprod(dim=1).sum(dim=1).float().mean().item()
    return {
        "backend": backend.name,
        "logit_positions": int(reference.shape[0] * reference.shape[1]),
        "max_abs_diff": max_abs_diff,
        "max_abs_logit": logit_scale,
        "relative_max_abs_diff": max_abs_diff / logit_scale if logit_scale > 0 else 0.0,
        "top1_agreement": top1,
        "greedy_tokens": int(same.numel()),
        "greedy_agreement": same.float().mean().item() if same.numel() else 1.0,
        "greedy_agreeing_prefix": agreeing_prefix,
    }


def check_parity(model: nn.Module, backend: Any, token_ids: torch.Tensor, *, precision: str, new_tokens: int = 16,
                 fp32_tolerance: float = DEFAULT_FP32_TOLERANCE, int8_tolerance: float = DEFAULT_INT8_TOLERANCE,
                 int8_min_top1: float = DEFAULT_INT8_MIN_TOP1, int4_tolerance: float = DEFAULT_INT4_TOLERANCE,
                 int4_min_top1: float = DEFAULT_INT4_MIN_TOP1) -> dict[str, Any]:
    """Measure parity and raise ParityError (one line, with the numbers) when it fails."""
    quantized = {"int8": (int8_tolerance, int8_min_top1), "int4": (int4_tolerance, int4_min_top1)}
    if precision != "fp32" and precision not in quantized:
        raise ValueError(f"unknown precision {precision!r}: expected 'fp32', 'int8' or 'int4'")
    result = measure_parity(model, backend, token_ids, new_tokens)
    result["precision"] = precision
    failures = []
    if precision == "fp32":
        result["tolerance"] = fp32_tolerance
        if not result["max_abs_diff"] <= fp32_tolerance:  # also catches NaN
            failures.append(f"max abs logit diff {result['max_abs_diff']:.3g} > {fp32_tolerance:g}")
        if result["greedy_agreement"] < 1.0:
            failures.append(f"greedy tokens differ ({result['greedy_agreement']:.1%} of {result['greedy_tokens']} "
                            f"agree, first {result['greedy_agreeing_prefix']:.1f} on average)")
    else:
        tolerance, min_top1 = quantized[precision]
        bound = tolerance * result["max_abs_logit"]
        result.update(tolerance=tolerance, max_abs_diff_bound=bound, min_top1=min_top1)
        if not result["max_abs_diff"] <= bound:
            failures.append(f"max abs logit diff {result['max_abs_diff']:.3g} > {tolerance:g} x max |logit| "
                            f"{result['max_abs_logit']:.3g} = {bound:.3g}")
        if result["top1_agreement"] < min_top1:
            failures.append(f"top-1 agreement {result['top1_agreement']:.1%} < {min_top1:.0%} "
                            f"over {result['logit_positions']} positions")
    result["passed"] = not failures
    if failures:
        raise ParityError(f"{backend.name} parity failed vs torch: " + "; ".join(failures))
    return result
