"""Matryoshka nested loss and truncated LM heads."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ryzen_core import Transformer, TransformerConfig, generate
from ryzen_plugin_semantic_compression.matryoshka import (matryoshka_loss, output_head, prefix_sizes,
                                                          truncated_head, truncated_logits)


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig.from_preset("tiny", vocab_size=64))


def test_prefix_sizes():
    assert prefix_sizes(256, [16, 8, 4, 2, 1]) == [16, 32, 64, 128, 256]
    assert prefix_sizes(8, [16, 1]) == [1, 8]
    with pytest.raises(ValueError):
        prefix_sizes(8, [0])


def test_nested_loss_is_the_weighted_mean_of_prefix_losses():
    model = tiny_model()
    ids, targets = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    out = model(ids)
    head = output_head(model)
    full = F.cross_entropy(out.logits.reshape(-1, 64), targets.reshape(-1))
    assert torch.allclose(matryoshka_loss(out.hidden, head, targets, full, [32], [1.0]), full)
    manual = [F.cross_entropy(truncated_logits(out.hidden, head, m).reshape(-1, 64), targets.reshape(-1))
              for m in (8, 16)]
    nested = matryoshka_loss(out.hidden, head, targets, full, [8, 16, 32], [1.0, 2.0, 1.0])
    assert torch.allclose(nested, (manual[0] + 2 * manual[1] + full) / 4)


def test_nested_loss_trains_the_leading_dimensions_harder():
    model = tiny_model()
    ids, targets = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    hidden = model(ids).hidden.detach()  # only the head's gradient is compared
    full = F.cross_entropy(model.lm_head(hidden).reshape(-1, 64), targets.reshape(-1))
    grad = torch.autograd.grad(matryoshka_loss(hidden, output_head(model), targets, full, [4, 32], [1.0, 1.0]),
                               model.lm_head.weight, retain_graph=True)[0]
    plain = torch.autograd.grad(full, model.lm_head.weight)[0]
    assert not torch.allclose(grad[:, :4], plain[:, :4] / 2)  # the prefix term adds to the first 4 columns
    torch.testing.assert_close(grad[:, 4:], plain[:, 4:] / 2)  # and only to them


def test_truncated_head_reads_only_the_prefix_and_is_restored():
    model = tiny_model().eval()
    ids = torch.randint(0, 64, (1, 10))
    hidden = model(ids).hidden
    head = model.lm_head
    with truncated_head(model, 8):
        logits = model(ids).logits
        generated = generate(model, ids, 4)
    assert model.lm_head is head and model.lm_head.weight is model.tok_emb.weight
    torch.testing.assert_close(logits, hidden[..., :8] @ head.weight[:, :8].T)
    assert generated.shape == (1, 14)


def test_default_weights_give_the_full_width_half_of_the_loss():
    from ryzen_plugin_semantic_compression.matryoshka import nested_weights

    assert nested_weights(256, [16, 8, 4, 2, 1]) == ([16, 32, 64, 128, 256], [0.25, 0.25, 0.25, 0.25, 1.0])
    assert nested_weights(256, [4]) == ([64, 256], [1.0, 1.0])  # the full width is always trained
    assert nested_weights(256, [4, 1], [2.0, 1.0]) == ([64, 256], [2.0, 1.0])
