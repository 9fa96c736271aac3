"""DPOptimizer: wraps any torch.optim optimizer so it only ever sees the noised gradient (DESIGN §5).

At a logical step: take the clipped sums of every backward pass since the last step, add Gaussian
noise once (std sigma * sqrt(sum_g C_g^2)), divide by B_norm, write p.grad, record the step with the
accountant and step the wrapped optimizer. Physical batches of one logical batch (the data loader
says which is last) only accumulate; an empty logical batch still steps with noise.
"""

from __future__ import annotations

from typing import Callable

import torch

from dpfused import privacy_math
from dpfused.accounting import PrivacyBudgetExhausted, StepRecord

__all__ = ["DPOptimizer"]


class DPOptimizer(torch.optim.Optimizer):
    """A differentially private view of ``optimizer``; param_groups and state are shared with it.

    Args:
        optimizer: the wrapped optimizer (any torch.optim class).
        instrumentation: the module's instrumentation (groups, thresholds, clipped sums).
        noise_multiplier: sigma.
        loss_reduction: "mean" or "sum", as the loss the user backpropagates.
        expected_batch_size: q * N under Poisson, the batch size under cyclic/shuffle.
        data_loader: the DP data loader (tells logical batch boundaries), or None.
        accountant: records one event per logical step, or None.
        generator: torch.Generator for the noise (None: torch's default generator).
        max_epsilon, delta: budget; a step that would exceed it raises PrivacyBudgetExhausted.
        distributed: data parallel: clipped sums are all-reduced over torch.distributed's default
            group, and only rank 0 adds noise.
        adaptive_clipping: an ``AdaptiveClipping``: after each step the group thresholds move
            toward a quantile of the per-example norms, from noisy counts (dpfused/adaptive.py).
    """

    # torch.amp.GradScaler then hands its scale to step() (as `grad_scale`/`found_inf`) instead of
    # unscaling p.grad itself: that is how step() sees a scaler, and refuses it (_refuse_grad_scaler).
    _step_supports_amp_scaling = True

    def __init__(self, optimizer, *, instrumentation, noise_multiplier, loss_reduction,
                 expected_batch_size, sampling, data_loader=None, accountant=None, generator=None,
                 max_epsilon=None, delta=None, distributed=False, adaptive_clipping=None):
        # Deliberately no super().__init__: this object is a view that shares the wrapped
        # optimizer's param_groups and state, so schedulers and checkpoints act on the real one.
        self.original_optimizer = optimizer
        self.instrumentation = instrumentation
        self.noise_multiplier = float(noise_multiplier)
        self.loss_reduction = loss_reduction
        self.expected_batch_size = expected_batch_size
        self.sampling = sampling
        self.data_loader = data_loader
        self.accountant = accountant
        self.generator = generator
        self.max_epsilon, self.delta = max_epsilon, delta
        self.distributed = distributed
        self.adaptive_clipping = adaptive_clipping
        # Group-wise adaptive thresholds are rescaled to keep this total (the sensitivity).
        self._total_threshold = privacy_math.sensitivity([g.threshold for g in self._groups])
        self.rank = torch.distributed.get_rank() if distributed else 0
        self._private_ids = {id(p) for p in instrumentation.params}
        self._accumulating = False  # a physical batch was skipped: keep sums across zero_grad
        self.steps_taken = 0
        self.steps_skipped = 0

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

    # ---- the DP step ---------------------------------------------------------------------------
    @property
    def noise_std(self) -> float:
        return privacy_math.noise_std(self.noise_multiplier, [g.threshold for g in self._groups])

    @property
    def accounted_noise_multiplier(self) -> float:
        """The sigma the accountant records: sigma, or sigma_eff when counts are released too."""
        if self.adaptive_clipping is None:
            return self.noise_multiplier
        return privacy_math.effective_noise_multiplier(
            self.noise_multiplier, self.adaptive_clipping.count_noise_std, len(self._groups))

    @property
    def _groups(self):
        return self.instrumentation.groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; keep the clipped sums while a logical batch is being accumulated."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        for group in self._groups:
            for p in group.params:
                p.grad = None
        if not self._accumulating:
            self.instrumentation.book.clear()

    def step(self, closure: Callable[[], float] | None = None):
        """Noise and apply the logical batch's clipped sums; skip if the logical batch is not over.

        Returns:
            The closure's loss if a closure was given (and the step taken), else None.
        """
        self._refuse_grad_scaler()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batch = self._current_batch()
        if batch is not None and not batch.is_last_physical:
            self._accumulating = True
            self.steps_skipped += 1
            return None
        pending = self._check_pending(batch)
        record = self._step_record(batch, pending.examples)
        self._check_budget(record)  # before anything is taken or written: a refused step changes nothing
        noisy_counts = self._write_noised_gradients(self.instrumentation.book.take_step_sums())
        if noisy_counts is not None:
            self._adapt_thresholds(noisy_counts)
        if self.accountant is not None:
            self.accountant.record_step(record)
        self._accumulating = False
        self.steps_taken += 1
        self.original_optimizer.step()
        return loss

    def _refuse_grad_scaler(self):
        if getattr(self, "found_inf", None) is None and getattr(self, "grad_scale", None) is None:
            return
        self.found_inf = self.grad_scale = None
        raise ValueError(
            "torch.amp.GradScaler is not supported: it multiplies the loss, so the per-example "
            "norms are clipped in scaled units and the step would be wrong. Train in bfloat16 "
            "autocast (torch.autocast(device_type, dtype=torch.bfloat16)), which needs no scaler, "
            "or in float32; no step was taken"
        )

    def _current_batch(self):
        return getattr(self.data_loader, "current", None) if self.data_loader is not None else None

    def _check_pending(self, batch):
        pending = self.instrumentation.book.peek_step()
        empty_batch = batch is not None and batch.local_size == 0
        if pending.backward_passes == 0 and not empty_batch:
            raise RuntimeError(
                "optimizer.step() was called without loss.backward() since the last step (or "
                "zero_grad() cleared it). Only an empty logical batch may step without a backward: "
                "it still takes a noised step"
            )
        if batch is not None and pending.examples != batch.local_size:
            raise RuntimeError(
                f"the logical batch has {batch.local_size} examples (on this process) but the "
                "backward passes since "
                f"the last step saw {pending.examples}: each example must go through exactly one "
                "backward pass per step (clipping per pass bounds only that pass's contribution)"
            )
        return pending

    def _write_noised_gradients(self, sums):
        """Write p.grad for every private parameter; returns the noisy counts (adaptive) or None."""
        std = privacy_math.noise_std_on_rank(self.noise_std, rank=self.rank)
        normalizer = privacy_math.gradient_normalizer(
            loss_reduction=self.loss_reduction, expected_batch_size=self.expected_batch_size,
        )
        params = [p for group in self._groups for p in group.params]
        grads = [
            privacy_math.noised_gradient(
                sums.sums.get(id(p)), shape=p.shape, std=std, normalizer=normalizer,
                device=p.device, generator=self.generator, dtype=p.dtype,
            )
            for p in params
        ]
        released = grads + ([self._noised_counts(sums, params[0].device)]
                            if self.adaptive_clipping is not None else [])
        if self.distributed:
            released = _all_reduce_sum(released)
        for p, grad in zip(params, released):
            p.grad = grad.to(p.dtype)
        return released[-1] if self.adaptive_clipping is not None else None

    def _noised_counts(self, sums, device):
        counts = torch.stack([
            sums.unclipped.get(g, torch.zeros((), dtype=torch.float64)).to(device)
            for g in range(len(self._groups))
        ])
        std = privacy_math.noise_std_on_rank(self.adaptive_clipping.count_noise_std, rank=self.rank)
        return privacy_math.noised_counts(counts, std=std, generator=self.generator)

    def _adapt_thresholds(self, noisy_counts):
        """Post-processing of the noisy counts: the next step's thresholds."""
        config = self.adaptive_clipping
        fractions = privacy_math.unclipped_fractions(noisy_counts, self.expected_batch_size)
        flat = self.instrumentation.clipping == "flat"
        thresholds = privacy_math.adapted_thresholds(
            [g.threshold for g in self._groups], fractions,
            target_quantile=config.target_quantile, learning_rate=config.learning_rate,
            total=None if flat else self._total_threshold,
            min_threshold=config.min_threshold, max_threshold=config.max_threshold,
        )
        for group, threshold in zip(self._groups, thresholds):
            group.threshold = threshold

    def _step_record(self, batch, examples):
        lrs = {float(g["lr"]) for g in self.param_groups if "lr" in g}
        learning_rate = next(iter(lrs)) if len(lrs) == 1 else None
        # One learning rate for all groups is part of "plain SGD" for the last-iterate bound.
        plain_sgd = (type(self.original_optimizer) is torch.optim.SGD and len(lrs) <= 1 and all(
            g.get("momentum", 0) == 0 and not g.get("nesterov", False) for g in self.param_groups))
        decays = {float(g.get("weight_decay", 0.0)) for g in self.param_groups}
        loader = self.data_loader
        return StepRecord(
            noise_multiplier=self.accounted_noise_multiplier,
            adaptive_clipping=self.adaptive_clipping is not None,
            sampling=self.sampling,
            sample_rate=getattr(loader, "sample_rate", None) if self.sampling == "poisson" else None,
            batch_size=getattr(loader, "batch_size", None) if self.sampling != "poisson" else None,
            epoch=batch.epoch if batch is not None else self.steps_taken // self._batches_per_epoch(),
            position_in_epoch=(batch.position_in_epoch if batch is not None
                               else self.steps_taken % self._batches_per_epoch()),
            batches_per_epoch=self._batches_per_epoch(),
            learning_rate=learning_rate,
            weight_decay=max(decays) if decays else 0.0,
            plain_sgd=plain_sgd,
            batch_size_actual=examples,
        )

    def _batches_per_epoch(self):
        loader = self.data_loader
        return max(1, int(getattr(loader, "batches_per_epoch", 0) or 1))

    def _check_budget(self, record):
        if self.max_epsilon is None or self.accountant is None:
            return
        epsilon = self.accountant.epsilon_if_over_budget(record, self.delta, self.max_epsilon)
        if epsilon is not None:
            raise PrivacyBudgetExhausted(
                f"this step would raise epsilon to {epsilon:.4g} > max_epsilon={self.max_epsilon} "
                f"(delta={self.delta}); the step was not applied"
            )


def _all_reduce_sum(tensors):
    """Sum each tensor over all ranks with one collective per device and dtype (flat buffers)."""
    by_device = {}
    for i, t in enumerate(tensors):
        by_device.setdefault((t.device, t.dtype), []).append(i)
    out = list(tensors)
    for indices in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        torch.distributed.all_reduce(flat)
        for i, chunk in zip(indices, flat.split([tensors[i].numel() for i in indices])):
            out[i] = chunk.view_as(tensors[i])
    return out
