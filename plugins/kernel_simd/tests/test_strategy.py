"""Each knob changes how the step runs, keeps the loss within tolerance, and compile falls back."""
import copy

import pytest
import torch

from ryzen_core import RunConfig, build_optimizer, reference_forward
from ryzen_plugin_kernel_simd.strategy import (REFERENCE, CompiledForward, Strategy, apply_optimizer, plain_strategy,
                                               wrap_forward)


def batch(vocab=256, shape=(2, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab, (shape[0], shape[1] + 1), generator=g)
    return rows[:, :-1], rows[:, 1:]


def test_reference_strategy_keeps_the_forward_object(tiny_model):
    fwd = reference_forward(tiny_model)
    assert wrap_forward(fwd, REFERENCE) is fwd
    assert wrap_forward(fwd, REFERENCE.with_knob("optimizer", "fused")) is fwd  # not a forward knob


@pytest.mark.parametrize("knobs", [{"precision": "bf16"}, {"attention": "math"},
                                   {"precision": "bf16", "attention": "math"}])
def test_forward_knobs_keep_the_loss_within_tolerance(tiny_model, knobs):
    fwd = reference_forward(tiny_model)
    x, y = batch()
    expected = fwd(x, y).loss.item()
    seen = {}
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen["dtype"] = args[0].dtype
        return real_sdpa(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        out = wrap_forward(fwd, Strategy(**knobs))(x, y)
    assert seen["dtype"] == (torch.bfloat16 if knobs.get("precision") == "bf16" else torch.float32)
    assert abs(out.loss.item() - expected) / expected < 0.02


def attention_dtypes(forward, under_autocast: bool) -> set:
    """The dtypes scaled-dot-product attention sees in one forward, optionally inside a bf16 autocast."""
    seen = set()
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention",
                   lambda q, *a, **k: seen.add(q.dtype) or real_sdpa(q, *a, **k))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=under_autocast):
            forward(*batch())
    return seen


def test_a_pinned_fp32_forward_stays_fp32_inside_the_trainers_autocast(tiny_model):
    fwd = reference_forward(tiny_model)
    assert attention_dtypes(fwd, under_autocast=True) == {torch.bfloat16}  # what the outer autocast alone does
    pinned = wrap_forward(fwd, REFERENCE, pin_precision=True)
    assert pinned is not fwd
    assert attention_dtypes(pinned, under_autocast=True) == {torch.float32}
    assert attention_dtypes(wrap_forward(fwd, Strategy(precision="bf16"), pin_precision=True),
                            under_autocast=False) == {torch.bfloat16}


def test_the_plain_path_follows_a_fixed_train_precision():
    assert plain_strategy("bf16") == REFERENCE.with_knob("precision", "bf16")
    assert plain_strategy("fp32") == plain_strategy("auto") == REFERENCE


def test_math_attention_disables_the_flash_kernel_inside_the_forward_only(tiny_model):
    flags = []

    def probe(x, y):
        flags.append((torch._C._get_flash_sdp_enabled(), torch._C._get_math_sdp_enabled()))
        return reference_forward(tiny_model)(x, y)

    wrap_forward(probe, Strategy(attention="math"))(*batch())
    assert flags == [(False, True)]
    assert torch._C._get_flash_sdp_enabled()  # restored afterwards


def test_fused_optimizer_matches_foreach(tiny_model):
    cfg = RunConfig().train
    x, y = batch()
    results = []
    for step in ("foreach", "fused"):
        model = copy.deepcopy(tiny_model)
        opt = build_optimizer(model, cfg)
        apply_optimizer(opt, Strategy(optimizer=step))
        assert all(g["fused"] == (step == "fused") for g in opt.param_groups)
        for _ in range(3):
            opt.zero_grad()
            reference_forward(model)(x, y).loss.backward()
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(results[0], torch.cat([p.detach().flatten() for p in tiny_model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)


def test_compile_that_raises_falls_back_to_eager_once(tiny_model, break_compile):
    calls = break_compile("inductor: C++ compiler not found")
    failures = []
    fwd = reference_forward(tiny_model)
    wrapped = CompiledForward(fwd, failures.append)
    x, y = batch()
    first, second = wrapped(x, y), wrapped(x, y)
    assert failures == ["RuntimeError: inductor: C++ compiler not found"]
    assert calls["compiled"] == 1  # not retried every step
    torch.testing.assert_close(first.loss, fwd(x, y).loss)
    torch.testing.assert_close(second.loss, first.loss)


def test_compile_unavailable_at_construction_falls_back(tiny_model, monkeypatch):
    def unsupported(fn):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unsupported)
    failures = []
    wrapped = wrap_forward(reference_forward(tiny_model), Strategy(compile="inductor"), failures.append)
    assert wrapped(*batch()).loss.isfinite()
    assert failures and "not supported" in failures[0]


def test_an_error_eager_also_raises_is_not_blamed_on_the_compiler(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn: fn)

    def bad_forward(x, y):
        raise ValueError("token id out of range")

    failures = []
    wrapped = CompiledForward(bad_forward, failures.append)
    with pytest.raises(ValueError, match="out of range"):
        wrapped(*batch())
    assert failures == [] and wrapped.failure is None


def test_strict_wrapper_raises_so_a_tuning_trial_can_fail(tiny_model, break_compile):
    break_compile("backend exploded")
    with pytest.raises(RuntimeError, match="torch.compile failed"):
        wrap_forward(reference_forward(tiny_model), Strategy(compile="inductor"))(*batch())
