"""Loss scaling for float16 autocast under DP (docs/design.md §3, "fp16 and loss scaling").

float16 has a narrow range (max 65504, smallest normal 6e-5): small gradients underflow unless the
loss is multiplied by a scale s before backward. torch's ``GradScaler`` is not private twice over:
it would clip per-example gradients in scaled units, and its rule "skip the step and halve s when
any gradient overflowed" releases, through s and the skipped step, whether some example's gradient
overflowed. ``dpfused.amp.GradScaler`` keeps torch's calls (``scale``, ``step``, ``update``) and
makes them private:

- The book-keeper learns s when the loss is scaled: per-example norms come from the scaled pieces,
  in float32 or wider, and clip factors and clipped sums are in unscaled units (the multiplier of
  example i is c_i · B_norm / s). Sums and noise are float32: nothing is rounded to float16.
- An example whose scaled gradient overflows has a non-finite gradient of its own; the
  ``nonfinite_gradients`` policy handles it from its own norms ("drop": it contributes 0; the step
  is never skipped). Nothing about one example reaches another.
- ``dynamic=False`` (default): s is a constant, public. ``dynamic=True``: each step also releases
  the number of examples dropped as non-finite plus N(0, overflow_noise_std²) (sensitivity 1),
  accounted with the gradient as one Gaussian (1/σ_eff² = 1/σ² + 1/σ_o², as the adaptive
  thresholds' counts are), and s moves only from that noised count: halved when it exceeds
  ``overflow_tolerance`` times the expected batch size, doubled after ``growth_interval`` steps
  without. s is then post-processing of released values.

Usage::

    model, optimizer, loader = engine.make_private(..., nonfinite_gradients="drop")
    scaler = dpfused.amp.GradScaler(optimizer, init_scale=2.0 ** 12)
    for x, y in loader:
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dpfused.arguments import check_flag, check_number
from dpfused.optimizer import DPOptimizer

__all__ = ["GradScaler"]


class GradScaler:
    """A private loss scaler for one ``DPOptimizer`` (module docstring).

    Args:
        optimizer: the ``DPOptimizer`` make_private returned.
        init_scale: s, a positive finite number (a power of two keeps the scaling exact).
        dynamic: move s from a noised count of overflowing examples (module docstring).
        overflow_noise_std: sigma_o of that count's noise; required with ``dynamic=True`` (a
            count of sensitivity 1: e.g. batch_size / 20, as for adaptive thresholds).
        overflow_tolerance: halve s when the noised count exceeds this fraction of the expected
            logical batch size.
        growth_factor, backoff_factor, growth_interval: torch's names and meanings.

    Raises:
        TypeError / ValueError: a bad argument; ``dynamic=True`` without ``overflow_noise_std``,
            with ``nonfinite_gradients="raise"`` (an overflow would stop the run: use "drop"), or
            on several processes (not supported yet: use a static scale there).
    """

    def __init__(self, optimizer: DPOptimizer, *, init_scale: float = 2.0 ** 16,
                 dynamic: bool = False, overflow_noise_std: float | None = None,
                 overflow_tolerance: float = 0.01, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        if not isinstance(optimizer, DPOptimizer):
            raise TypeError("GradScaler needs the DPOptimizer that make_private returned, got "
                            f"{type(optimizer).__name__}")
        _check_positive("init_scale", init_scale)
        check_flag("dynamic", dynamic)
        self.optimizer = optimizer
        self._scale = float(init_scale)
        self.dynamic = dynamic
        self.overflow_tolerance = float(overflow_tolerance)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self._steps_since_backoff = 0
        self._steps_seen = optimizer.steps_taken
        if dynamic:
            self._start_releasing_overflow_counts(overflow_noise_std)
        elif overflow_noise_std is not None:
            raise ValueError("overflow_noise_std applies to dynamic=True only")

    def _start_releasing_overflow_counts(self, overflow_noise_std):
        if overflow_noise_std is None:
            raise ValueError(
                "GradScaler(dynamic=True) releases a noised count of overflowing examples each "
                "step: give overflow_noise_std= (sigma of that count; about batch_size / 20), or "
                "use a static scale (dynamic=False)")
        _check_positive("overflow_noise_std", overflow_noise_std)
        check_number("overflow_tolerance", self.overflow_tolerance, "in (0, 1]",
                     lambda v: 0 < v <= 1)
        if self.optimizer.instrumentation.book.nonfinite != "drop":
            raise ValueError(
                "GradScaler(dynamic=True) expects overflows: make_private(nonfinite_gradients="
                "'drop') so an overflowing example contributes 0 instead of stopping the run")
        if self.optimizer.reduction is not None:
            raise ValueError(
                "GradScaler(dynamic=True) is not supported on several processes yet (the count "
                "would have to be reduced before its noise); use a static scale (dynamic=False)")
        self.optimizer.release_overflow_counts(float(overflow_noise_std))

    # ---- torch.amp.GradScaler's interface ----------------------------------------------------
    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """loss · s; the next backward pass is clipped in units of s (the book-keeper is told)."""
        self.optimizer.instrumentation.book.set_amp_scale(self._scale)
        return loss * self._scale

    def step(self, optimizer: DPOptimizer, *args, **kwargs):
        """``optimizer.step()``: the sums are already in unscaled units; no step is skipped."""
        if optimizer is not self.optimizer:
            raise ValueError("GradScaler.step got another optimizer than the one it was made for")
        return optimizer.step(*args, **kwargs)

    def unscale_(self, optimizer: DPOptimizer) -> None:
        """Nothing to do: dpfused's sums are unscaled when clipped, and .grad holds nothing
        between backward and step (a clip_grad_norm_ there reads nothing)."""

    def update(self, new_scale: float | None = None) -> None:
        """Dynamic: move s from the noised overflow count of each step taken since the last call.

        Args:
            new_scale: set s directly (public: chosen by the user, not from the data).
        """
        if new_scale is not None:
            _check_positive("new_scale", new_scale)
            self._scale = float(new_scale)
            return
        taken = self.optimizer.steps_taken - self._steps_seen
        self._steps_seen = self.optimizer.steps_taken
        if not self.dynamic or taken == 0:
            return
        noised = self.optimizer.noised_overflow_count  # released: post-processing from here
        if noised > self.overflow_tolerance * self.optimizer.last_expected_batch_size:
            self._scale *= self.backoff_factor
            self._steps_since_backoff = 0
            return
        self._steps_since_backoff += taken
        if self._steps_since_backoff >= self.growth_interval:
            self._scale *= self.growth_factor
            self._steps_since_backoff = 0

    def get_scale(self) -> float:
        return self._scale

    def is_enabled(self) -> bool:
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self._scale, "steps_since_backoff": self._steps_since_backoff,
                "dynamic": self.dynamic}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state["dynamic"]) != self.dynamic:
            raise ValueError(f"load_state_dict: the saved scaler has dynamic={state['dynamic']}, "
                             f"this one dynamic={self.dynamic}")
        _check_positive("scale", state["scale"])
        self._scale = float(state["scale"])
        self._steps_since_backoff = int(state["steps_since_backoff"])
        self._steps_seen = self.optimizer.steps_taken


def _check_positive(name: str, value) -> None:
    check_number(name, value, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)
