"""The example plugin: its loss term composes with other plugins' terms in either order, its amount
decays through the host's Adaptation, and its end-of-training section and file are written."""
import json
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn.functional as F

from ryzen_core import ReportSection, Transformer, TransformerConfig, hookimpl, reference_forward
from ryzen_plugin_label_smoothing.plugin import LabelSmoothing, SmoothingSettings


class LogitPenalty:
    """Another loss-changing plugin, with a term known by hand: `weight * mean(logits^2)` added to the loss."""

    def __init__(self, weight: float):
        self.weight = weight

    @hookimpl
    def transform_forward(self, forward):
        def penalized(input_ids, targets):
            out = forward(input_ids, targets)
            return out.with_loss(out.loss + self.weight * out.logits.float().pow(2).mean())

        return penalized


@pytest.fixture
def batch():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                                          context_length=16))
    return model, torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))


def test_the_entry_point_names_the_plugin_class():
    names = {ep.name: ep.value for ep in entry_points(group="ryzen.plugins")}
    assert names.get("smoothing") == "ryzen_plugin_label_smoothing.plugin:LabelSmoothing"


@pytest.mark.parametrize("order", [["penalty", "smoothing"], ["smoothing", "penalty"]])
def test_the_smoothing_term_adds_to_the_terms_of_other_plugins(batch, tiny_host, order):
    model, x, y = batch
    amount, weight = 0.3, 10.0  # the logits of a fresh model are small: a weight that shows
    host = tiny_host(penalty=LogitPenalty(weight), smoothing=LabelSmoothing(SmoothingSettings(amount=amount)))
    chained = host.fold("transform_forward", order, "forward", reference_forward(model), model=model)
    loss = chained(x, y).loss

    # By hand: CE and the uniform term from the log-probabilities, the penalty from the logits.
    logits = model(x).logits.float().reshape(-1, 64)
    log_probs = torch.log_softmax(logits, dim=-1)
    cross_entropy = -log_probs[torch.arange(len(logits)), y.reshape(-1)].mean()
    uniform = -log_probs.mean()
    penalty = weight * logits.pow(2).mean()
    expected = (1 - amount) * cross_entropy + amount * uniform + penalty
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # torch's own label smoothing agrees on the smoothed part, and neither term is lost.
    torch_smoothed = F.cross_entropy(logits, y.reshape(-1), label_smoothing=amount)
    assert loss.item() == pytest.approx((torch_smoothed + penalty).item(), rel=1e-5)
    # Each term is far above the tolerance, so a chain that dropped either would fail above.
    assert min(penalty.item(), amount * abs(uniform - cross_entropy).item()) > 1e-3 * loss.item()


def test_amount_zero_leaves_the_incoming_loss_alone(batch, tiny_host):
    model, x, y = batch
    plain = reference_forward(model)
    host = tiny_host(smoothing=LabelSmoothing(SmoothingSettings(amount=0.0)))
    unchanged = host.fold("transform_forward", ["smoothing"], "forward", plain, model=model)
    assert torch.equal(unchanged(x, y).loss, plain(x, y).loss)


def test_the_amount_decays_after_each_evaluation_and_the_forward_sees_it(tiny_config, tiny_host, tiny_train):
    config = tiny_config("smoothing.amount=0.2", "smoothing.decay=0.5", plugins=["smoothing"])
    host = tiny_host(config=config, smoothing=LabelSmoothing)
    result = tiny_train(host, config)
    # Six steps, an evaluation every three: two decays, applied by the host to this variant's instance.
    assert [a["changes"] for a in result.metrics.adaptations] == [{"amount": 0.1}, {"amount": 0.05}]
    assert host.instance("smoothing").settings.amount == 0.05
    assert "smoothing" not in result.disabled


def test_train_end_writes_its_summary_and_a_report_section(tmp_path, tiny_host):
    host = tiny_host(smoothing=LabelSmoothing(SmoothingSettings(amount=0.05)))
    ended = host.call_each("on_train_end", ["smoothing"], fallback=False, model=None,
                           metrics={"final_val_loss": 2.5}, run_dir=tmp_path)
    section = ended["smoothing"]
    assert isinstance(section, ReportSection)
    assert section.markdown == "Label smoothing ended at 0.05 (validation loss 2.5000)."
    assert json.loads(section.files["summary"].read_text()) == {"final_amount": 0.05, "final_val_loss": 2.5}
