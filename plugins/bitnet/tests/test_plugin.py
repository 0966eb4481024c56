"""The plugin through the host: settings, the swap at model load, a tiny training run, the packed
file at the end of training, and on_infer's ternary path inside a whole tiny `ryzen run`."""
import json
import math
from importlib.metadata import entry_points

import pytest
import torch

from ryzen_core import ConfigError, InferencePath, ReportSection, RunContext, Transformer, TransformerConfig, lm_logits
from ryzen_plugin_bitnet import cpp_kernel
from ryzen_plugin_bitnet.packed import FILE_NAME, load_packed
from ryzen_plugin_bitnet.plugin import BitNetPlugin, BitNetSettings
from ryzen_plugin_bitnet.quant import BitLinear


def test_the_entry_point_names_the_plugin_class():
    names = {ep.name: ep.value for ep in entry_points(group="ryzen.plugins")}
    assert names.get("bitnet") == "ryzen_plugin_bitnet.plugin:BitNetPlugin"


def test_bad_settings_are_config_errors(tiny_config, tiny_host):
    with pytest.raises(ConfigError):
        tiny_host(tiny_config("bitnet.input_norm=layer", plugins=["bitnet"]), bitnet=BitNetPlugin)
    with pytest.raises(ConfigError):
        tiny_host(tiny_config("bitnet.lr_scale=0", plugins=["bitnet"]), bitnet=BitNetPlugin)


def test_a_tiny_run_trains_ternary_without_nan(tiny_config, tiny_host, tiny_train):
    config = tiny_config("train.max_steps=12", "train.eval_every=6", plugins=["bitnet"])
    host = tiny_host(config, bitnet=BitNetPlugin)
    result = tiny_train(host, config)
    assert not result.disabled
    assert any(isinstance(m, BitLinear) for m in result.model.modules())
    losses = [row["loss"] for row in result.metrics.steps]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # trains: the last steps beat its own first ones
    assert [e for e in host.events if e.event == "bitlinear"][0].data["layers"] == 8


class FakeOptimizer:
    def __init__(self):
        self.param_groups = [{"lr": 2e-3, "weight_decay": 0.1}, {"lr": 2e-3, "weight_decay": 0.0}]


def test_schedule_settings_scale_the_peak_lr_and_stop_decay(tiny_config):
    config = tiny_config("train.max_steps=10")
    plugin = BitNetPlugin(BitNetSettings(lr_scale=1.5, weight_decay=0.05, decay_until=0.5))
    optimizer, events = FakeOptimizer(), []
    record = lambda event, **data: events.append(event)  # noqa: E731
    plugin.on_train_start(optimizer, record)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([3e-3, 3e-3])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    plugin.on_train_batch_end(4, optimizer, config, record)
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    plugin.on_train_batch_end(5, optimizer, config, record)
    assert optimizer.param_groups[0]["weight_decay"] == 0.0 and events[-1] == "weight_decay_off"


def test_a_whole_tiny_run_packs_reports_and_validates_the_ternary_path(tiny_config, tiny_host, tiny_run):
    config = tiny_config("validate.isolation=inline", plugins=["bitnet"])
    host = tiny_host(config, bitnet=BitNetPlugin)
    run_dir = tiny_run(host, config)
    packed = run_dir / "optimized" / FILE_NAME
    assert packed.is_file() and not (run_dir / "baseline" / FILE_NAME).exists()
    assert len(load_packed(packed)) == 8
    report = (run_dir / "report.md").read_text()
    assert "read back bit-exactly" in report and "packed 2-bit" in report
    events = {e.event: e.data for e in host.events if e.plugin == "bitnet"}
    assert events["packed"]["round_trip_exact"] is True
    assert events["inference"]["path"] == "ternary" and events["inference"]["weights_from"] == str(packed)
    assert events["inference"]["head"].startswith("int8")  # the default inference head
    assert events["inference"]["loop"].startswith("Ryzen's KV-cache loop (not a LlamaForCausalLM")
    kernel, status = events["inference"]["kernel"], cpp_kernel.load()  # test_cpp_kernel.py fails a broken build
    if status.available:
        assert kernel == status.name
    else:
        assert kernel.startswith("torch-int8 fallback (") and status.reason in kernel


def small_model():
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=1, d_ff=32, context_length=16))


def test_on_train_end_writes_the_packed_file_and_a_report_section(tmp_path, tiny_config):
    model = small_model()
    plugin = BitNetPlugin(BitNetSettings(), RunContext(tiny_config(), None, tmp_path, tmp_path, "optimized"))
    plugin.on_model_load(model, lambda event, **data: None)
    section = plugin.on_train_end(model, lambda event, **data: None, plugin.context)
    assert isinstance(section, ReportSection) and "bits/weight" in section.markdown
    assert len(load_packed(tmp_path / FILE_NAME)) == 4


@pytest.mark.parametrize("inference", ["ternary", "fake-quant"])
def test_on_infer_returns_a_path_with_its_own_logits_even_without_a_packed_file(tmp_path, tiny_config, inference):
    model = small_model()  # a validation worker's model: plain Linear layers holding the latent weights
    plugin = BitNetPlugin(BitNetSettings(inference=inference, head="fp32"),  # the trained head: logits to 1e-4
                          RunContext(tiny_config(), None, tmp_path, tmp_path / "nothing-here", "optimized"))
    events = []
    path = plugin.on_infer(model, lambda event, **data: events.append(data), plugin.context)
    assert isinstance(path, InferencePath) and path.precision == ("ternary" if inference == "ternary" else "fp32")
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        fake_quant = small_model()
        plugin.on_model_load(fake_quant, lambda event, **data: None)
        torch.testing.assert_close(path.logits(ids), lm_logits(fake_quant.eval(), ids), rtol=1e-4, atol=1e-4)
    assert path(ids, 3).shape == (1, 11)
    assert not any(isinstance(m, BitLinear) for m in model.modules())  # the worker's model is left as it was
    if inference == "ternary":
        assert events[0]["weights_from"].startswith("quantized from the model")
        assert path.weight_bytes < sum(p.numel() * 4 for p in model.parameters())


def test_a_process_isolated_run_checks_the_kernel_against_the_fake_quant_model_it_trained(tiny_config, tiny_run):
    from ryzen_core.testing import installed_host

    config = tiny_config("bitnet.head=fp32", plugins=["bitnet"])  # validate.isolation: process, the default
    run_dir = tiny_run(installed_host(config, "bitnet"), config)
    report = json.loads((run_dir / "inference_validation_report.json").read_text())
    reference = report["reference_workers"]["torch-optimized-fp32"]
    assert reference["isolation"] == "process"
    assert [(e["hook"], e["event"]) for e in reference["plugin_events"]] == [("on_model_load", "bitlinear")]
    for batch in report["batches"]:
        fidelity = batch["backends"]["torch-optimized"]["export_fidelity"]
        # The reference is rebuilt with on_model_load again (reapply_on_load): BitLinear, not the latent weights.
        assert fidelity["reference"] == "torch-optimized-fp32"
        assert fidelity["token_agreement"] == 1.0, fidelity
