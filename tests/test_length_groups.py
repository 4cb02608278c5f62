"""Length groups (models.common.by_length_groups): the sequence baselines run their layers once per group
of similar history lengths, over that group's longest history only. That may change the cost and
nothing else: the same loss and the same gradients as one pass over the batch's longest history."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmsr_cli.models import difsr, gru4rec, gru4recf, nova, sasrec, srgnn, trans2d
from mmsr_cli.models.common import by_length_groups

from test_baselines import batch, image_modality, make

GROUPED_MODELS = ["gru4rec", "sasrec", "sasrecf", "srgnn", "gru4recf", "nova", "difsr", "trans2d"]
WITH_CODES = {"sasrecf", "gru4recf", "nova", "difsr", "trans2d"}


def test_rows_are_grouped_by_power_of_two_length_and_come_back_in_batch_order():
    calls = []

    def encode(rows, steps):
        calls.append((rows.tolist(), steps))
        return torch.stack([rows.float(), torch.full((len(rows),), float(steps))], dim=1)

    out = by_length_groups(torch.tensor([1, 5, 2, 3, 9, 4, 1]), encode)
    # Groups 1 | 2 | 3-4 | 5-8 | 9-16, each run over its own longest history.
    assert calls == [([0, 6], 1), ([2], 2), ([3, 5], 4), ([1], 5), ([4], 9)]
    assert out[:, 0].tolist() == list(range(7))  # row b's output is back at row b
    assert out[:, 1].tolist() == [1, 5, 2, 4, 9, 4, 1]


def test_an_empty_batch_is_one_empty_call():
    calls = []
    out = by_length_groups(torch.zeros(0, dtype=torch.long), lambda rows, steps: calls.append(steps) or torch.zeros(0, 3))
    assert calls == [1] and out.shape == (0, 3)


def one_pass(lengths, encode):
    """The ungrouped reference: every row over the batch's longest history."""
    return encode(torch.arange(len(lengths)), int(lengths.max()))


@pytest.mark.parametrize("name", GROUPED_MODELS)
def test_grouped_training_step_equals_one_pass_over_the_longest_history(name, monkeypatch):
    # Dropout 0 makes the training forward deterministic, so the comparison can be exact.
    model = make(name, [image_modality()] if name in WITH_CODES else (), dropout=0.0).train()
    b = batch([[1, 2, 3, 4, 5], [6], [7, 8], [9, 10, 11], [2], [3, 1, 4, 1]])  # groups 1 | 2 | 3-4 | 5
    targets = torch.tensor([6, 7, 9, 2, 3, 5])

    def step():
        model.zero_grad()
        loss = F.cross_entropy(model.score(b), targets)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    grouped_loss, grouped_grads = step()
    for module in (gru4rec, sasrec, srgnn, gru4recf, nova, difsr, trans2d):
        monkeypatch.setattr(module, "by_length_groups", one_pass)
    loss, grads = step()
    assert torch.allclose(grouped_loss, loss, atol=1e-6)
    assert grouped_grads.keys() == grads.keys() and grads
    for n, g in grads.items():
        assert torch.allclose(grouped_grads[n], g, atol=1e-5), n
