"""DPOptimizer: wraps any torch.optim optimizer so it only ever sees the noised gradient (§5).

``step`` reads one value, the book-keeper's ``ClippedStep`` of the logical batch (docs/design.md §2):
it adds Gaussian noise once (std sigma * sqrt(sum_g C_g^2), with the thresholds the sums were
clipped with; with BandMF correlated with the last bands - 1 steps' noise, §5.1), divides by
B_norm, writes p.grad, steps the wrapped optimizer and records the step's ``DpEvent`` with the
accountant. Physical batches of one logical batch only accumulate; an empty logical batch still
steps with noise.

A step on batches the private data loader did not draw (Opacus' benchmarks time steps on
``torch.randn`` batches) runs as Opacus runs it, normalized by ``expected_batch_size``, and is
recorded as a step with no guarantee (``SampledStep.unsampled``): every epsilon from then on is
infinite, the first such step warns, a budget (``max_epsilon``) refuses it, and data-parallel
training refuses it (docs/design.md §5).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from dpfused import distributed, privacy_math
from dpfused.accounting import IterateFacts, PrivacyBudgetExhausted, SampledStep
from dpfused.arguments import check_max_grad_norm, check_noise, check_noise_multiplier
from dpfused.bandmf import NoiseHistory
from dpfused.step import ClippedStep

__all__ = ["DPOptimizer"]


class DPOptimizer(torch.optim.Optimizer):
    """A differentially private view of ``optimizer``; param_groups and state are shared with it.

    Args:
        optimizer: the wrapped optimizer (any torch.optim class).
        instrumentation: the module's instrumentation (groups, thresholds, the book-keeper).
        noise_multiplier: sigma.
        accountant: records one event per logical step, or None.
        generator: torch.Generator for the noise (None: torch's default generator), or a dict
            {device: torch.Generator} for parameters on several devices (make_private's own).
        max_epsilon, delta: budget; a step that would exceed it raises PrivacyBudgetExhausted.
        adaptive_clipping: an ``AdaptiveClipping``: after each step the group thresholds move
            toward a quantile of the per-example norms, from noisy counts (dpfused/adaptive.py).
        reduction: on several processes, the data-parallel seam (``dpfused.distributed``'s
            ``ProcessGroupReduction`` for a plain module, ``DDPReduction``, ``FSDP2Reduction``):
            it adds the ranks' clipped sums and counts up before the noise. Plain and DDP: every
            rank adds the same noise (``generator`` is in the same state on every rank); FSDP2:
            each rank noises the shard it owns (its own stream). None on one process.
        expected_batch_size: Opacus' attribute of that name, for code that reads it: the
            expected logical batch size per process (``int(q N / world_size)`` under Poisson,
            ``int(b / world_size)`` otherwise). Informational: each step is normalized by its own
            logical batch's expected size (``LogicalBatch.expected_size``), never by this.
        noise: a ``BandMF``: correlated noise (docs/design.md §5.1); its streaming state is
            ``noise_history`` (secret). None: independent noise (DP-SGD).
    """

    # torch.amp.GradScaler then hands its scale to step() (as `grad_scale`/`found_inf`) instead of
    # unscaling p.grad itself: that is how step() sees a scaler, and refuses it (_refuse_grad_scaler).
    _step_supports_amp_scaling = True

    def __init__(self, optimizer, *, instrumentation, noise_multiplier, accountant=None,
                 generator=None, max_epsilon=None, delta=None,
                 adaptive_clipping=None, reduction=None, expected_batch_size=None, noise=None):
        # Deliberately no super().__init__: this object is a view that shares the wrapped
        # optimizer's param_groups and state, so schedulers and checkpoints act on the real one.
        self.original_optimizer = optimizer
        self.instrumentation = instrumentation
        self.noise_multiplier = float(noise_multiplier)
        self.accountant = accountant
        self.generator = generator
        self.max_epsilon, self.delta = max_epsilon, delta
        self.adaptive_clipping = adaptive_clipping
        self.reduction = reduction
        check_noise(noise)
        self.noise = noise
        # BandMF's secret streaming state: the last bands - 1 unit noises of every parameter.
        self.noise_history = NoiseHistory(noise.coefficients) if noise is not None else None
        # Noise multipliers of other Gaussian queries released with every step on its batch (e.g.
        # DPTrainer's noised training loss): accounted with the gradient as one Gaussian.
        self.joint_noise_multipliers: tuple[float, ...] = ()
        # dpfused.amp.GradScaler(dynamic=True): each step also releases the noised number of
        # examples dropped for a non-finite (overflowed) gradient.
        self._overflow_count_std: float | None = None
        self.noised_overflow_count = 0.0
        self.last_expected_batch_size = float(expected_batch_size or 0)
        # Group-wise adaptive thresholds are rescaled to keep this total (the sensitivity).
        self._total_threshold = privacy_math.sensitivity([g.threshold for g in self._groups])
        self.steps_taken = 0
        self.steps_skipped = 0
        self._warned_unsampled = False  # the first step with no guarantee warns
        self._expected_batch_size = expected_batch_size
        # Examples whose NaN/inf gradient was dropped (nonfinite_gradients="drop") in the steps
        # taken. Not private: a diagnostic for the trainer, not for release.
        self.examples_dropped = 0

    # ---- views on the wrapped optimizer --------------------------------------------------------
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    def add_param_group(self, param_group):
        raise ValueError(
            "add_param_group after make_private would add parameters that are not instrumented; "
            "build the full optimizer before calling make_private"
        )

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.original_optimizer.load_state_dict(state_dict)

    def __repr__(self):
        return f"DPOptimizer({self.original_optimizer!r}, noise_multiplier={self.noise_multiplier})"

    # ---- settable between steps (Opacus' schedulers, dpfused.opacus.schedulers) --------------
    @property
    def expected_batch_size(self) -> int | None:
        """Opacus' expected logical batch size per process (read-only; see the class Args)."""
        return self._expected_batch_size

    @property
    def noise_multiplier(self) -> float:
        """sigma of the next step; the accountant records each step's own sigma."""
        return self._noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value) -> None:
        check_noise_multiplier(value)
        self._noise_multiplier = float(value)

    @property
    def max_grad_norm(self) -> float:
        """C = sqrt(sum_g C_g^2), the sensitivity of a clipped sum (docs/design.md §4)."""
        return privacy_math.sensitivity([g.threshold for g in self._groups])

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        """Scale every group threshold by value / C, so the sensitivity becomes ``value``.

        Raises:
            TypeError, ValueError: not a finite number > 0; ValueError: backward passes of the current logical batch
                were already clipped with the old thresholds (the noise must match them).
        """
        check_max_grad_norm(value)
        if self._book.step_in_progress:
            raise ValueError(
                "max_grad_norm was changed after loss.backward() and before optimizer.step(): "
                "those examples were clipped with the old thresholds, and the noise must match "
                "them. Change it right after optimizer.step() (a grad-clip scheduler's step() "
                "belongs there)")
        scale = float(value) / self.max_grad_norm
        self._book.set_thresholds([g.threshold * scale for g in self._groups])
        self._total_threshold = float(value)

    # ---- the DP step ---------------------------------------------------------------------------
    @property
    def noise_std(self) -> float:
        return privacy_math.noise_std(self.noise_multiplier, [g.threshold for g in self._groups])

    @property
    def accounted_noise_multiplier(self) -> float:
        """The sigma the accountant records: sigma, or sigma_eff when counts (adaptive clipping)
        or other queries (``joint_noise_multipliers``) are released with the step too. With
        BandMF the gradient's sigma is first divided by the strategy's largest column norm (1 for
        dpfused's strategies): per participation the gradient moves M x by at most C times a
        column's norm, the other queries their own rows of the step only, so the block strategy
        keeps the disjoint supports the amplified analysis needs (docs/design.md §5.1)."""
        sigma = self.noise_multiplier
        if self.noise is not None:
            sigma = sigma / privacy_math.max_column_norm(self.noise_history.coefficients)
        if self.adaptive_clipping is not None:
            sigma = privacy_math.effective_noise_multiplier(
                sigma, self.adaptive_clipping.count_noise_std, len(self._groups))
        if not self.joint_noise_multipliers:
            return sigma
        return privacy_math.joint_noise_multiplier(sigma, *self.joint_noise_multipliers)

    @property
    def _groups(self):
        return self.instrumentation.groups

    @property
    def _book(self):
        return self.instrumentation.book

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; keep the clipped sums while a logical batch is being accumulated."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        for group in self._groups:
            for p in group.params:
                p.grad = None
        self._book.clear()

    def step(self, closure: Callable[[], float] | None = None):
        """Noise and apply the logical batch's clipped step; skip if the logical batch is not over.

        Returns:
            The closure's loss if a closure was given (and the step taken), else None.
        """
        self._refuse_grad_scaler()
        self._check_step_input(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clipped = self._book.close()
        if clipped is None:  # more physical batches of this logical batch follow
            self.steps_skipped += 1
            return None
        sampled = self._sampled_step(clipped)
        step = None if clipped.batch is None else clipped.batch.step
        if self.noise_history is not None:  # BandMF: no logical batch skipped (before anything)
            self.noise_history.check_step(step)
        facts = self._iterate_facts(clipped)  # raises on a bad param group before anything runs
        self._check_budget(sampled)  # before anything is written: a refused step changes nothing
        self._warn_if_unguaranteed(sampled)
        noisy_counts = self._write_noised_gradients(clipped)
        if self.noise_history is not None:
            self.noise_history.commit(step)
        if self._overflow_count_std is not None:
            self._release_overflow_count(clipped)
        self._book.next_step()
        if noisy_counts is not None:
            self._adapt_thresholds(noisy_counts, clipped)
        if self.accountant is not None:
            self.accountant.record(sampled, facts)
        self.steps_taken += 1
        self.examples_dropped += clipped.dropped
        self.original_optimizer.step()
        return loss

    def release_overflow_counts(self, noise_std: float) -> None:
        """From now on every step also releases its count of dropped (overflowed) examples plus
        N(0, noise_std^2): a count of sensitivity 1, accounted with the gradient as one Gaussian."""
        self._overflow_count_std = float(noise_std)
        self.joint_noise_multipliers = (*self.joint_noise_multipliers, float(noise_std))

    def _release_overflow_count(self, clipped: ClippedStep) -> None:
        device = self._groups[0].params[0].device
        count = torch.tensor([float(clipped.dropped)], dtype=torch.float64, device=device)
        noised = privacy_math.noised_counts(count, std=self._overflow_count_std,
                                            generator=self._generator_on(device))
        self.noised_overflow_count = float(noised[0])
        self.last_expected_batch_size = float(clipped.batch.expected_size)

    def _check_step_input(self, closure):
        """Before anything runs: a refused step draws no noise and changes nothing. (sigma is
        checked where it is set: the ``noise_multiplier`` setter.)"""
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be a callable that returns the loss (or None), got "
                            f"{type(closure).__name__}; no step was taken")

    def _refuse_grad_scaler(self):
        if getattr(self, "found_inf", None) is None and getattr(self, "grad_scale", None) is None:
            return
        self.found_inf = self.grad_scale = None
        raise ValueError(
            "torch.amp.GradScaler is not supported: it multiplies the loss, so the per-example "
            "norms are clipped in scaled units, and its skipped steps reveal overflows. Use "
            "dpfused.amp.GradScaler(optimizer, init_scale=...) for float16 autocast (same calls: "
            "scale, step, update), or bfloat16 autocast, which needs no scaler; no step was taken"
        )

    def _sampled_step(self, clipped: ClippedStep) -> SampledStep:
        """The step's ledger entry: the event of the logical batch the private loader drew, or,
        for backward passes on other data, a step with no guarantee (refused where it cannot
        run as Opacus runs it; module docstring)."""
        if clipped.batch is not None:
            return SampledStep.of(clipped.batch, self.accounted_noise_multiplier,
                                  adaptive_clipping=self.adaptive_clipping is not None,
                                  bands=1 if self.noise is None else self.noise.bands,
                                  strategy=None if self.noise is None else self.noise.strategy)
        if self.reduction is not None:
            raise RuntimeError(
                "optimizer.step() found no batch drawn by the private data loader, under data "
                "parallel training: every rank must take its slice of one logical batch the "
                "loader drew (the ranks' clipped sums are added up per logical batch and noised "
                "once), which batches of your own cannot provide. Iterate the data loader that "
                "make_private returned; no step was taken")
        self._unsampled_normalizer(clipped)  # refuses before anything runs
        return SampledStep.unsampled(examples=clipped.examples)

    def _unsampled_normalizer(self, clipped: ClippedStep) -> float:
        """B_norm of a step on batches the loader did not draw: Opacus' ``expected_batch_size``
        (int(q N), or b), the realized size being no more public there than anywhere."""
        if clipped.loss_reduction == "mean" and not (self._expected_batch_size or 0) >= 1:
            raise RuntimeError(
                "optimizer.step() found no batch drawn by the private data loader, and this "
                f"optimizer has no expected batch size >= 1 to normalize a mean loss by (got "
                f"{self._expected_batch_size!r}): iterate the data loader that make_private "
                "returned; no step was taken")
        return privacy_math.gradient_normalizer(
            loss_reduction=clipped.loss_reduction,
            expected_batch_size=float(self._expected_batch_size or 1))

    def _normalizer(self, clipped: ClippedStep) -> float:
        """B_norm (docs/design.md §5): the logical batch's expected size for a mean loss."""
        if clipped.batch is None:
            return self._unsampled_normalizer(clipped)
        return privacy_math.gradient_normalizer(
            loss_reduction=clipped.loss_reduction, expected_batch_size=clipped.batch.expected_size)

    def _expected_size(self, clipped: ClippedStep) -> float:
        """The expected logical batch size (adaptive counts are fractions of it)."""
        if clipped.batch is None:
            return float(self._expected_batch_size)
        return clipped.batch.expected_size

    def _warn_if_unguaranteed(self, sampled: SampledStep) -> None:
        if sampled.guaranteed or self._warned_unsampled:
            return
        self._warned_unsampled = True
        warnings.warn(
            f"optimizer.step() ran on batches the private data loader did not draw (step "
            f"{self.steps_taken} of this optimizer): the step is taken, normalized by the "
            f"expected batch size {self._expected_batch_size}, and recorded as a step with NO "
            "privacy guarantee; from now on every epsilon is infinite (get_epsilon returns inf; "
            "privacy_report says why). Iterate the data loader that make_private returned to "
            "train privately", UserWarning, stacklevel=3)

    def _correlate(self, index: int):
        """BandMF: the map from a fresh draw to the correlated noise of parameter ``index``."""
        return None if self.noise_history is None else self.noise_history.correlator(index)

    def _write_noised_gradients(self, clipped: ClippedStep):
        """Write p.grad for every private parameter; returns the noisy counts (adaptive) or None."""
        if self.reduction is not None:
            return self._write_reduced_noised_gradients(clipped)
        std = privacy_math.noise_std(self.noise_multiplier, clipped.thresholds)
        normalizer = self._normalizer(clipped)
        params = [p for group in self._groups for p in group.params]
        grads = [
            privacy_math.noised_gradient(
                clipped.sums.get(id(p)), shape=p.shape, std=std, normalizer=normalizer,
                device=p.device, generator=self._generator_on(p.device), dtype=p.dtype,
                correlate=self._correlate(i),
            )
            for i, p in enumerate(params)
        ]
        released = grads + ([self._noised_counts(clipped, params[0].device)]
                            if self.adaptive_clipping is not None else [])
        for p, grad in zip(params, released):
            p.grad = grad.to(p.dtype)
        return released[-1] if self.adaptive_clipping is not None else None

    def _write_reduced_noised_gradients(self, clipped: ClippedStep):
        """The wrapper's reduction first, then the noise, the same on every rank (its generator
        is replicated): one N(0, sigma^2 C^2) per coordinate, and equal parameters on all ranks."""
        std = privacy_math.noise_std(self.noise_multiplier, clipped.thresholds)
        normalizer = self._normalizer(clipped)
        params = [p for group in self._groups for p in group.params]
        sums = self.reduction.global_sums(clipped, params)  # this rank's shard of the sums
        grads = [
            privacy_math.noised_gradient(
                sums[id(p)], shape=self.reduction.local_shape(p), std=std,
                normalizer=normalizer, device=sums[id(p)].device, generator=self.generator,
                dtype=p.dtype, correlate=self._correlate(i),
            )
            for i, p in enumerate(params)
        ]
        for p, grad in zip(params, grads):
            p.grad = self.reduction.as_grad(p, grad)
        if self.adaptive_clipping is None:
            return None
        return self.reduction.noised_global_counts(
            self._unclipped_counts(clipped, sums[id(params[0])].device),
            std=self.adaptive_clipping.count_noise_std, generator=self.generator)

    def _unclipped_counts(self, clipped: ClippedStep, device):
        return torch.stack([
            clipped.unclipped.get(g, torch.zeros((), dtype=torch.float64)).to(device)
            for g in range(len(self._groups))
        ])

    def _noised_counts(self, clipped: ClippedStep, device):
        counts = self._unclipped_counts(clipped, device)
        return privacy_math.noised_counts(counts, std=self.adaptive_clipping.count_noise_std,
                                          generator=self._generator_on(device))

    def _generator_on(self, device):
        """The noise generator for ``device``: ``generator``, or its entry for that device."""
        if isinstance(self.generator, dict):
            return self.generator[torch.device(device)]
        return self.generator

    def _adapt_thresholds(self, noisy_counts, clipped: ClippedStep):
        """Post-processing of the noisy counts: the next step's thresholds."""
        config = self.adaptive_clipping
        fractions = privacy_math.unclipped_fractions(noisy_counts, self._expected_size(clipped))
        flat = self.instrumentation.clipping == "flat"
        self._book.set_thresholds(privacy_math.adapted_thresholds(
            list(clipped.thresholds), fractions,
            target_quantile=config.target_quantile, learning_rate=config.learning_rate,
            total=None if flat else self._total_threshold,
            min_threshold=config.min_threshold, max_threshold=config.max_threshold,
        ))

    def _iterate_facts(self, clipped: ClippedStep) -> IterateFacts:
        """What the last-iterate bound needs to know of this step (docs/design.md §7.4): the
        map the wrapped optimizer applies, x_g <- (1 - eta lambda_g) x_g - (eta / B_norm) * (clipped
        sum + noise), and the C the sum was clipped with."""
        lrs = {float(g["lr"]) for g in self.param_groups if "lr" in g}
        # One learning rate for all groups is part of "plain SGD" for the last-iterate bound;
        # maximize=True climbs the loss, which the convex case's contraction does not cover.
        plain_sgd = (type(self.original_optimizer) is torch.optim.SGD and len(lrs) <= 1 and all(
            g.get("momentum", 0) == 0 and not g.get("nesterov", False)
            and not g.get("maximize", False) for g in self.param_groups))
        batch = clipped.batch  # None: a step with no guarantee, at no place of the loader's order
        return IterateFacts(
            position_in_epoch=batch.position_in_epoch if batch is not None else 0,
            batches_per_epoch=batch.batches_per_epoch if batch is not None else 1,
            learning_rate=next(iter(lrs)) if len(lrs) == 1 else None,
            # Every group's: one without weight decay does not contract (the largest factor counts).
            weight_decays=tuple(float(g.get("weight_decay", 0.0)) for g in self.param_groups),
            loss_reduction=clipped.loss_reduction,
            normalizer=self._normalizer(clipped),
            max_grad_norm=privacy_math.sensitivity(clipped.thresholds),
            plain_sgd=plain_sgd,
            clipping_function=self._book.clipping_function,
        )

    def _check_budget(self, sampled: SampledStep):
        if self.max_epsilon is None:
            return
        if not sampled.guaranteed:  # refused even without an accountant: no budget covers it
            raise PrivacyBudgetExhausted(
                f"optimizer.step() found no batch drawn by the private data loader: such a step "
                f"has no privacy guarantee (epsilon would be infinite > max_epsilon="
                f"{self.max_epsilon}); the step was not applied. Iterate the data loader that "
                "make_private returned, or make_private without max_epsilon to run such steps "
                "(e.g. to time them) with epsilon reported as infinite")
        if self.accountant is None:
            return
        epsilon = self.accountant.epsilon_if_over_budget(sampled, self.delta, self.max_epsilon)
        if epsilon is not None:
            first = self.accountant.first_unguaranteed_step
            why = ("" if first is None else f"; the ledger's step {first} ran on batches the "
                   "private data loader did not draw, so no epsilon is finite from it on")
            raise PrivacyBudgetExhausted(
                f"this step would raise epsilon to {epsilon:.4g} > max_epsilon={self.max_epsilon} "
                f"(delta={self.delta}); the step was not applied{why}"
            )
