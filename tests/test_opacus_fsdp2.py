"""Opacus' FSDP2 examples on dpfused with one import changed (issue 21 item 6).

Two clients shaped like Opacus' own scripts, importing only from ``dpfused.opacus``:

- ``examples/fsdp_example.py``: a small conv net, ``FSDP2Wrapper(model)``, ``make_private(criterion=
  ..., grad_sample_mode="ghost_fsdp", poisson_sampling=True)`` returning four values;
- ``examples/fsdp_llama3.py``: a tiny random-init ``LlamaForSequenceClassification`` with frozen
  token embeddings, a loader over a ``DistributedSampler`` with ``batch_size // world_size``,
  ``FSDP2Wrapper(model, mp_policy=None)``, ``poisson_sampling=False`` and a
  ``BatchMemoryManager``.

Each runs on 2 gloo processes in float64 with noise 0, every logical batch the whole data set
(Poisson with q = 1; one shuffled batch of ``b * world`` = N): after the steps, every rank's shards
put together are the parameters of ONE process that clipped the whole batch with the torch.func
oracle (tests/oracle.py). That the Llama client's logical batch is ``b * world`` (Opacus' reading of
a DistributedSampler), not ``b``, is part of what the oracle checks.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from tests.distributed_harness import run_on_ranks
from tests.oracle import clipped_sums, per_example_grads

WORLD, N, STEPS, LR, CLIP = 2, 8, 2, 0.5, 0.05


# ---- the clients (what a user of Opacus writes, with the import changed) -----------------------
class SampleConvNet(nn.Module):
    """Opacus' fsdp_example network, shrunk to 10 x 10 images."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 4, 2, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, 1)
        self.fc1 = nn.Linear(6 * 3 * 3, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))  # -> [B, 4, 5, 5]
        x = F.relu(self.conv2(x))  # -> [B, 6, 3, 3]
        x = x.view(-1, 6 * 3 * 3)
        return self.fc2(F.relu(self.fc1(x)))


def _images():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 1, 10, 10, dtype=torch.float64, generator=g),
                         torch.randint(0, 3, (N,), generator=g))


def conv_client():
    from dpfused.opacus import FSDP2Wrapper, PrivacyEngine

    torch.manual_seed(0)
    model = FSDP2Wrapper(SampleConvNet().double())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0)
    data_loader = DataLoader(_images(), batch_size=N, num_workers=0)
    privacy_engine = PrivacyEngine()
    model, optimizer, criterion, data_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
        data_loader=data_loader, noise_multiplier=0.0, max_grad_norm=CLIP,
        grad_sample_mode="ghost_fsdp", poisson_sampling=True)
    model.train()
    while optimizer.steps_taken < STEPS:
        for data, target in data_loader:
            optimizer.zero_grad()
            loss = criterion(model(data), target)
            loss.backward()
            optimizer.step()
    return model, optimizer, privacy_engine


class TinySNLI(Dataset):
    """Opacus' SNLI loader's items: input_ids, attention_mask (right padding), label."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 40, (N, 7), generator=g)
        lengths = torch.tensor([7, 5, 6, 7, 4, 7, 6, 3])
        self.mask = (torch.arange(7) < lengths[:, None]).long()
        self.ids = self.ids * self.mask  # pad token 0
        self.labels = torch.randint(0, 3, (N,), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "label": self.labels[i]}


def _llama():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=20, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         num_labels=3, pad_token_id=0, attn_implementation="eager")
    model = LlamaForSequenceClassification(config).double()
    for name, param in model.named_parameters():
        if name == "model.embed_tokens.weight":
            param.requires_grad = False  # as Opacus' example
    return model


def llama_client():
    from dpfused.opacus import BatchMemoryManager, FSDP2Wrapper, PrivacyEngine

    world_size, batch_size = dist.get_world_size(), N
    train_dataset = TinySNLI()
    train_dataloader = DataLoader(train_dataset, batch_size=batch_size // world_size,
                                  sampler=DistributedSampler(train_dataset))
    model = FSDP2Wrapper(_llama(), mp_policy=None)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    privacy_engine = PrivacyEngine()
    with pytest.warns(UserWarning, match="DistributedSampler over 2 processes.*holds 8"):
        model, optimizer, criterion, train_dataloader = privacy_engine.make_private(
            module=model, optimizer=optimizer, data_loader=train_dataloader,
            noise_multiplier=0.0, max_grad_norm=CLIP, grad_sample_mode="ghost_fsdp",
            criterion=torch.nn.CrossEntropyLoss(), poisson_sampling=False)
    for _ in range(STEPS):
        with BatchMemoryManager(data_loader=train_dataloader, max_physical_batch_size=2,
                                optimizer=optimizer) as memory_safe_data_loader:
            for batch in memory_safe_data_loader:
                optimizer.zero_grad()
                outputs = model(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"])
                loss = criterion(outputs.logits, batch["label"])
                loss.backward()
                optimizer.step()
    return model, optimizer, privacy_engine


CLIENTS = {"conv": conv_client, "llama": llama_client}


# ---- the oracle: one process, the whole batch ----------------------------------------------------
def _conv_oracle_case():
    torch.manual_seed(0)
    data = _images()
    return (SampleConvNet().double(), data.tensors,
            lambda call, batch: F.cross_entropy(call(batch[0]), batch[1]))


def _llama_oracle_case():
    data = TinySNLI()
    inputs = (data.ids, data.mask, data.labels)
    return (_llama(), inputs, lambda call, batch: F.cross_entropy(
        call(input_ids=batch[0], attention_mask=batch[1]).logits, batch[2]))


ORACLE_CASES = {"conv": _conv_oracle_case, "llama": _llama_oracle_case}


def _oracle(name, groups):
    """STEPS SGD steps on the oracle's clipped sums / N (mean loss; B_norm = qN = b = N)."""
    model, inputs, example_loss = ORACLE_CASES[name]()
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(STEPS):
        grads = per_example_grads(copy.deepcopy(model), example_loss, inputs)
        thresholds = {tuple(names): c for names, c in groups}
        sums = clipped_sums(grads, [names for names, _ in groups],
                            threshold_of=lambda ns: thresholds[tuple(ns)])
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in sums:
                    p -= LR * sums[n] / N
    final = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return initial, final


# ---- two processes --------------------------------------------------------------------------------
def _client(rank, name):
    from torch.distributed.fsdp import FSDPModule

    model, optimizer, engine = CLIENTS[name]()
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        "params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()
                   if p.requires_grad},
        "groups": [([names[id(p)] for p in g.params], g.threshold)
                   for g in optimizer.instrumentation.groups],
        "units": sorted(n or "<root>" for n, m in model.named_modules()
                        if isinstance(m, FSDPModule)),
        "steps": optimizer.steps_taken,
        "epsilon": engine.get_epsilon(1e-5),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CLIENTS))
def test_opacus_fsdp2_client_on_two_ranks_equals_one_process_oracle(tmp_path, name):
    ranks = run_on_ranks(_client, tmp_path, name, world=WORLD)
    initial, expected = _oracle(name, ranks[0]["groups"])
    # HF Llama's RMSNorm computes in float32 (tests/test_clipping_oracle.py, _tolerance).
    tolerance = 1e-6 if name == "llama" else 1e-9
    for ours in ranks:
        assert ours["steps"] == STEPS and set(ours["params"]) == set(expected)
        for n, value in expected.items():
            update = value - initial[n]
            err = (ours["params"][n] - initial[n] - update).norm() / update.norm()
            assert err < tolerance, f"{name} {n}: relative error {err:.3g}"
    assert ranks[0]["epsilon"] == ranks[1]["epsilon"]
    if name == "conv":  # Opacus' wrapper: each layer its own FSDP unit, then the root
        assert ranks[0]["units"] == ["<root>", "conv1", "conv2", "fc1", "fc2"]
    else:  # every Linear, RMSNorm and the frozen embedding: a unit of its own
        assert {"<root>", "model.embed_tokens", "score", "model.norm",
                "model.layers.0.self_attn.q_proj"} <= set(ranks[0]["units"])
