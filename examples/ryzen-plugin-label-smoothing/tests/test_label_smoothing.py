import torch

from ryzen_core.forward import reference_forward
from ryzen_core.models import Transformer, TransformerConfig
from ryzen_core.plugins import PluginHost
from ryzen_plugin_label_smoothing import plugin


def test_plugin_is_installed():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="ryzen.plugins")}
    assert names.get("smoothing") == "ryzen_plugin_label_smoothing.plugin"


def _host(amount):
    host = PluginHost()
    host.register(plugin, "smoothing")
    host.settings["smoothing"] = plugin.SmoothingSettings(amount=amount)
    return host


def test_smoothing_changes_the_loss_and_zero_leaves_it():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=1, d_ff=32, context_length=16))
    x, y = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    plain = reference_forward(model)
    smoothed = _host(0.3).fold("transform_forward", ["smoothing"], "forward", plain, model=model, config=None)
    unchanged = _host(0.0).fold("transform_forward", ["smoothing"], "forward", plain, model=model, config=None)
    assert not torch.allclose(smoothed(x, y).loss, plain(x, y).loss)
    assert torch.allclose(unchanged(x, y).loss, plain(x, y).loss)


def test_epoch_end_decays_amount():
    host = _host(0.2)
    changes = host.call_each("on_epoch_end", ["smoothing"], epoch=1, metrics={}, model=None, config=None)
    assert changes == {"smoothing": {"amount": 0.1}}
    assert host.settings["smoothing"].amount == 0.1
