"""The torch inference paths: int8 really quantizes, soundness is checked, the validator sees the path."""
import torch

from ryzen_core import InferencePath, RunContext, TorchBackend, lm_logits
from ryzen_core.testing import make_host
from ryzen_plugin_kernel_simd import inference
from ryzen_plugin_kernel_simd.inference import build_path, tune_inference
from ryzen_plugin_kernel_simd.plugin import KernelPlugin, KernelSettings


def test_int8_path_quantizes_every_linear_and_stays_close(tiny_model):
    tiny_model.eval()
    path = build_path("int8", tiny_model)
    kinds = {type(m).__module__ for m in path.model.modules() if "Linear" in type(m).__name__}
    assert kinds and all("quantized" in k for k in kinds)
    assert all(type(m) is torch.nn.Linear for m in tiny_model.modules() if "Linear" in type(m).__name__)  # original kept
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = lm_logits(tiny_model, ids)
    error = float((path.logits(ids) - ref).norm() / ref.norm())
    assert 0 < error < 0.05


def test_tuning_rejects_an_unsound_path_and_records_every_trial(tiny_model, monkeypatch):
    settings = KernelSettings(infer_rounds=2, infer_new_tokens=4, infer_prompt_tokens=4)
    real = inference.build_path

    def noisy(name, model):
        path = real(name, model)
        if name == "bf16":
            logits = path.logits
            path.logits = lambda ids: logits(ids) + 10 * torch.randn_like(logits(ids))
        return path

    monkeypatch.setattr(inference, "build_path", noisy)
    result = tune_inference(tiny_model, ["int8", "bf16"], settings, 256, log_line=lambda line: None)
    int8, bf16 = result["trials"]
    assert int8["sound"] and 2 <= int8["speedup"]["n"] <= 4  # at least infer_rounds, at most twice as many
    assert int8["accepted"] == (int8["speedup"]["verdict"] == "faster")
    assert not bf16["sound"] and not bf16["accepted"] and bf16["logits_relative_error"] > 1
    assert result["chosen"] in {"fp32", "int8"}
    assert result["chosen"] == ("int8" if int8["accepted"] else "fp32")


def variant_host(config, **settings):
    """A host with the kernel's instance for one variant, as validation (or its worker) makes it."""
    host = make_host({"kernel": KernelPlugin})
    host.settings = {"kernel": KernelSettings(**settings)}
    run_dir = config.data.cache_dir.parent
    host.begin_variant(RunContext(config, None, run_dir, run_dir / "optimized", "optimized", ["kernel"]), ["kernel"])
    return host


def test_on_infer_hands_the_validator_the_path_that_generates(tiny_model, config):
    host = variant_host(config, inference="int8")
    tiny_model.eval()
    backend = TorchBackend(tiny_model)
    wrapped = host.fold("on_infer", ["kernel"], "generate", backend.plain_generate, fallback=False, model=tiny_model,
                        tokenizer=None, config=config)
    assert isinstance(wrapped, InferencePath) and wrapped.logits is not None
    optimized = TorchBackend(tiny_model, "torch-optimized", wrapped)
    ids = torch.randint(0, 256, (1, 8))
    assert not torch.equal(optimized.logits(ids), backend.logits(ids))  # int8 logits, not the fp32 model's
    torch.testing.assert_close(optimized.logits(ids), backend.logits(ids), rtol=0.1, atol=0.1)
    out = optimized.generate(ids, 5)
    assert out.shape == (1, 13) and torch.equal(out[:, :8], ids)


def test_fp32_setting_keeps_the_plain_generate(tiny_model, config):
    host = variant_host(config, inference="fp32")
    plain = TorchBackend(tiny_model).plain_generate
    assert host.fold("on_infer", ["kernel"], "generate", plain, fallback=False, model=tiny_model, tokenizer=None,
                     config=config) is plain
