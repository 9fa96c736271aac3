"""Opacus 1.6 as a second, independent oracle: one flat-clipping step of dpfused equals Opacus'.

Opacus materializes per-example gradients with its hooks (GradSampleModule) and clips them in its
DPOptimizer; dpfused computes norms inside backward and never forms them. With noise 0 and the
same batch, both must produce the same update in float64 (the clipping is active: C is below most
per-example norms).

Where Opacus is not an oracle. Against torch.func, Opacus 1.6's hooks get per-example gradients
wrong for (a) convolutions with padding_mode "reflect", "replicate" or "circular" (its unfold pads
with zeros) and (b) nn.Embedding with padding_idx (it gives the padding row a gradient that autograd
does not). dpfused matches torch.func on both (tests/test_clipping_oracle.py: cnn, padded_embedding);
here those two models run with zero padding and without padding_idx.
"""

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer as OpacusOptimizer
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from tests import models

BATCH, CLIP, LR = 6, 0.1, 0.5


def cnn_zero_padded(batch):
    case = models.cnn(batch)
    case.model.conv2.padding_mode = "zeros"  # see the module docstring
    return case


def embedding_without_padding_idx(batch):
    case = models.padded_embedding(batch)
    case.model.embed.padding_idx = None  # see the module docstring
    return case


FACTORIES = [models.mlp, models.conv3d, models.sequence_mlp, cnn_zero_padded,
             embedding_without_padding_idx]


def _opacus_step(case, reduction):
    model = GradSampleModule(copy.deepcopy(case.model), loss_reduction=reduction)
    optimizer = OpacusOptimizer(torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=0.0,
                                max_grad_norm=CLIP, expected_batch_size=BATCH,
                                loss_reduction=reduction)
    optimizer.zero_grad()
    case.batch_loss(model, case.inputs, reduction).backward()
    optimizer.step()
    return [p.detach() for p in model.parameters()]


def _dpfused_step(case, reduction):
    model = case.model
    _, optimizer, loader = dpfused.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        data_loader=DataLoader(TensorDataset(*case.inputs), batch_size=BATCH),
        noise_multiplier=0.0, max_grad_norm=CLIP, sampling="cyclic", loss_reduction=reduction)
    for batch in loader:  # cyclic without a shuffle: the first batch is the whole case
        optimizer.zero_grad()
        case.batch_loss(model, tuple(batch), reduction).backward()
        optimizer.step()
        break
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_flat_clipping_step_equals_opacus(factory, reduction):
    case = factory(BATCH)
    before = [p.detach().clone() for p in case.model.parameters()]
    theirs = _opacus_step(case, reduction)
    ours = _dpfused_step(case, reduction)
    assert len(ours) == len(theirs)
    for start, a, b in zip(before, ours, theirs):
        assert not torch.equal(a, start)  # the step moved every parameter
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
