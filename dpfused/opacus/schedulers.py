"""Opacus' noise and clipping schedulers (``opacus.schedulers``), same API:
``from dpfused.opacus.schedulers import StepNoise``.

A scheduler sets ``optimizer.noise_multiplier`` (noise schedulers) or ``optimizer.max_grad_norm``
(clipping schedulers) each time its ``step()`` is called, like torch's learning-rate schedulers.
Both are read afresh by every ``DPOptimizer.step``: the accountant records each step's sigma, and
``max_grad_norm`` rescales every group threshold so the sensitivity is the new value
(docs/design.md §4). ``PrivacyEngine.save_checkpoint(noise_scheduler=, grad_clip_scheduler=)``
saves their state as plain data (their parameters; a Lambda scheduler's function is not saved:
build the scheduler with it again before loading).
"""

from __future__ import annotations

from typing import Callable

__all__ = ["ExponentialNoise", "LambdaNoise", "StepNoise", "ExponentialGradClip",
           "LambdaGradClip", "StepGradClip"]


class _Scheduler:
    """Writes ``optimizer.<attribute>`` from ``_value()`` at construction and on each ``step()``."""

    attribute = ""  # "noise_multiplier" or "max_grad_norm"

    def __init__(self, optimizer, *, last_epoch: int = -1):
        if not hasattr(optimizer, self.attribute):
            raise ValueError(
                f"{type(self).__name__} needs an optimizer with a .{self.attribute} attribute: "
                "pass the DPOptimizer that make_private returned")
        self.optimizer = optimizer
        self.last_epoch = last_epoch
        self.step()

    @property
    def _current(self) -> float:
        return getattr(self.optimizer, self.attribute)

    def _value(self) -> float:
        raise NotImplementedError

    def step(self) -> None:
        self.last_epoch += 1
        setattr(self.optimizer, self.attribute, self._value())

    def state_dict(self) -> dict:
        """Everything but the optimizer (Opacus' keys), as plain data: a function (the Lambda
        schedulers' ``noise_lambda`` / ``scheduler_function``) is saved as None, as torch's
        LambdaLR does, since loading a function from a file means running code from it."""
        return {key: None if callable(value) else value
                for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore ``state_dict()``; a saved None keeps this scheduler's own function."""
        for key, value in state_dict.items():
            if value is None and callable(getattr(self, key, None)):
                continue
            setattr(self, key, value)


class _Exponential(_Scheduler):
    def __init__(self, optimizer, *, gamma: float, last_epoch: int = -1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch=last_epoch)

    def _value(self):
        return self._current if self.last_epoch == 0 else self._current * self.gamma


class _Step(_Scheduler):
    def __init__(self, optimizer, *, step_size: int, gamma: float, last_epoch: int = -1):
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, last_epoch=last_epoch)

    def _value(self):
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._current
        return self.gamma * self._current


class _NoiseScheduler(_Scheduler):
    attribute = "noise_multiplier"

    def get_noise_multiplier(self) -> float:  # Opacus' name for the hook
        return self._value()


class _GradClipScheduler(_Scheduler):
    attribute = "max_grad_norm"

    def get_max_grad_norm(self) -> float:  # Opacus' name for the hook
        return self._value()


class ExponentialNoise(_Exponential, _NoiseScheduler):
    """sigma *= gamma at every ``step()`` after the first."""


class StepNoise(_Step, _NoiseScheduler):
    """sigma *= gamma every ``step_size`` calls of ``step()``."""


class LambdaNoise(_NoiseScheduler):
    """sigma = (sigma at construction) * noise_lambda(epoch)."""

    def __init__(self, optimizer, *, noise_lambda: Callable[[int], float], last_epoch: int = -1):
        self.noise_lambda = noise_lambda
        self.base_noise_multiplier = optimizer.noise_multiplier
        super().__init__(optimizer, last_epoch=last_epoch)

    def _value(self):
        return self.base_noise_multiplier * self.noise_lambda(self.last_epoch)


class ExponentialGradClip(_Exponential, _GradClipScheduler):
    """max_grad_norm *= gamma at every ``step()`` after the first."""


class StepGradClip(_Step, _GradClipScheduler):
    """max_grad_norm *= gamma every ``step_size`` calls of ``step()``."""


class LambdaGradClip(_GradClipScheduler):
    """max_grad_norm = (max_grad_norm at construction) * scheduler_function(epoch)."""

    def __init__(self, optimizer, *, scheduler_function: Callable[[int], float],
                 last_epoch: int = -1):
        self.scheduler_function = scheduler_function
        self.base_max_grad_norm = optimizer.max_grad_norm
        super().__init__(optimizer, last_epoch=last_epoch)

    def _value(self):
        return self.base_max_grad_norm * self.scheduler_function(self.last_epoch)
