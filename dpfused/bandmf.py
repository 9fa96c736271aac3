"""Correlated noise: banded matrix factorization (BandMF), docs/design.md §5.1 and §7.2.

DP-SGD adds independent noise at every step. The matrix mechanism adds noise correlated across
steps so that much of it cancels in the model, which sums the gradients (prefix sums, through
momentum too) [Denisov22, Choquette-Choo23]. dpfused releases at step t

    clipped sum_t + sigma C (M^-1 Z)_t,     Z_t i.i.d. N(0, I),

with M a lower-triangular, b-banded Toeplitz strategy matrix (coefficients m_0..m_{b-1}, largest
column norm 1), computed in streaming form: the last b-1 noise vectors of every noised tensor are
kept (``NoiseHistory``); the arithmetic itself is ``privacy_math.correlated_noise``. One band is
DP-SGD, bit for bit.

Strategies (``BandMF.strategy``):

- ``"sqrt"``: the banded square-root factorization of the prefix-sum workload: the coefficients
  of (1 - x)^(-1/2), binom(2k, k) / 4^k, truncated to b bands and normalized to norm 1
  [Choquette-Choo23; Fichtenberger23 for the square root].
- ``"optimized"``: the b coefficients minimizing the error of the noise in the model iterates for
  ``steps`` steps of SGD with ``momentum`` (``toeplitz_error``; McKenna 2024, "Scaling up the
  banded matrix factorization mechanism"), by scipy's BFGS on the closed form and its gradient,
  started from the square root.

Privacy needs every example's steps to be at least b apart (a ``cyclic_poisson`` sampler with b
partitions, or cyclic batches with at least b batches per epoch): then the example changes columns
of M with disjoint supports, each by at most C times its column norm, and the amplified analysis
of [Choquette-Choo23, Thm. 4] accounts ceil(T/b) Poisson-sampled Gaussians at rate q b with noise
multiplier sigma / max column norm (what JAX-Privacy does).

Memory: b - 1 buffers the size of every trainable parameter (float32 at least; on each rank, its
shard under FSDP2). For LoRA adapters that is little; for a full model it is (b-1) model copies.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from dpfused import privacy_math
from dpfused.arguments import check_choice, check_integer, check_number

__all__ = [
    "BANDMF_STRATEGIES",
    "BandMF",
    "NoiseHistory",
    "optimized_toeplitz_coefficients",
    "sqrt_toeplitz_coefficients",
    "strategy_matrix",
    "toeplitz_error",
]

BANDMF_STRATEGIES = ("sqrt", "optimized")


@dataclass(frozen=True, kw_only=True)
class BandMF:
    """Banded matrix factorization noise; pass it as ``make_private(noise=BandMF(bands=b))``.

    Args:
        bands: b >= 1, the number of bands of the strategy matrix (1: DP-SGD's independent noise).
            Each step keeps b - 1 past noise vectors per trainable parameter.
        strategy: "sqrt" (default; no step count needed) or "optimized" (needs ``steps``).
        steps: the number of training steps T. Required by "optimized"; when given, b <= T is
            checked (make_private_with_epsilon checks it against its own steps too).
        momentum: "optimized" only: the SGD momentum beta of the workload whose error is
            minimized (0: plain SGD).

    Raises:
        ValueError / TypeError: a value out of range, naming the field; bands > steps.
    """

    bands: int
    strategy: str = "sqrt"
    steps: int | None = None
    momentum: float = 0.0

    def __post_init__(self):
        check_integer("BandMF: bands", self.bands)
        check_choice("BandMF: strategy", self.strategy, BANDMF_STRATEGIES)
        if self.steps is not None:
            check_integer("BandMF: steps", self.steps)
            check_bands_fit(self.bands, self.steps)
        elif self.strategy == "optimized":
            raise ValueError("BandMF: strategy='optimized' needs steps (the number of training "
                             "steps T whose error it minimizes); pass BandMF(..., steps=T)")
        check_number("BandMF: momentum", self.momentum, "in [0, 1)", lambda v: 0 <= v < 1)
        if self.momentum and self.strategy != "optimized":
            raise ValueError("BandMF: momentum applies to strategy='optimized' only (the square "
                             "root factorizes the plain prefix sum); drop it")

    @property
    def coefficients(self) -> tuple[float, ...]:
        """m_0..m_{b-1} of the strategy matrix, largest column norm 1."""
        if self.strategy == "sqrt" or self.bands == 1:
            return sqrt_toeplitz_coefficients(self.bands)
        return optimized_toeplitz_coefficients(self.bands, self.steps, float(self.momentum))

    @property
    def max_column_norm(self) -> float:
        """The sensitivity factor of the strategy: the accountant divides sigma by it."""
        return privacy_math.max_column_norm(self.coefficients)

    def describe(self) -> str:
        """One line for the privacy report."""
        if self.bands == 1:
            return "independent Gaussian noise (BandMF with 1 band = DP-SGD)"
        how = ("square-root Toeplitz" if self.strategy == "sqrt"
               else f"optimized Toeplitz for {self.steps} steps, momentum {self.momentum:g}")
        return f"BandMF, {self.bands} bands, {how} strategy (correlated noise)"


def check_bands_fit(bands: int, steps: int) -> None:
    """b <= T: more bands than steps cannot be used (and the optimized strategy is undefined)."""
    if bands > steps:
        raise ValueError(
            f"BandMF: bands={bands} is more than the {steps} training steps; use at most "
            f"{steps} bands (the noise of a step is correlated with the previous bands - 1 steps)")


# ---- strategies ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def sqrt_toeplitz_coefficients(bands: int) -> tuple[float, ...]:
    """binom(2k, k) / 4^k for k < b (the coefficients of (1 - x)^(-1/2)), normalized to norm 1."""
    raw = [1.0]
    for k in range(1, bands):
        raw.append(raw[-1] * (2 * k - 1) / (2 * k))
    return _normalized(raw)


def _normalized(raw) -> tuple[float, ...]:
    """Scaled so the largest column norm, sqrt(sum m_j^2), is 1 (one band: exactly (1.0,))."""
    norm = privacy_math.max_column_norm(raw)
    return tuple(float(c) / norm for c in raw)


def _workload_coefficients(steps: int, momentum: float) -> np.ndarray:
    """a_k of the lower-triangular Toeplitz workload: the model after SGD with momentum beta sums
    the gradients with weights a_k = (1 - beta^(k+1)) / (1 - beta) (1 for plain SGD)."""
    k = np.arange(steps, dtype=np.float64)
    if momentum == 0:
        return np.ones(steps)
    return (1.0 - momentum ** (k + 1)) / (1.0 - momentum)


def _error_and_gradient(coefficients: np.ndarray, workload: np.ndarray) -> tuple[float, np.ndarray]:
    """log of sum_k (T-k) beta_k^2 * sum_j m_j^2 and its gradient in m (see ``toeplitz_error``).

    beta = coefficients of a(x) / m(x) (the Toeplitz matrix A M^-1), by an IIR filter; with
    h = beta / m(x), d beta_k / d m_j = -h_{k-j}.
    """
    from scipy.signal import lfilter

    steps = len(workload)
    weights = np.arange(steps, 0, -1, dtype=np.float64)  # (T - k): the length of diagonal k
    with np.errstate(over="ignore", invalid="ignore"):
        beta = lfilter([1.0], coefficients, workload)
        loss = float(np.dot(weights, beta * beta))
        if not math.isfinite(loss) or loss <= 0:
            return math.inf, np.zeros_like(coefficients)
        h = lfilter([1.0], coefficients, beta)
        weighted = weights * beta
        grad_loss = np.array([-2.0 * np.dot(weighted[j:], h[: steps - j])
                              for j in range(len(coefficients))])
    sensitivity = float(np.dot(coefficients, coefficients))
    value = math.log(loss) + math.log(sensitivity)
    return value, grad_loss / loss + 2.0 * coefficients / sensitivity


def toeplitz_error(coefficients, *, steps: int, momentum: float = 0.0) -> float:
    """Root mean squared noise in the model iterates, per coordinate, in units of sigma C eta.

    The model after t steps of SGD with momentum beta is x_0 - eta sum_s A_ts (g_s + noise_s)
    (A the workload, ``_workload_coefficients``). With BandMF the noise is sigma C M^-1 Z, so the
    iterates carry sigma C A M^-1 Z, whose mean squared value per coordinate over T steps is
    ||A M^-1||_F^2 / T times sigma^2 C^2 eta^2, at sensitivity (largest column norm of M) 1. DP-SGD
    is M = I: ||A||_F^2 / T. This is the quantity the "optimized" strategy minimizes, scale-free:
    ||A M^-1||_F^2 * max column norm(M)^2 / T [McKenna24, Choquette-Choo23].
    """
    coefficients = np.asarray(coefficients, dtype=np.float64)
    value, _ = _error_and_gradient(coefficients, _workload_coefficients(steps, momentum))
    return math.sqrt(math.exp(value) / steps)


@functools.lru_cache(maxsize=64)
def optimized_toeplitz_coefficients(bands: int, steps: int, momentum: float = 0.0
                                    ) -> tuple[float, ...]:
    """The b Toeplitz coefficients minimizing ``toeplitz_error`` for ``steps`` and ``momentum``.

    scipy's BFGS on the closed form and its gradient, from the square-root coefficients (BFGS,
    not L-BFGS-B: a trial step into an unstable m(x), whose error is infinite, stops L-BFGS-B's
    line search at the start); the result is kept only if it is better than them, then
    normalized to column norm 1. Milliseconds for b = 32, T = 5000.
    """
    from scipy.optimize import minimize

    check_bands_fit(bands, steps)
    start = np.asarray(sqrt_toeplitz_coefficients(bands), dtype=np.float64)
    if bands == 1:
        return tuple(start.tolist())
    workload = _workload_coefficients(steps, momentum)
    result = minimize(_error_and_gradient, start, args=(workload,), jac=True, method="BFGS",
                      options={"maxiter": 1000, "gtol": 1e-9})
    best = result.x if result.fun < _error_and_gradient(start, workload)[0] else start
    if best[0] < 0:  # the error is invariant under m -> -m; keep m_0 > 0
        best = -best
    return _normalized(best.tolist())


def strategy_matrix(coefficients, steps: int, *, dtype=torch.float64) -> torch.Tensor:
    """The T x T lower-triangular banded Toeplitz matrix M (for tests and the error table)."""
    matrix = torch.zeros(steps, steps, dtype=dtype)
    for j, m in enumerate(coefficients):
        if j < steps:
            matrix += torch.diag(torch.full((steps - j,), float(m), dtype=dtype), -j)
    return matrix


# ---- the streaming state -------------------------------------------------------------------------


class NoiseHistory:
    """The secret state of BandMF noise: the last b - 1 unit noise vectors of every noised tensor.

    Keys are the positions of the private parameters in the optimizer's order (stable across a
    save and a load). ``correlator(key)`` gives ``privacy_math.noised_gradient`` the map from a
    fresh draw to the correlated noise; the new unit noises are staged and join the history only
    at ``commit``, so a step that fails half-way leaves the history as it was.

    Knowing the history, one subtracts the last b - 1 steps' noise from their released gradients:
    it is as secret as the noise generator's state (docs/design.md §5.1).

    Args:
        coefficients: m_0..m_{b-1} (``BandMF.coefficients``).
    """

    def __init__(self, coefficients):
        self.coefficients = tuple(float(c) for c in coefficients)
        self._past: dict[int, list[torch.Tensor | None]] = {}
        self._staged: dict[int, torch.Tensor | None] = {}
        self.next_step: int | None = None  # the loader step the next release must belong to

    @property
    def bands(self) -> int:
        return len(self.coefficients)

    def check_step(self, step: int | None) -> None:
        """Before a release: it must be the loader's next logical batch (no batch skipped).
        ``step`` None: a step on batches the loader did not draw (no guarantee at all, so
        nothing to keep apart).

        The separation of an example's steps, which the accounting relies on, is counted in the
        loader's steps, while the noise is correlated over the released ones; a skipped batch
        would bring two of an example's steps closer than b in the noise.

        Raises:
            ValueError: the step does not follow the last released one; nothing changes.
        """
        self._staged = {}
        if (self.bands > 1 and step is not None and self.next_step is not None
                and step != self.next_step):
            raise ValueError(
                f"BandMF: optimizer.step() released the logical batch of loader step {step}, but "
                f"the last one released was step {self.next_step - 1}: with correlated noise every "
                "logical batch the private data loader draws must be stepped, in order (an "
                "example's steps are at least `bands` apart in the loader's steps, and the noise "
                "is correlated over the released ones). Step every batch, an empty one included; "
                "no step was taken")

    def correlator(self, key: int) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """``(z, std) -> noise`` for the tensor ``key`` at this step (staged until ``commit``)."""

        def correlate(z: torch.Tensor, std: float) -> torch.Tensor:
            noise = privacy_math.correlated_noise(z, std=std, past=self._past.get(key, ()),
                                                  coefficients=self.coefficients)
            if self.bands > 1:
                self._staged[key] = privacy_math.unit_noise(noise, std)
            return noise

        return correlate

    def commit(self, step: int | None) -> None:
        """The step was released: its unit noises join the history, the oldest leave it. After a
        step on batches the loader did not draw (``step`` None) any next step is accepted."""
        keep = self.bands - 1
        if keep:
            for key, unit in self._staged.items():
                self._past[key] = [unit, *self._past.get(key, [])][:keep]
        self._staged = {}
        self.next_step = None if step is None else step + 1

    @property
    def nbytes(self) -> int:
        """Memory the history holds now (at most b - 1 tensors per noised parameter)."""
        return sum(w.numel() * w.element_size() for past in self._past.values() for w in past
                   if w is not None)

    def state_dict(self) -> dict[str, Any]:
        """Coefficients, the next step and the unit noises, as plain data (string keys: JSON in
        distributed checkpoints). Secret: keep it with the noise generator's state."""
        return {"coefficients": list(self.coefficients), "next_step": self.next_step,
                "past": {str(key): [None if w is None else w.detach().cpu().clone() for w in past]
                         for key, past in self._past.items()}}

    def check_state(self, state: Any, *, shapes: dict[int, torch.Size]) -> None:
        """What ``load_state_dict`` refuses, without changing anything.

        Raises:
            ValueError: not a history, saved with other coefficients (mixing two strategies' rows
                would give a matrix whose columns may exceed norm 1), or for other parameters.
        """
        if not isinstance(state, dict) or not {"coefficients", "next_step", "past"} <= set(state):
            raise ValueError("load_state_dict: the saved BandMF history is malformed; resume from "
                             "the checkpoint as it was written")
        saved = tuple(float(c) for c in state["coefficients"])
        if saved != self.coefficients:
            raise ValueError(
                f"load_state_dict: the saved BandMF history was made with {len(saved)} band(s) "
                f"and coefficients {saved}, this run uses {len(self.coefficients)} band(s) and "
                f"{self.coefficients}; make_private with the saved run's BandMF (mixing two "
                "strategies' rows would break the sensitivity bound)")
        for key, tensors in state["past"].items():
            key = int(key)
            if key not in shapes or len(tensors) > self.bands - 1 or any(
                    w is not None and tuple(w.shape) != tuple(shapes[key]) for w in tensors):
                raise ValueError(
                    f"load_state_dict: the saved BandMF history has a tensor for parameter {key} "
                    "that this model does not have (or of another shape); make_private with the "
                    "saved run's model and parallelism")

    def load_state_dict(self, state: dict[str, Any], *, devices: dict[int, torch.device],
                        shapes: dict[int, torch.Size]) -> None:
        """Restore a history saved by ``state_dict`` onto the parameters' devices.

        Raises:
            ValueError: what ``check_state`` refuses; nothing changes then.
        """
        self.check_state(state, shapes=shapes)
        self._past = {int(key): [None if w is None else w.to(devices[int(key)]) for w in tensors]
                      for key, tensors in state["past"].items()}
        self._staged = {}
        self.next_step = state["next_step"]

    def restart(self) -> None:
        """Forget the history: the next release starts the correlation anew. Private: the noise
        is then M'^-1 Z with M' block diagonal (the strategy restarted), still b-banded with
        columns of norm <= 1; only the cancellation across the restart is lost."""
        self._past, self._staged, self.next_step = {}, {}, None
