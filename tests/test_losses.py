"""per_example_lm_loss: each example's loss depends on that example alone (docs/design.md §3)."""

import pytest
import torch
import torch.nn.functional as F

from dpfused import per_example_lm_loss


def _reference(logits, labels):
    losses = []
    for lg, lb in zip(logits, labels):
        lg, lb = lg[:-1], lb[1:]
        keep = lb != -100
        losses.append(F.cross_entropy(lg[keep], lb[keep]) if keep.any() else lg.sum() * 0)
    return torch.stack(losses)


def test_matches_one_example_at_a_time():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 6))
    labels[1, 3:] = -100
    labels[2, 1:] = -100  # no counted token: contributes 0
    expected = _reference(logits, labels)
    torch.testing.assert_close(per_example_lm_loss(logits, labels, reduction="none"), expected)
    torch.testing.assert_close(per_example_lm_loss(logits, labels, reduction="sum"), expected.sum())
    torch.testing.assert_close(per_example_lm_loss(logits, labels), expected.mean())


def test_an_example_does_not_change_another_examples_loss():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    alone = per_example_lm_loss(logits[:1], labels[:1], reduction="none")
    labels[1, 2:] = -100  # the other example's length changes
    together = per_example_lm_loss(logits, labels, reduction="none")
    torch.testing.assert_close(together[0], alone[0])


def test_empty_batch_and_bad_input():
    assert per_example_lm_loss(torch.zeros(0, 4, 5), torch.zeros(0, 4, dtype=torch.long)) == 0
    with pytest.raises(ValueError, match="reduction='avg'"):
        per_example_lm_loss(torch.zeros(1, 4, 5), torch.zeros(1, 4, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="logits \\(B, T, V\\) and labels \\(B, T\\)"):
        per_example_lm_loss(torch.zeros(1, 4, 5), torch.zeros(1, 3, dtype=torch.long))
