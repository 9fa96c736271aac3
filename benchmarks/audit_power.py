"""How large must an audit be to catch a real bug? The search behind the README's recommendations.

Two leaky test doubles (the ones tests/test_audit.py uses):

* ``noise/3``: ``privacy_math.noise_std`` divided by 3 while the accountant records sigma;
* ``ignores q``: a Poisson sampler that puts every example in every batch while the accountant
  uses q.

For each audit setting, at increasing sizes (canaries for ``one_run``, runs for ``trials``), the
real ``audit_privacy`` runs on the double with ``--seeds`` seeds and on the honest library with as
many; the table gives how many of them exceeded the claim, the power model's estimate for the
double (the report's ``detectable_noise_multiplier`` of the honest run says whether noise/3 lies
within reach) and the seconds per audit.

    OMP_NUM_THREADS=1 python benchmarks/audit_power.py            # the whole search, ~25 min
    OMP_NUM_THREADS=1 python benchmarks/audit_power.py --seeds 3  # quicker, rougher
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from dpfused import audit, privacy_math
from dpfused.sampling import PoissonBatchSampler

NUM_REAL = 16  # user examples beside the canaries; the audit reads only the canaries' probe
SIGMA = 2.0


@contextlib.contextmanager
def noise_divided_by(divisor: float):
    correct = privacy_math.noise_std
    privacy_math.noise_std = lambda *args, **kw: correct(*args, **kw) / divisor
    try:
        yield
    finally:
        privacy_math.noise_std = correct


@contextlib.contextmanager
def sampler_ignores_q():
    correct = PoissonBatchSampler._epoch_batches

    def everyone(self, generator):
        for _ in range(self.batches_per_epoch):
            torch.rand(self.num_samples, generator=generator)
            yield list(range(self.num_samples))

    PoissonBatchSampler._epoch_batches = everyone
    try:
        yield
    finally:
        PoissonBatchSampler._epoch_batches = correct


DOUBLES = {"honest": contextlib.nullcontext, "noise/3": lambda: noise_divided_by(3.0),
           "ignores q": sampler_ignores_q}


def base_arguments():
    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(NUM_REAL, 4, generator=g),
                            torch.randint(0, 2, (NUM_REAL,), generator=g))
    return dict(make_model=lambda: nn.Linear(4, 2),
                make_optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                dataset=dataset, loss_fn=nn.CrossEntropyLoss(reduction="none"),
                max_grad_norm=1.0, delta=1e-5, noise_multiplier=SIGMA, clipping="flat")


def every_step(size):
    """one_run, cyclic, one batch per epoch, 1 step: every canary in every step."""
    return dict(method="one_run", canaries=size, sampling="cyclic", batch_size=NUM_REAL + size,
                steps=1)


def poisson(q, steps):
    def setting(size):
        return dict(method="one_run", canaries=size, sampling="poisson",
                    batch_size=round(q * (NUM_REAL + size)), steps=steps)
    setting.__doc__ = f"one_run, Poisson q={q}, {steps} step(s)"
    return setting


def trials_every_step(size):
    """trials, cyclic, one batch per epoch, 1 step: the canary in every step."""
    return dict(method="trials", trials=size, sampling="cyclic", batch_size=NUM_REAL + 1, steps=1)


SEARCHES = [  # (setting, sizes, doubles)
    (every_step, (250, 500, 1000, 2000), ("noise/3",)),
    (poisson(0.5, 1), (1000, 2000, 5000), ("noise/3",)),
    (poisson(0.2, 4), (1000, 2000, 5000), ("noise/3", "ignores q")),
    (poisson(0.05, 1), (250, 500, 1000), ("ignores q",)),
    (trials_every_step, (200, 1000, 2000), ("noise/3",)),
]


def run(setting, size, double, seeds):
    flagged, seconds, reports = 0, 0.0, []
    for seed in range(seeds):
        start = time.perf_counter()
        with DOUBLES[double](), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = audit.audit_privacy(**base_arguments(), **setting(size), seed=seed)
        seconds += time.perf_counter() - start
        flagged += report.exceeds_claim
        reports.append(report)
    return flagged, seconds / seeds, reports


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"sigma={SIGMA}, delta=1e-5, C=1, flat clipping, {NUM_REAL} user examples; "
          f"{args.seeds} seeds per cell")
    print("| setting | size | double | exceeded the claim | claim | honest: exceeded, detectable "
          "noise (median), blind | s/audit |")
    print("|---|---|---|---|---|---|---|")
    for setting, sizes, doubles in SEARCHES:
        for size in sizes:
            honest, honest_s, honest_reports = run(setting, size, "honest", args.seeds)
            detect = sorted(r.detectable_noise_multiplier for r in honest_reports)[args.seeds // 2]
            blind = sum(r.blind for r in honest_reports)
            for double in doubles:
                flagged, per_audit, reports = run(setting, size, double, args.seeds)
                print(f"| {setting.__doc__.rstrip('.')} | {size} | {double} | "
                      f"{flagged}/{args.seeds} | {reports[0].claimed_epsilon:.3g} | {honest}/"
                      f"{args.seeds}, sigma/{SIGMA / max(detect, 1e-12):.3g}, {blind}/{args.seeds} "
                      f"| {per_audit:.1f} |", flush=True)


if __name__ == "__main__":
    main()
