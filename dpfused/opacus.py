"""Opacus compatibility: Opacus code runs on dpfused with one import changed.

    from opacus import PrivacyEngine          ->   from dpfused.opacus import PrivacyEngine

Opacus' keyword arguments (``poisson_sampling``, ``grad_sample_mode``, ``criterion``,
``secure_mode``, ``clipping="adaptive"`` with its keywords, a list of per-layer ``max_grad_norm``,
``accountant="prv"``) are each mapped onto dpfused's or refused with the reason, and
``make_private`` returns four values when ``criterion=`` is passed, as Opacus does. dpfused's own
``dpfused.PrivacyEngine`` has one typed interface and always returns three values.
"""

from __future__ import annotations

import math
import warnings

from dpfused import accounting, engine
from dpfused.adaptive import AdaptiveClipping

__all__ = ["PrivacyEngine", "get_noise_multiplier"]


class PrivacyEngine(engine.PrivacyEngine):
    """``dpfused.PrivacyEngine`` with Opacus' keywords and return values (see the module docstring).

    Args:
        accountant: "pld" (default), "rdp", or Opacus' "prv" (mapped to "pld"); "gdp" is refused.
        secure_mode: Opacus' flag; see ``dpfused.PrivacyEngine``.
    """

    def __init__(self, *, accountant: str = "pld", secure_mode: bool = False, **kwargs):
        super().__init__(accountant=_map_accountant(accountant), secure_mode=secure_mode, **kwargs)

    def make_private(self, *, max_grad_norm, sampling=None, clipping="flat", thresholds=None,
                     adaptive_clipping=None, **kwargs):
        """Opacus' make_private: ``(module, optimizer, data_loader)``, or
        ``(module, optimizer, criterion, data_loader)`` when ``criterion=`` is passed."""
        native, criterion = _native_arguments(
            kwargs, max_grad_norm=max_grad_norm, sampling=sampling, clipping=clipping,
            thresholds=thresholds, adaptive_clipping=adaptive_clipping)
        module, optimizer, loader = super().make_private(**native)
        if criterion is not None:
            return module, optimizer, criterion, loader
        return module, optimizer, loader

    def make_private_with_epsilon(self, *, module, optimizer, data_loader, target_epsilon,
                                  target_delta, epochs=None, steps=None, last_iterate=None,
                                  max_grad_norm, sampling=None, clipping="flat", thresholds=None,
                                  adaptive_clipping=None, **kwargs):
        """Opacus' make_private_with_epsilon, with the return values of ``make_private``."""
        if "noise_multiplier" in kwargs:
            raise ValueError("make_private_with_epsilon sets noise_multiplier itself; remove it")
        native, criterion = _native_arguments(
            {**kwargs, "module": module, "optimizer": optimizer, "data_loader": data_loader,
             "noise_multiplier": 0.0},
            max_grad_norm=max_grad_norm, sampling=sampling, clipping=clipping,
            thresholds=thresholds, adaptive_clipping=adaptive_clipping)
        del native["noise_multiplier"]
        module, optimizer, loader = super().make_private_with_epsilon(
            target_epsilon=target_epsilon, target_delta=target_delta, epochs=epochs, steps=steps,
            last_iterate=last_iterate, **native)
        if criterion is not None:
            return module, optimizer, criterion, loader
        return module, optimizer, loader


def _native_arguments(kwargs, *, max_grad_norm, sampling, clipping, thresholds, adaptive_clipping):
    """dpfused's make_private keywords for Opacus' ones, and the criterion (or None)."""
    opacus = _OpacusArgs.parse(
        {k: v for k, v in kwargs.items() if k in _OpacusArgs.KEYS},
        sampling=sampling, clipping=clipping, adaptive_clipping=adaptive_clipping)
    if opacus.mapped_adaptive:
        warnings.warn(
            "clipping='adaptive': noise_multiplier is the gradient's sigma in dpfused and the "
            "accountant records sigma_eff (1/sigma_eff^2 = 1/sigma^2 + 1/(4 "
            "unclipped_num_std^2)), so epsilon is higher than without adaptive clipping at the "
            "same sigma (Opacus lowers the gradient noise instead). Use "
            "make_private_with_epsilon to target an epsilon", stacklevel=3)
    max_grad_norm, thresholds = _split_max_grad_norm(max_grad_norm, thresholds, opacus.clipping)
    native = {k: v for k, v in kwargs.items() if k not in _OpacusArgs.KEYS}
    opacus.check_criterion(native.get("loss_reduction", "mean"))
    native.update(max_grad_norm=max_grad_norm, thresholds=thresholds, clipping=opacus.clipping,
                  adaptive_clipping=opacus.adaptive_clipping,
                  sampling=opacus.sampling or "poisson")
    return native, opacus.criterion


class _OpacusArgs:
    """Opacus' make_private keywords, each mapped onto dpfused's or refused with the reason."""

    # Opacus' AdaClipDPOptimizer keywords (clipping="adaptive").
    ADAPTIVE_KEYS = ("target_unclipped_quantile", "clipbound_learning_rate", "max_clipbound",
                     "min_clipbound", "unclipped_num_std")
    KEYS = ("poisson_sampling", "grad_sample_mode", "secure_mode", "criterion", *ADAPTIVE_KEYS)

    def __init__(self):
        self.sampling = None
        self.criterion = None
        self.clipping = "flat"
        self.adaptive_clipping = None
        self.mapped_adaptive = False  # Opacus' clipping="adaptive" keywords were given

    @classmethod
    def parse(cls, kwargs, *, sampling, clipping, adaptive_clipping=None):
        args = cls()
        args.sampling = sampling
        args.clipping, args.adaptive_clipping = clipping, adaptive_clipping
        kwargs = dict(kwargs)
        args.sampling = cls.sampling_of({**kwargs, "sampling": sampling})
        kwargs.pop("poisson_sampling", None)
        if "grad_sample_mode" in kwargs:
            mode = kwargs.pop("grad_sample_mode")
            if mode not in ("hooks", "ghost", "functorch", "ew"):
                raise ValueError(
                    f"grad_sample_mode={mode!r}: dpfused computes per-example norms inside backward "
                    "for every clipping mode; Opacus' 'hooks', 'ghost', 'functorch' and 'ew' are "
                    "accepted (they only choose Opacus' implementation); use clipping= to choose "
                    "the clipping groups"
                )
            if mode == "ghost" and clipping != "flat":
                raise ValueError("grad_sample_mode='ghost' is flat clipping in Opacus; it "
                                 f"contradicts clipping={clipping!r}")
        if kwargs.pop("secure_mode", False):
            raise ValueError("secure_mode is a PrivacyEngine argument: "
                             "PrivacyEngine(secure_mode=True), then make_private without it")
        if "criterion" in kwargs:
            args.criterion = kwargs.pop("criterion")
        args._parse_adaptive(kwargs)
        if kwargs:
            raise TypeError(f"make_private got unexpected keyword argument(s) {sorted(kwargs)}")
        return args

    def _parse_adaptive(self, kwargs):
        """Opacus' clipping="adaptive" is flat clipping with a moving norm (Andrew et al.)."""
        given = {k: kwargs.pop(k) for k in self.ADAPTIVE_KEYS if k in kwargs}
        if self.clipping != "adaptive":
            if given:
                raise ValueError(f"{sorted(given)} configure Opacus' clipping='adaptive'; with "
                                 f"clipping={self.clipping!r} use adaptive_clipping=AdaptiveClipping(...)")
            return
        if self.adaptive_clipping is not None:
            raise ValueError("give clipping='adaptive' with Opacus' keywords or "
                             "adaptive_clipping=AdaptiveClipping(...), not both")
        missing = [k for k in self.ADAPTIVE_KEYS if k not in given]
        if missing:
            raise ValueError(f"clipping='adaptive' (Opacus) needs {missing}; or use "
                             "clipping='flat', adaptive_clipping=dpfused.AdaptiveClipping(...)")
        self.mapped_adaptive = True
        self.clipping = "flat"
        self.adaptive_clipping = AdaptiveClipping(
            count_noise_std=given["unclipped_num_std"],
            target_quantile=given["target_unclipped_quantile"],
            learning_rate=given["clipbound_learning_rate"],
            min_threshold=given["min_clipbound"], max_threshold=given["max_clipbound"])

    @staticmethod
    def sampling_of(kwargs):
        """dpfused's sampling from ``sampling=`` or Opacus' ``poisson_sampling=`` (None: default)."""
        sampling = kwargs.get("sampling")
        if "poisson_sampling" not in kwargs:
            return sampling
        # Opacus accounts a non-Poisson loader as if it were Poisson, which understates epsilon
        # (docs/design.md §7); dpfused samples and accounts shuffled batches honestly.
        mapped = "poisson" if kwargs["poisson_sampling"] else "shuffle"
        if sampling is not None and sampling != mapped:
            raise ValueError(f"poisson_sampling contradicts sampling={sampling!r}; give one")
        return mapped

    def check_criterion(self, loss_reduction):
        if self.criterion is None:
            return
        reduction = getattr(self.criterion, "reduction", None)
        if reduction is not None and reduction != loss_reduction:
            raise ValueError(
                f"criterion has reduction={reduction!r} but loss_reduction={loss_reduction!r}; "
                "they must match, or per-example gradients are scaled wrongly"
            )


def get_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float,
                         epochs: int | None = None, steps: int | None = None,
                         accountant: str = "pld", **opacus_kwargs) -> float:
    """Opacus' ``get_noise_multiplier`` for Poisson sampling, on dpfused's calibration.

    Steps are ``steps`` or ``epochs * round(1/q)``; sigma is bisected to 0.1%, so Opacus'
    ``epsilon_tolerance`` is accepted and not needed.

    Raises:
        ValueError: as ``accounting.calibrate_noise_multiplier``, or an unknown keyword.
    """
    opacus_kwargs.pop("epsilon_tolerance", None)
    if opacus_kwargs:
        raise TypeError(f"get_noise_multiplier got unexpected keyword argument(s) "
                        f"{sorted(opacus_kwargs)}")
    return accounting.calibrate_noise_multiplier(
        target_epsilon=target_epsilon, delta=target_delta, sampling="poisson",
        sample_rate=sample_rate, epochs=epochs, steps=steps, mechanism=_map_accountant(accountant))


def _map_accountant(name):
    if name == "prv":
        warnings.warn("accountant='prv' (Opacus) maps to dpfused's 'pld' (dp_accounting's "
                      "privacy-loss-distribution accountant): both compose numerically and tightly",
                      stacklevel=3)
        return "pld"
    if name == "gdp":
        raise ValueError("accountant='gdp' is refused: the Gaussian-DP CLT approximation is not an "
                         "upper bound on epsilon; use 'pld' (default) or 'rdp'")
    engine._check_choice("accountant", name, accounting.MECHANISMS)
    return name


def _split_max_grad_norm(max_grad_norm, thresholds, clipping):
    """Opacus passes per-layer thresholds as a list in max_grad_norm; accept it for per_layer."""
    if isinstance(max_grad_norm, (list, tuple)):
        if clipping not in ("per_layer", "per_device"):
            raise ValueError(f"max_grad_norm is a list but clipping={clipping!r}; a list of "
                             "thresholds needs clipping='per_layer' or 'per_device'")
        if thresholds is not None:
            raise ValueError("give group thresholds either as max_grad_norm=[...] or thresholds=, not both")
        values = [float(v) for v in max_grad_norm]
        return math.sqrt(sum(v * v for v in values)), values
    if isinstance(thresholds, (dict, list, tuple)):
        values = thresholds.values() if isinstance(thresholds, dict) else thresholds
        total = math.sqrt(sum(float(v) ** 2 for v in values))
        if not math.isclose(total, float(max_grad_norm), rel_tol=1e-6):
            raise ValueError(f"thresholds give sqrt(sum C_g^2) = {total:.6g} but max_grad_norm="
                             f"{max_grad_norm}; make them agree (max_grad_norm is the sensitivity)")
    return max_grad_norm, thresholds
