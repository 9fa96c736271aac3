"""Tests for dpfused.sampling: DP batch samplers and the DP data loader."""

from __future__ import annotations

import math
import warnings
from collections import namedtuple

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, WeightedRandomSampler

from dpfused.sampling import (
    LogicalBatch,
    CyclicBatchSampler,
    DPDataLoader,
    PoissonBatchSampler,
    ShuffleBatchSampler,
    make_private_data_loader,
)
from dpfused.sampling.samplers import inclusion_threshold


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_sampler(kind: str, seed: int = 0, **kw):
    if kind == "poisson":
        return PoissonBatchSampler(num_samples=kw.pop("n", 37), sample_rate=kw.pop("q", 0.2),
                                   generator=seeded(seed), **kw)
    if kind == "cyclic":
        return CyclicBatchSampler(num_samples=kw.pop("n", 37), batch_size=kw.pop("b", 5),
                                  generator=seeded(seed), **kw)
    return ShuffleBatchSampler(num_samples=kw.pop("n", 37), batch_size=kw.pop("b", 5),
                               generator=seeded(seed), **kw)


def epochs_of(sampler, n_epochs: int) -> list[list[list[int]]]:
    return [list(sampler) for _ in range(n_epochs)]


class DictDataset(Dataset):
    """HuggingFace-style examples: dicts of fixed-length token ids and a label."""

    def __init__(self, n: int = 20, length: int = 6):
        g = seeded(3)
        self.ids = torch.randint(0, 100, (n, length), generator=g)
        self.labels = torch.arange(n)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "label": int(self.labels[i])}


def pad_collate(examples: list[dict]) -> dict:
    """A non-default collate_fn returning a dict batch."""
    return {
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long),
    }


class Stream(IterableDataset):
    def __iter__(self):
        yield from range(10)


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------


def test_poisson_batch_sizes_are_binomial():
    n, q, steps = 200, 0.1, 3000
    sampler = PoissonBatchSampler(num_samples=n, sample_rate=q, steps_per_epoch=steps,
                                  generator=seeded(1))
    batches = list(sampler)
    sizes = np.array([len(b) for b in batches])
    # Chi-square goodness of fit against Binomial(n, q), tails pooled so expected counts >= 5.
    binom = stats.binom(n, q)
    lo, hi = int(binom.ppf(0.003)), int(binom.isf(0.003))
    observed = [np.sum(sizes <= lo)] + [np.sum(sizes == k) for k in range(lo + 1, hi)] + [
        np.sum(sizes >= hi)]
    probs = [binom.cdf(lo)] + [binom.pmf(k) for k in range(lo + 1, hi)] + [binom.sf(hi - 1)]
    expected = steps * np.array(probs)
    assert expected.min() >= 5 and abs(expected.sum() - steps) < 1e-6
    _, p = stats.chisquare(observed, expected)
    assert p > 1e-3
    # Every index joins with probability q, independently of the others.
    counts = np.bincount(np.concatenate([np.asarray(b, dtype=int) for b in batches]), minlength=n)
    assert abs(counts.mean() / steps - q) < 0.005
    assert all(b == sorted(set(b)) for b in batches)  # no duplicates within a batch


@pytest.mark.parametrize("secure_mode", [False, True])
def test_poisson_rate_is_not_rounded_up_to_the_float32_grid(secure_mode):
    """Issue 19.8: float32 uniforms k / 2^24 compared with q include an index with probability
    ceil(q 2^24) / 2^24, at least 2^-24 however small q is (x3.7 at q = 1.6e-8). At q = 1e-12
    over 2^23 indices and 12 steps, that rate gives 6 inclusions on average (P(none) = e^-6);
    the rate q gives 1e-4."""
    # The secure sampler always drew float64 uniforms: fewer steps check it (its key is random).
    kwargs = {"secure_mode": True} if secure_mode else {"generator": seeded(0)}
    sampler = PoissonBatchSampler(num_samples=2**23, sample_rate=1e-12,
                                  steps_per_epoch=4 if secure_mode else 12, **kwargs)
    assert sum(len(batch) for batch in sampler) == 0


@pytest.mark.parametrize("q", [1.0, 0.5, 2.0**-30, 0.2, 1.6e-8, 1 / 3, 1e-17])
def test_inclusion_threshold_is_exactly_q_or_just_below(q):
    """Both generators draw float64 uniforms k / 2^53, so P(U < t) = t exactly for the threshold
    t = floor(q 2^53) / 2^53: never above q (the accountant composes q), below it by < 2^-53."""
    t = inclusion_threshold(q)
    assert t <= q and q - t < 2.0**-53
    assert (t * 2.0**53) == math.floor(t * 2.0**53)  # a point of the uniforms' grid
    if (q * 2.0**53).is_integer():
        assert t == q


def test_poisson_defaults_and_len():
    sampler = PoissonBatchSampler(num_samples=100, sample_rate=0.03, generator=seeded())
    assert len(sampler) == sampler.batches_per_epoch == round(1 / 0.03) == 33
    assert len(list(sampler)) == 33 and sampler.epoch == 1 and sampler.position == 0
    assert PoissonBatchSampler(num_samples=5, sample_rate=1.0).batches_per_epoch == 1


@pytest.mark.parametrize("kind", ["cyclic", "shuffle"])
def test_every_example_exactly_once_per_epoch(kind):
    sampler = make_sampler(kind, n=23, b=5, drop_last=False)
    assert len(sampler) == 5
    for epoch in epochs_of(sampler, 3):
        assert [len(b) for b in epoch] == [5, 5, 5, 5, 3]
        assert sorted(i for b in epoch for i in b) == list(range(23))


@pytest.mark.parametrize("kind", ["cyclic", "shuffle"])
def test_drop_last_drops_the_partial_batch(kind):
    sampler = make_sampler(kind, n=23, b=5, drop_last=True)
    assert len(sampler) == sampler.batches_per_epoch == 4
    epoch = list(sampler)
    assert [len(b) for b in epoch] == [5, 5, 5, 5]
    assert len({i for b in epoch for i in b}) == 20


@pytest.mark.parametrize("shuffle_once", [False, True])
def test_cyclic_order_is_identical_across_epochs(shuffle_once):
    sampler = make_sampler("cyclic", n=23, b=5, shuffle_once=shuffle_once, drop_last=False)
    first, *rest = epochs_of(sampler, 4)
    assert all(epoch == first for epoch in rest)
    flat = [i for b in first for i in b]
    assert (flat == list(range(23))) is (not shuffle_once)


def test_shuffle_order_changes_every_epoch():
    epochs = epochs_of(make_sampler("shuffle", n=50, b=10), 3)
    assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize("kind", ["poisson", "cyclic", "shuffle"])
def test_seeded_samplers_repeat_and_own_their_generator(kind):
    g = seeded(7)
    a = make_sampler(kind, seed=7, shuffle_once=True) if kind == "cyclic" else make_sampler(kind, seed=7)
    b = make_sampler(kind, seed=7, shuffle_once=True) if kind == "cyclic" else make_sampler(kind, seed=7)
    assert epochs_of(a, 2) == epochs_of(b, 2)
    torch.rand(5, generator=g)  # the caller's generator is copied, not shared
    assert a.generator is not g


def test_secure_mode_seeds_from_os_and_refuses_a_generator():
    a = ShuffleBatchSampler(num_samples=1000, batch_size=10, secure_mode=True)
    b = ShuffleBatchSampler(num_samples=1000, batch_size=10, secure_mode=True)
    assert a.secure_mode and list(a) != list(b)
    with pytest.raises(ValueError, match="secure_mode=True .* do not pass generator"):
        PoissonBatchSampler(num_samples=10, sample_rate=0.5, generator=seeded(), secure_mode=True)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: PoissonBatchSampler(num_samples=10, sample_rate=0.0), "sample_rate must be in"),
        (lambda: PoissonBatchSampler(num_samples=10, sample_rate=1.5), "sample_rate must be in"),
        (lambda: PoissonBatchSampler(num_samples=0, sample_rate=0.5), "num_samples must be"),
        (lambda: CyclicBatchSampler(num_samples=10, batch_size=0), "batch_size must be"),
        (lambda: ShuffleBatchSampler(num_samples=4, batch_size=5), "exceeds num_samples"),
    ],
)
def test_sampler_argument_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("kind", ["poisson", "cyclic", "shuffle"])
@pytest.mark.parametrize("stop_after", [0, 3, 7, 12])
def test_sampler_resume_mid_epoch_gives_identical_batches(kind, stop_after):
    kw = {"shuffle_once": True} if kind == "cyclic" else {}
    reference = [b for epoch in epochs_of(make_sampler(kind, **kw), 3) for b in epoch]

    interrupted = make_sampler(kind, **kw)
    seen = []
    while len(seen) < stop_after:  # consume stop_after batches, maybe across an epoch boundary
        for batch in interrupted:
            seen.append(batch)
            if len(seen) == stop_after:
                break
    state = interrupted.state_dict()

    resumed = make_sampler(kind, seed=99)  # another seed (and order): the state must override it
    resumed.load_state_dict(state)
    while len(seen) < len(reference):
        seen.extend(resumed)
    assert seen[: len(reference)] == reference


def test_sampler_iterator_continues_after_a_break():
    sampler = make_sampler("poisson", q=0.3)
    reference = list(make_sampler("poisson", q=0.3))
    first = []
    for batch in sampler:
        first.append(batch)
        if len(first) == 2:
            break
    assert first + list(sampler) == reference


def test_sampler_state_dict_rejects_other_configuration():
    state = make_sampler("cyclic", n=37, b=5).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        make_sampler("cyclic", n=37, b=6).load_state_dict(state)
    with pytest.raises(ValueError, match="sampling"):
        make_sampler("shuffle", n=37, b=5).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Data loader
# ---------------------------------------------------------------------------------------------


def tensor_loader(n: int = 40, batch_size: int = 8, **kw) -> DataLoader:
    x = torch.arange(n * 3 * 2, dtype=torch.float32).reshape(n, 3, 2)
    y = torch.arange(n)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, **kw)


def test_defaults_come_from_the_users_loader():
    def init_fn(worker_id):  # noqa: ARG001
        return None

    user = tensor_loader(n=40, batch_size=8, num_workers=0, pin_memory=False, worker_init_fn=init_fn)
    loader = make_private_data_loader(user, sampling="poisson", generator=seeded())
    assert loader.sampling == "poisson" and loader.sample_rate == 8 / 40
    assert loader.num_samples == 40 and loader.batches_per_epoch == len(loader) == 5
    assert loader.batch_size is None and loader.drop_last is None
    assert loader.data_loader.worker_init_fn is init_fn and loader.dataset is user.dataset
    cyclic = make_private_data_loader(user, sampling="cyclic", drop_last=False)
    assert cyclic.batch_size == 8 and cyclic.sample_rate is None and cyclic.drop_last is False
    assert make_private_data_loader(user, sampling="shuffle", batch_size=16).batches_per_epoch == 2


def test_iterable_dataset_is_refused():
    with pytest.raises(ValueError, match="IterableDataset .* cannot be sampled per example"):
        make_private_data_loader(DataLoader(Stream(), batch_size=2))
    with pytest.raises(ValueError, match="map-style dataset"):
        DPDataLoader(Stream(), batch_sampler=PoissonBatchSampler(num_samples=10, sample_rate=0.5))


def test_custom_sampler_is_replaced_with_a_warning():
    dataset = tensor_loader().dataset
    user = DataLoader(dataset, batch_size=4,
                      sampler=WeightedRandomSampler(torch.ones(40), num_samples=40))
    with pytest.warns(UserWarning, match="WeightedRandomSampler.*replaced by 'shuffle'"):
        loader = make_private_data_loader(user, sampling="shuffle")
    assert loader.batch_size == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shuffle=True is the DataLoader's own sampling: no warning
        make_private_data_loader(tensor_loader(shuffle=True), sampling="cyclic")


def test_loader_argument_errors():
    with pytest.raises(ValueError, match="sampling must be one of"):
        make_private_data_loader(tensor_loader(), sampling="uniform")
    with pytest.raises(ValueError, match="needs sample_rate or batch_size"):
        make_private_data_loader(DataLoader(tensor_loader().dataset, batch_size=None))
    with pytest.raises(ValueError, match="sample_rate and steps_per_epoch apply to sampling='poisson'"):
        make_private_data_loader(tensor_loader(), sampling="cyclic", sample_rate=0.1)
    with pytest.raises(ValueError, match="max_physical_batch_size must be"):
        make_private_data_loader(tensor_loader(), max_physical_batch_size=0)


@pytest.mark.parametrize(
    "dataset, collate_fn, check",
    [
        (tensor_loader().dataset, None,
         lambda b: isinstance(b, list) and b[0].shape == (0, 3, 2) and b[0].dtype == torch.float32
         and b[1].shape == (0,) and b[1].dtype == torch.int64),
        (DictDataset(), None,
         lambda b: set(b) == {"input_ids", "attention_mask", "label"}
         and b["input_ids"].shape == (0, 6) and b["label"].shape == (0,)),
        (DictDataset(), pad_collate,
         lambda b: b["input_ids"].shape == (0, 6) and b["labels"].dtype == torch.long),
    ],
)
def test_empty_poisson_batch_collates_to_zero_size(dataset, collate_fn, check):
    user = DataLoader(dataset, batch_size=4, collate_fn=collate_fn)
    loader = make_private_data_loader(user, sample_rate=1e-12, steps_per_epoch=3,
                                      max_physical_batch_size=2, generator=seeded())
    batches = list(loader)
    assert len(batches) == 3  # an empty logical batch is one empty physical batch
    assert all(check(b) for b in batches)
    assert loader.current.logical_size == 0 and loader.current.is_last_physical


def test_empty_batch_keeps_named_tuples_and_non_tensor_fields():
    Example = namedtuple("Example", ["x", "name"])

    class Named(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return Example(torch.zeros(2, dtype=torch.float64), f"ex{i}")

    loader = make_private_data_loader(DataLoader(Named(), batch_size=1), sample_rate=1e-12,
                                      steps_per_epoch=1)
    (batch,) = list(loader)
    assert isinstance(batch, Example) and batch.x.shape == (0, 2) and batch.x.dtype == torch.float64
    assert len(batch.name) == 0  # the per-example strings, none of them


def test_physical_splitting_and_current():
    user = tensor_loader(n=60, batch_size=30)
    loader = make_private_data_loader(user, sampling="poisson", max_physical_batch_size=7,
                                      generator=seeded(4))
    logical = [list(b) for b in PoissonBatchSampler(num_samples=60, sample_rate=0.5,
                                                    generator=seeded(4))]
    infos, chunks = [], []
    for epoch in range(2):
        for x, y in loader:
            info = loader.current
            assert isinstance(info, LogicalBatch) and info.physical_size == len(y) <= 7
            infos.append(info)
            chunks.append(y.tolist())
    assert loader.step == 4
    by_step: dict[int, list] = {}
    for info, chunk in zip(infos, chunks):
        by_step.setdefault(info.step, []).append((info, chunk))
    assert sorted(by_step) == [0, 1, 2, 3]
    for step, parts in by_step.items():
        assert [p[0].is_last_physical for p in parts] == [False] * (len(parts) - 1) + [True]
        assert {p[0].epoch for p in parts} == {step // 2}
        assert {p[0].position_in_epoch for p in parts} == {step % 2}
        merged = [i for _, chunk in parts for i in chunk]
        assert {p[0].logical_size for p in parts} == {len(merged)}
        assert len(parts) == max(1, math.ceil(len(merged) / 7))
        if step < 2:
            assert merged == logical[step]


@pytest.mark.parametrize("k", [1, 3])
def test_lockstep_ranks_yield_equal_physical_batch_counts(k):
    """FSDP2: every rank runs as many physical batches as the largest share needs, so the ranks'
    collectives stay in step; the shares still partition the logical batch, each chunk <= k;
    a rank with nothing left runs a padding example (k=1 makes that happen)."""
    world = 3
    def steps(rank):
        loader = make_private_data_loader(
            tensor_loader(n=40, batch_size=10), sampling="poisson", max_physical_batch_size=k,
            generator=seeded(2), rank=rank, world_size=world, lockstep=True)
        out: dict[int, list] = {}
        for _ in range(2):
            for _, y in loader:
                out.setdefault(loader.current.step, []).append((loader.current, y.tolist()))
        return out

    ranks = [steps(r) for r in range(world)]
    logical = [list(b) for b in PoissonBatchSampler(num_samples=40, sample_rate=0.25,
                                                    generator=seeded(2))]
    assert set(ranks[0]) == set(ranks[1]) == set(ranks[2])
    for step in ranks[0]:
        counts = {len(r[step]) for r in ranks}
        assert len(counts) == 1  # the same number of physical batches on every rank
        size = ranks[0][step][0][0].logical_size
        assert counts == {max(1, math.ceil(math.ceil(size / world) / k))}
        # A rank whose share ran out runs one example of the logical batch, marked as padding.
        merged = sorted(i for r in ranks for info, chunk in r[step] if not info.padding
                        for i in chunk)
        if step < len(logical):
            assert merged == sorted(logical[step])
        for r in ranks:
            assert all(len(chunk) <= k for _, chunk in r[step])
            for info, chunk in r[step]:
                assert info.padding in (0, 1) and (not info.padding or len(chunk) == 1)
                assert info.physical_size == len(chunk)
            assert [info.is_last_physical for info, _ in r[step]][-1]


def test_loader_with_workers_keeps_current_in_sync():
    user = DataLoader(DictDataset(n=30), batch_size=6, collate_fn=pad_collate, num_workers=2,
                      prefetch_factor=4)
    loader = make_private_data_loader(user, sampling="poisson", max_physical_batch_size=2,
                                      generator=seeded(5))
    assert loader.num_workers == 2
    reference = list(PoissonBatchSampler(num_samples=30, sample_rate=0.2, generator=seeded(5)))
    got: dict[int, list[int]] = {}
    for batch in loader:
        info = loader.current
        assert info.physical_size == len(batch["labels"])
        got.setdefault(info.step, []).extend(batch["labels"].tolist())
    assert [got[k] for k in range(len(reference))] == reference


@pytest.mark.parametrize("sampling", ["poisson", "cyclic", "shuffle"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_mid_epoch_gives_identical_batches(sampling, num_workers):
    def build(seed):
        user = tensor_loader(n=30, batch_size=4, num_workers=num_workers)
        return make_private_data_loader(user, sampling=sampling, max_physical_batch_size=3,
                                        shuffle_once=sampling == "cyclic",
                                        generator=seeded(seed))

    def run(loader, logical_steps):
        """Physical batches until ``logical_steps`` logical steps are consumed in all."""
        out = []
        while loader.step < logical_steps:
            for _, y in loader:
                out.append((loader.current.step, loader.current.epoch, y.tolist()))
                if loader.step == logical_steps:
                    break
        return out

    per_epoch = build(0).batches_per_epoch
    total = 2 * per_epoch + 2
    reference = run(build(0), total)
    stop = per_epoch + 3  # stop mid-epoch; prefetching has drawn further ahead
    first = build(0)
    before = run(first, stop)
    state = first.state_dict()
    assert state["step"] == stop
    resumed = build(123)
    resumed.load_state_dict(state)
    after = run(resumed, total)
    assert before + after == reference
    # The same loader, iterated again after the break, also continues where it was consumed.
    assert before + run(first, total) == reference


def test_loader_state_at_epoch_end_starts_the_next_epoch():
    user = tensor_loader(n=30, batch_size=4)
    loader = make_private_data_loader(user, sampling="shuffle", generator=seeded(2))
    reference = make_private_data_loader(user, sampling="shuffle", generator=seeded(2))
    ref = [y.tolist() for _ in range(2) for _, y in reference]
    got = []
    for _, y in loader:
        got.append(y.tolist())
        if loader.current.position_in_epoch == loader.batches_per_epoch - 1:
            state = loader.state_dict()  # the last batch was yielded; the epoch is not closed yet
    assert state["sampler"]["epoch"] == 1 and state["sampler"]["position"] == 0
    resumed = make_private_data_loader(user, sampling="shuffle", generator=seeded(9))
    resumed.load_state_dict(state)
    got += [y.tolist() for _, y in resumed]
    assert got == ref
    assert resumed.current.step == 2 * loader.batches_per_epoch - 1
