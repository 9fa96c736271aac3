"""The privacy-critical arithmetic of DP-SGD, written once (docs/design.md §3-§5).

Every path that clips, scales or noises a gradient calls these functions; nothing else in dpfused
computes a clip factor, a sensitivity, a noise standard deviation or the final normalization.

    per example i, group g:  c_ig = min(1, C_g / (N_ig + 1e-6)),  N_ig >= ||released G_ig||
                             (automatic clipping, AUTO-S: c_ig = C_g / (N_ig + gamma))
    sensitivity:             C = sqrt(sum_g C_g^2)          (add/remove adjacency)
    final gradient:          (sum_i c_ig G_ig + N(0, sigma^2 C^2 I)) / B_norm
                             (BandMF: the noise of step t is sigma C (M^-1 Z)_t, M banded Toeplitz)

With adaptive thresholds (docs/design.md §4, Andrew et al. 2021) each step also releases, per group, a
noisy count of the examples the group did not clip; it is the same sampled batch, so the gradient
and the counts are one Gaussian mechanism with 1/sigma_eff^2 = 1/sigma^2 + K/(4 sigma_b^2).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from dpfused.arguments import check_clipping_function
from dpfused.secure_random import ChaCha20Generator

__all__ = [
    "CLIP_EPS",
    "CLIPPING_FUNCTIONS",
    "DEFAULT_STABILITY",
    "norm_upper_bound",
    "clip_factors",
    "example_multipliers",
    "NONFINITE_CHOICES",
    "nonfinite_examples",
    "without_examples",
    "default_group_thresholds",
    "sensitivity",
    "noise_std",
    "noise_std_of_rank_share",
    "gradient_normalizer",
    "truncated_expected_batch_size",
    "truncation_probability",
    "noised_gradient",
    "max_column_norm",
    "correlated_noise",
    "unit_noise",
    "centered_unclipped_count",
    "count_sensitivity",
    "effective_noise_multiplier",
    "gradient_noise_multiplier",
    "noised_counts",
    "unclipped_fractions",
    "adapted_thresholds",
    "LOSS_GRID",
    "joint_noise_multiplier",
    "noise_multiplier_after",
    "clipped_loss_units",
    "noised_loss_mean",
]

# Added to the norm before dividing, as in Opacus and docs/design.md §4: keeps c <= 1 without a branch and
# keeps ||c_i G_i|| <= C_g even when the norm rounds.
CLIP_EPS = 1e-6

# How a norm bound becomes a clip factor (docs/design.md §4): "standard" min(1, C / (N + 1e-6)), or
# "automatic" C / (N + gamma) (AUTO-S, Bu et al. 2023), every example scaled, none left as it was.
CLIPPING_FUNCTIONS = ("standard", "automatic")
# gamma of AUTO-S: the paper's default 0.01 (in units of the per-example gradient norm).
DEFAULT_STABILITY = 0.01


def norm_upper_bound(value: torch.Tensor, error: torch.Tensor, release: torch.Tensor,
                     magnitude: torch.Tensor) -> torch.Tensor:
    """N_i, an upper bound of the norm of what example i's clipped sum will actually release.

    The guarantee of the clip (docs/design.md §3, "Floating point"): for ANY input, finite or
    crafted to cancel, ||released contribution of example i|| <= c_i N_i <= C. Two bounds, each
    rigorous on its own, and the smaller is taken:

    - sqrt(max(value, 0) + error) + release: ``value`` the computed squared norm (ghost, direct,
      cross terms: it may cancel to anything, negative included), ``error`` a bound on its error,
      ``release`` a bound on how far the released per-example gradient is from the one whose norm
      was estimated (its own rounding, example by example);
    - ``magnitude``: a bound from positive quantities only (sum_t ||left_t|| ||right_t|| for a factor
      piece), which cannot cancel and stays finite for every finite fp32/bf16/fp16 input.

    Where the first is not finite (the squared norms overflowed) the second is used; where the
    second is not finite the example's gradient itself is (``nonfinite_examples``).

    Args:
        value, error, release, magnitude: (B,) float64, summed over a clipping group's pieces as
            ``dpfused.bookkeeper`` does (release and magnitude in quadrature over parameters).

    Returns:
        (B,) float64 norm bounds.
    """
    estimated = value.clamp_min(0).add(error).sqrt().add(release)
    return torch.where(torch.isfinite(estimated), torch.minimum(estimated, magnitude), magnitude)


def clip_factors(norm_bound: torch.Tensor, threshold: float, *, clipping_function: str = "standard",
                 stability: float = DEFAULT_STABILITY) -> torch.Tensor:
    """Per-example clip factors from norm upper bounds ``(B,)``.

    - ``"standard"``: ``min(1, C / (N_i + 1e-6))``;
    - ``"automatic"`` (AUTO-S, Bu et al. 2023, "Automatic Clipping: Differentially Private Deep
      Learning Made Easier and Stronger"): ``C / (N_i + gamma)``, gamma = ``stability`` > 0. Every
      example is scaled, small gradients up to C / gamma times. Since N_i >= ||G_i||, the
      contribution c_i ||G_i|| <= C N_i / (N_i + gamma) < C: the sensitivity is C as with the
      standard function, so noise and accounting are unchanged. The rounding of c_i itself is the
      same one ulp as for the standard factor (docs/design.md §3, tau).
    """
    norms = _accumulation(norm_bound)
    if clipping_function == "automatic":
        return threshold / (norms + stability)
    if clipping_function != "standard":
        check_clipping_function(clipping_function, stability)
    return (threshold / (norms + CLIP_EPS)).clamp(max=1.0)


def example_multipliers(norm_bound: torch.Tensor, threshold: float, loss_scale: float, *,
                        dropped: torch.Tensor | None = None, clipping_function: str = "standard",
                        stability: float = DEFAULT_STABILITY) -> torch.Tensor:
    """What each example's raw per-example gradient is multiplied by before summing.

    The layer rules see the gradient of the loss the user backpropagates; with a mean loss over B
    examples that is G_i / B. ``loss_scale`` (B for "mean", 1 for "sum") restores G_i; the clip
    factor is computed on the restored norm bound.

    Args:
        norm_bound: upper bounds of the raw (loss-scaled) per-example norms, ``(B,)``
            (``norm_upper_bound``).
        threshold: the group's clipping threshold C_g.
        loss_scale: factor from the raw gradient to the true per-example gradient.
        dropped: ``(B,)`` bool, examples whose contribution is dropped (``nonfinite_examples``):
            their multiplier is exactly 0, whatever their (non-finite) norm.
        clipping_function, stability: see ``clip_factors``; gamma is in units of the true
            per-example gradient's norm (after ``loss_scale``).

    Returns:
        ``(B,)`` float32 (float64 for float64 bounds) tensor ``c_i * loss_scale``.
    """
    multipliers = clip_factors(_true_norm(norm_bound, loss_scale), threshold,
                               clipping_function=clipping_function,
                               stability=stability) * loss_scale
    if dropped is None:
        return multipliers
    return torch.where(dropped.to(multipliers.device), torch.zeros_like(multipliers), multipliers)


# ---- non-finite per-example gradients (docs/design.md §4) ---------------------------------------
#
# ``nonfinite_gradients="drop"`` replaces example i's contribution by zero in every group when any
# of its group norms is NaN/inf. The decision reads example i's own norms only, so example i's
# contribution is still a function of example i alone, of norm <= C: the sensitivity, the noise and
# B_norm (the expected batch size, which still counts the example) are unchanged.

NONFINITE_CHOICES = ("raise", "drop")


def nonfinite_examples(norm_bounds: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(B,)`` bool: True for the examples with a NaN/inf norm bound in any clipping group.

    A bound is non-finite only where the released gradient itself is (``norm_upper_bound`` falls
    back to a magnitude that is finite for every finite fp32/bf16/fp16 input): a huge but finite
    gradient is clipped, not dropped, and never stops the step. Elementwise over examples: example
    i's entry depends on example i's group norms only (never on another example's), which is what
    keeps dropping it private.

    Args:
        norm_bounds: each group's per-example norm bounds, ``(B,)`` each (possibly on different
            devices; the result is on the first one's).
    """
    device = norm_bounds[0].device
    dropped = torch.zeros(norm_bounds[0].shape, dtype=torch.bool, device=device)
    for bound in norm_bounds:
        dropped |= ~torch.isfinite(bound).to(device)
    return dropped


def without_examples(per_example: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """``per_example`` (examples first) with the dropped examples' rows set to 0.

    A multiplier of 0 is not enough on its own: 0 * NaN is NaN, so the dropped rows are zeroed
    before the weighted sum.
    """
    mask = dropped.to(per_example.device).reshape(-1, *([1] * (per_example.dim() - 1)))
    return torch.where(mask, torch.zeros((), dtype=per_example.dtype, device=per_example.device),
                       per_example)


def _true_norm(norm_bound: torch.Tensor, loss_scale: float) -> torch.Tensor:
    """Norm bounds of the true per-example gradients: clipping and counting use the same ones."""
    return _accumulation(norm_bound) * loss_scale


def _accumulation(t: torch.Tensor) -> torch.Tensor:
    """float32 at least (norms of bf16/fp16 models), float64 kept (the float64 oracle tests)."""
    return t if t.dtype == torch.float64 else t.to(torch.float32)


def default_group_thresholds(max_grad_norm: float, num_groups: int) -> list[float]:
    """C_g = C / sqrt(K): the total sensitivity stays ``max_grad_norm``."""
    return [max_grad_norm / math.sqrt(num_groups)] * num_groups


def sensitivity(thresholds: Sequence[float]) -> float:
    """L2 sensitivity of the concatenated clipped sum under add/remove: sqrt(sum C_g^2)."""
    return math.sqrt(sum(float(c) * float(c) for c in thresholds))


def noise_std(noise_multiplier: float, thresholds: Sequence[float]) -> float:
    """Standard deviation of the Gaussian noise on every coordinate: sigma * C."""
    return noise_multiplier * sensitivity(thresholds)


def noise_std_of_rank_share(std: float, *, world_size: int) -> float:
    """FSDP2 counts: each of ``world_size`` ranks adds independent N(0, std^2 / world_size) to
    its part before the all-reduce; the sum carries N(0, std^2) exactly, and every rank ends
    with the same noisy value without sharing a generator."""
    return std / math.sqrt(world_size)


def gradient_normalizer(
    *, loss_reduction: str, expected_batch_size: float
) -> float:
    """B_norm of docs/design.md §5: the expected logical batch size, or 1 for a summed loss.

    Dividing by the *expected* size (q N under Poisson), never by the realized one, keeps the
    normalization data-independent: the realized size of a Poisson batch is private.
    """
    if loss_reduction == "sum":
        return 1.0
    if expected_batch_size <= 0:
        raise ValueError(f"expected batch size must be positive, got {expected_batch_size}")
    return float(expected_batch_size)


def truncation_probability(*, num_samples: int, sample_rate: float, max_batch_size: int) -> float:
    """P(Binomial(N, q) > K): how often a truncated Poisson batch is expected to be cut to K.

    Public (N, q and K are), unlike the realized count of truncated batches.
    """
    from scipy import stats

    return float(stats.binom.sf(max_batch_size, num_samples, sample_rate))


@functools.lru_cache(maxsize=32)  # read at every step (B_norm); a pure function of public numbers
def truncated_expected_batch_size(*, num_samples: int, sample_rate: float,
                                  max_batch_size: int) -> float:
    """E[min(Binomial(N, q), K)]: B_norm of a mean loss under truncated Poisson sampling (§5).

    A public constant (it depends on N, q and K only), and the expected size of the batch that is
    actually summed: q N would shrink every step when truncation fires often. Computed as
    sum_{k=0}^{K-1} P(X > k) with scipy's binomial survival function, in float64.
    """
    from scipy import stats

    survival = stats.binom.sf(np.arange(int(max_batch_size)), int(num_samples), float(sample_rate))
    return float(math.fsum(survival.tolist()))


def noised_gradient(
    clipped_sum: torch.Tensor | None,
    *,
    shape: torch.Size,
    std: float,
    normalizer: float,
    device: torch.device,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
    correlate=None,
) -> torch.Tensor:
    """(clipped sum + noise) / B_norm, in float32 or the wider ``dtype`` (float64 models).

    The noise is N(0, std^2) per coordinate, or with ``correlate`` (BandMF: a callable
    ``(z, std) -> noise``, ``dpfused.bandmf.NoiseHistory.correlator``) the streaming
    correlated noise std (M^-1 Z)_t built from that draw z = std Z_t (``correlated_noise``).

    ``clipped_sum`` may be None: no example touched this parameter (an empty batch, or a layer
    unused by this batch); the step still carries the noise.
    """
    dtype = torch.promote_types(dtype, torch.float32)  # bf16/fp16 parameters: noise in float32
    noise = _gaussian(shape, std=std, device=device, dtype=dtype, generator=generator)
    if correlate is not None:
        noise = correlate(noise, std)
    if clipped_sum is not None:
        noise.add_(clipped_sum.to(dtype))
    return noise.div_(normalizer)


# ---- correlated noise: banded matrix factorization (docs/design.md §5.1) -------------------------
#
# The matrix mechanism releases M x + Z for the stacked gradients x (T x d) and a lower-triangular
# strategy M; multiplying by M^-1 (post-processing) gives the released gradients x + M^-1 Z. With M
# b-banded Toeplitz (coefficients m_0..m_{b-1}), (M^-1 Z)_t solves M w = Z by forward substitution:
#
#     w_t = (Z_t - sum_{j=1}^{b-1} m_j w_{t-j}) / m_0,
#
# so only the last b-1 w's are kept. An example whose steps are >= b apart changes columns of M
# with disjoint supports: each participation moves M x by at most C times that column's norm, and
# the accountant divides sigma by the largest column norm, sqrt(sum_j m_j^2) (docs/design.md §7.2).


def max_column_norm(coefficients: Sequence[float]) -> float:
    """Largest column norm of a lower-triangular banded Toeplitz matrix with these coefficients.

    Column t holds m_0..m_{min(b, T-t)-1}; the first column (T >= b) holds all of them:
    sqrt(sum_j m_j^2), an upper bound for shorter runs too. Computed in float64 with fsum.
    """
    return math.sqrt(math.fsum(float(c) * float(c) for c in coefficients))


def correlated_noise(z: torch.Tensor, *, std: float, past: Sequence[torch.Tensor | None],
                     coefficients: Sequence[float]) -> torch.Tensor:
    """Step t's BandMF noise std * w_t from the draw z = std * Z_t and the past unit noises.

    ``past`` holds w_{t-1}, w_{t-2}, ... (at most b-1, most recent first; None for a step whose
    noise was 0), so the result is (z - std sum_j m_j w_{t-j}) / m_0 = std w_t. With one band
    (m_0 = 1, nothing kept) it is z itself, bit for bit: DP-SGD's noise. The combination runs in
    z's dtype (float32 at least); its rounding is a function of the noise alone, never of the data.
    """
    if std == 0:
        return z  # a rank that adds no noise (docs/design.md §9): zeros
    terms = [(float(m), w) for m, w in zip(coefficients[1:], past) if w is not None]
    noise = z
    if terms:
        history = torch.zeros_like(z)
        for m, w in terms:
            history.add_(w.to(device=z.device, dtype=z.dtype), alpha=m)
        noise = z - std * history
    first = float(coefficients[0])
    return noise if first == 1.0 else noise / first


def unit_noise(noise: torch.Tensor, std: float) -> torch.Tensor | None:
    """w_t = noise / std, what the history keeps (None when the step added no noise)."""
    if std == 0:
        return None
    return noise / std


# ---- adaptive thresholds (docs/design.md §4; Andrew et al. 2021, "DP learning with adaptive clipping") --
#
# Each example adds  1[||G_ig|| <= C_g] - 1/2  to group g's count. Centering makes one example's
# contribution +-1/2 per group whatever it is, so under add/remove the K counts have L2 sensitivity
# sqrt(K)/2 (docs/design.md §4 states sqrt(K) for uncentered counts: centering is 4x cheaper in privacy).
# Under replace-one a count moves by at most 1: the accountant's doubling of the whole mechanism's
# sensitivity covers that exactly.


def centered_unclipped_count(norm_bound: torch.Tensor, threshold: float, loss_scale: float, *,
                             dropped: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i (1[N_i <= C_g] - 1/2) over a batch, from raw norm bounds ``(B,)`` (a 0-d tensor).

    ``loss_scale`` restores the true per-example gradient as in ``example_multipliers``. A dropped
    example (``nonfinite_examples``) was scaled by 0, i.e. clipped: it adds -1/2 in every group, so
    each example still adds +-1/2 per group (sensitivity unchanged) and is counted in B_exp.
    """
    unclipped = _true_norm(norm_bound, loss_scale) <= threshold
    if dropped is not None:
        unclipped &= ~dropped.to(unclipped.device)
    return (unclipped.to(torch.float64) - 0.5).sum()


def count_sensitivity(num_groups: int) -> float:
    """L2 sensitivity of the K centered counts under add/remove: sqrt(K) / 2."""
    return math.sqrt(num_groups) / 2.0


def effective_noise_multiplier(noise_multiplier: float, count_noise_std: float,
                               num_groups: int) -> float:
    """sigma_eff of the joint release (clipped sums with noise sigma*C, counts with noise sigma_b).

    Normalizing each part by its sensitivity, the pair is one Gaussian query:
    1/sigma_eff^2 = 1/sigma^2 + (count_sensitivity / sigma_b)^2. The accountant uses sigma_eff.
    """
    if noise_multiplier == 0:
        return 0.0
    count_term = (count_sensitivity(num_groups) / count_noise_std) ** 2
    return (noise_multiplier ** -2 + count_term) ** -0.5


def gradient_noise_multiplier(effective: float, count_noise_std: float, num_groups: int) -> float:
    """The inverse of ``effective_noise_multiplier``: the gradient's sigma that gives ``effective``.

    Raises:
        ValueError: the counts alone spend more than ``effective`` allows (sigma_b too small).
    """
    count_term = (count_sensitivity(num_groups) / count_noise_std) ** 2
    remaining = effective ** -2 - count_term
    if remaining <= 0:
        smallest = count_sensitivity(num_groups) * effective
        raise ValueError(
            f"adaptive_clipping: count_noise_std={count_noise_std:g} leaves no privacy for the "
            f"gradient at the calibrated noise multiplier {effective:.4g} with {num_groups} "
            f"group(s); count_noise_std must exceed sqrt(K)/2 * sigma = {smallest:.4g} "
            "(Andrew et al. suggest about batch_size / 20)"
        )
    return remaining ** -0.5


def noised_counts(counts: torch.Tensor, *, std: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Centered counts ``(K,)`` plus N(0, sigma_b^2) on each, in float64."""
    noise = _gaussian(counts.shape, std=std, device=counts.device, dtype=torch.float64,
                      generator=generator)
    return noise.add_(counts.to(torch.float64))


def _gaussian(shape, *, std: float, device, dtype: torch.dtype, generator) -> torch.Tensor:
    """N(0, std^2) samples: from the cryptographically secure generator in secure mode
    (dpfused.secure_random: ChaCha20, floating-point-attack mitigation), else torch's."""
    if std == 0:  # data parallel ranks other than 0 add no noise: draw nothing
        return torch.zeros(tuple(shape), device=device, dtype=dtype)
    if isinstance(generator, ChaCha20Generator):
        return generator.normal(tuple(shape), std=std, dtype=dtype, device=device)
    return torch.normal(mean=0.0, std=std, size=tuple(shape), device=device, generator=generator,
                        dtype=dtype)


def unclipped_fractions(noisy_counts: torch.Tensor, expected_batch_size: float) -> list[float]:
    """Noisy fractions of unclipped examples per group: noisy centered count / B + 1/2.

    Divides by the *expected* batch size (q N under Poisson): the realized size is private.
    """
    return [float(c) / expected_batch_size + 0.5 for c in noisy_counts.tolist()]


def adapted_thresholds(thresholds: Sequence[float], fractions: Sequence[float], *,
                       target_quantile: float, learning_rate: float,
                       total: float | None, min_threshold: float | None = None,
                       max_threshold: float | None = None) -> list[float]:
    """C_g <- C_g exp(-eta (b_g - q)); then rescaled so that sqrt(sum C_g^2) = ``total``.

    ``total=None`` (one flat group, Andrew et al.) lets the clipping norm itself move, clamped to
    [min_threshold, max_threshold]; the noise std sigma*C follows it, so sigma is unchanged.
    A threshold is post-processing of the noisy counts: it costs no privacy of its own.
    """
    moved = [float(c) * math.exp(-learning_rate * (float(b) - target_quantile))
             for c, b in zip(thresholds, fractions)]
    if total is not None:
        scale = total / sensitivity(moved)
        return [c * scale for c in moved]
    lo = min_threshold if min_threshold is not None else 0.0
    hi = max_threshold if max_threshold is not None else math.inf
    return [min(max(c, lo), hi) for c in moved]


# ---- a training loss released with each step (DPTrainer's log_loss="noised", docs/design.md §7.6) --
#
# Each example's loss is clipped to [0, B] and counted on a grid of B / LOSS_GRID, so the batch's sum
# is an exact integer (int64, also through an all-reduce) and one example moves it by at most
# LOSS_GRID units, i.e. B: the L2 sensitivity under add/remove (and zero-out, the null example adding
# 0), with no rounding slack. The noised mean (B/LOSS_GRID * units + N(0, sigma_L^2 B^2)) / B_norm
# is a Gaussian query on the step's batch; with the gradient it is one Gaussian mechanism of
# joint_noise_multiplier(sigma, sigma_L) (exact for Gaussians on one batch: their privacy losses add
# as 1/sigma^2).

LOSS_GRID = 2 ** 20


def joint_noise_multiplier(*noise_multipliers: float) -> float:
    """One Gaussian for several Gaussian queries on the same batch, each with noise std sigma_j
    times its own L2 sensitivity: 1/sigma^2 = sum_j 1/sigma_j^2 (0 when any sigma_j is 0)."""
    if any(sigma == 0 for sigma in noise_multipliers):
        return 0.0
    return sum(sigma ** -2 for sigma in noise_multipliers) ** -0.5


def noise_multiplier_after(joint: float, other: float) -> float:
    """The sigma that, released with a query of noise multiplier ``other``, is ``joint`` in all:
    1/sigma^2 = 1/joint^2 - 1/other^2 (the inverse of ``joint_noise_multiplier``).

    Raises:
        ValueError: ``other`` <= ``joint``: that query alone spends more than ``joint`` allows.
    """
    if not other > joint:
        raise ValueError(
            f"a query with noise multiplier {other:.4g} released with every step leaves no privacy "
            f"for the gradient at the calibrated noise multiplier {joint:.4g}; its noise "
            "multiplier must exceed the gradient's")
    return (joint ** -2 - other ** -2) ** -0.5


def clipped_loss_units(losses: torch.Tensor, *, bound: float) -> torch.Tensor:
    """sum_i round(clamp(l_i, 0, B) / B * LOSS_GRID) as an exact int64 0-d tensor: each example
    adds an integer in [0, LOSS_GRID] decided by its own loss alone (NaN and +inf count as B,
    -inf as 0)."""
    values = torch.nan_to_num(losses.detach().to(torch.float64), nan=bound, posinf=bound,
                              neginf=0.0)
    units = torch.round(values.clamp(0.0, bound) / bound * LOSS_GRID)  # (B,) in [0, LOSS_GRID]
    return units.to(torch.int64).sum()


def noised_loss_mean(units: torch.Tensor, *, bound: float, noise_multiplier: float,
                     expected_batch_size: float, generator) -> torch.Tensor:
    """(B/LOSS_GRID * units + N(0, sigma_L^2 B^2)) / B_norm in float64: the released mean loss of a
    step (``units`` summed over every rank; draw it on one rank)."""
    total = units.to(torch.float64) * (bound / LOSS_GRID)
    return noised_gradient(
        total, shape=torch.Size(()), std=noise_std(noise_multiplier, [bound]),
        normalizer=gradient_normalizer(loss_reduction="mean",
                                       expected_batch_size=expected_batch_size),
        device=units.device, generator=generator, dtype=torch.float64)
