"""One final model per variant: a plugin that swaps weights at the end of training (an EMA of the
weights, as a third party would write it) is seen by every artifact: validation loss, test perplexity,
the checkpoint, hf_model, the export and inference validation."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from helpers import TINY
from ryzen_core import hookimpl
from ryzen_core.checkpoint import latest_checkpoint
from ryzen_core.models import tiny_llama_config
from ryzen_core.plugins import PluginHost
from ryzen_core.run import load_data, prepare, run_pipeline
from ryzen_core.trainer import Trainer


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class EmaOfWeights:
    """Keeps an exponential moving average of the weights after every optimizer step; swaps it in at the end."""

    def __init__(self, decay: float = 0.5):
        self.decay, self.ema, self.steps, self.raw = decay, None, [], None

    @hookimpl
    def on_train_batch_end(self, step, model, optimizer, metrics):
        assert optimizer is not None and "loss" in metrics
        self.steps.append(step)
        current = weights(model)
        if self.ema is None:
            self.ema = current
        else:
            for name, value in self.ema.items():
                value.mul_(self.decay).add_(current[name], alpha=1 - self.decay)

    @hookimpl
    def on_train_finalize(self, model, record):
        self.raw = weights(model)
        model.load_state_dict(self.ema)
        record("swapped_in_ema", steps=len(self.steps))


class Capture:
    """What export and inference validation are handed."""

    exported = validated = None

    @hookimpl
    def on_export(self, model):
        self.exported = weights(model)

    @hookimpl
    def on_infer(self, model):
        self.validated = weights(model)


def test_ema_plugin_swaps_once_and_every_artifact_holds_the_swapped_weights(cache_dir, tmp_path):
    llama = tmp_path / "llama.json"
    llama.write_text(json.dumps(tiny_llama_config(vocab_size=300, hidden=32, layers=1, heads=2, kv_heads=1,
                                                  intermediate=64, max_positions=64)))
    host, ema, capture = PluginHost(), EmaOfWeights(), Capture()
    host.register(ema, "ema")
    host.register(capture, "capture")
    # Inline validation: the plugins registered here (not installed) live in this process only.
    config = prepare(host, None, [*TINY, f"data.cache_dir={cache_dir}", "model.source=hf", f"model.hf_config={llama}",
                                  "validate.isolation=inline"], ["ema", "capture"], tmp_path / "run")
    run_dir = run_pipeline(config, host)

    assert ema.steps == list(range(1, 7))
    final = ema.ema
    assert not same(final, ema.raw)  # the swap changed the weights, so agreement below means something
    optimized = run_dir / "optimized"
    assert same(load_file(latest_checkpoint(optimized) / "model.safetensors"), final)
    assert same(load_file(optimized / "hf_model" / "model.safetensors"), final)
    assert same(capture.exported, final) and same(capture.validated, final)

    # Validation loss and test perplexity were measured on the swapped weights.
    summary = json.loads((run_dir / "training_metrics_report.json").read_text())["runs"]["optimized"]["summary"]
    data = load_data(config)
    check = Trainer(config, PluginHost(), [], tmp_path / "check", data)
    check.model.load_state_dict(final)
    assert summary["test_loss"] == check.evaluate(data.test, max_batches=config.validate_.perplexity_batches)
    assert summary["final_val_loss"] == check.evaluate()
    events = json.loads((run_dir / "optimization_analysis.json").read_text())["events"]
    assert [e["event"] for e in events if e["plugin"] == "ema"] == ["swapped_in_ema"]
