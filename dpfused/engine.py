"""PrivacyEngine: make an existing PyTorch training loop differentially private.

    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
        data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    ... the user's loop, unchanged ...
    engine.get_epsilon(delta=1e-5)

Opacus' keyword arguments are accepted and each is mapped or refused explicitly (``_OpacusArgs``).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from dpfused import accounting, privacy_math, validate
from dpfused import sampling as dp_sampling
from dpfused.adaptive import AdaptiveClipping
from dpfused.clipping import CLIPPING_MODES
from dpfused.instrument import detach, instrument, plan
from dpfused.optimizer import DPOptimizer

__all__ = ["PrivacyEngine", "get_noise_multiplier"]

ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("poisson", "cyclic", "shuffle")
LOSS_REDUCTIONS = ("mean", "sum")
NEIGHBORINGS = ("add_remove", "replace_one")


class PrivacyEngine:
    """Makes modules, optimizers and data loaders private and accounts for the privacy spent.

    Args:
        accountant: "pld" (default; dp_accounting's privacy-loss-distribution accountant) or
            "rdp". Opacus' "prv" maps to "pld" (both numerical, tight composition); "gdp" is refused.
        neighboring: "add_remove" (default) or "replace_one" (sensitivity 2C).
        secure_mode: Opacus' flag. True is refused: dpfused has no cryptographically secure noise
            source yet.
    """

    def __init__(self, *, accountant: str = "pld", neighboring: str = "add_remove",
                 secure_mode: bool = False):
        accountant = _map_accountant(accountant)
        _check_choice("neighboring", neighboring, NEIGHBORINGS)
        _refuse_secure_mode(secure_mode)
        self.accountant = accounting.PrivacyAccountant(mechanism=accountant, neighboring=neighboring)
        self.accountant_name = accountant
        self.neighboring = neighboring
        self.optimizer: DPOptimizer | None = None
        self.data_loader = None
        self.module: nn.Module | None = None

    # ---- make_private ---------------------------------------------------------------------------
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: torch.utils.data.DataLoader,
        noise_multiplier: float,
        max_grad_norm: float | list[float],
        clipping: str = "flat",
        loss_reduction: str = "mean",
        sampling: str | None = None,
        thresholds: dict[str, float] | list[float] | None = None,
        adaptive_clipping: AdaptiveClipping | None = None,
        batch_first: bool = True,
        max_physical_batch_size: int | None = None,
        shuffle_once: bool = False,
        drop_last: bool = True,
        noise_generator: torch.Generator | None = None,
        sampling_generator: torch.Generator | None = None,
        max_epsilon: float | None = None,
        delta: float | None = None,
        **opacus_kwargs,
    ):
        """Instrument ``module`` in place and wrap ``optimizer`` and ``data_loader``.

        Args:
            module: the model, in train mode. The same object is returned, instrumented in place.
            optimizer: any torch.optim optimizer over the module's parameters.
            data_loader: a DataLoader over a map-style dataset; rebuilt with a DP batch sampler.
            noise_multiplier: sigma >= 0 (noise std is sigma * C).
            max_grad_norm: C, the total clipping norm (sqrt(sum_g C_g^2) for group-wise clipping).
            clipping: "flat" (one group; book-keeping), "per_layer" (a group per layer; fast path)
                or "per_device" (a group per device).
            loss_reduction: "mean" or "sum": how the loss you backpropagate reduces over examples.
            sampling: "poisson" (default), "cyclic" or "shuffle" (DESIGN §6).
            thresholds: per_layer/per_device group thresholds, a dict {group: C_g} or a list
                (with ``adaptive_clipping``, the starting values).
            adaptive_clipping: an ``AdaptiveClipping``: thresholds follow a quantile of the
                per-example norms, from noisy counts released with each step; ``noise_multiplier``
                stays the gradient's sigma and the accountant records sigma_eff < sigma.
            batch_first: False when the model's inputs are (T, B, ...).
            max_physical_batch_size: split logical batches into physical ones of at most this size.
            shuffle_once: cyclic sampling: draw one seeded order before training.
            drop_last: cyclic/shuffle: drop the last partial batch of an epoch.
            noise_generator: torch.Generator for the noise.
            sampling_generator: torch.Generator for the batch sampler.
            max_epsilon, delta: a budget; a step that would exceed it raises PrivacyBudgetExhausted.
            **opacus_kwargs: Opacus' poisson_sampling, grad_sample_mode, criterion, secure_mode,
                and clipping="adaptive" with its target_unclipped_quantile, clipbound_learning_rate,
                min_clipbound, max_clipbound and unclipped_num_std.

        Returns:
            ``(module, optimizer, data_loader)``; ``(module, optimizer, criterion, data_loader)`` when
            Opacus' ``criterion=`` is passed, so Opacus code that unpacks four values runs unchanged.

        Raises:
            ValueError / TypeError: a bad argument or a module that cannot be made private, before
                anything is changed.
        """
        opacus = _OpacusArgs.parse(opacus_kwargs, sampling=sampling, clipping=clipping,
                                   adaptive_clipping=adaptive_clipping)
        sampling = opacus.sampling or "poisson"
        clipping, adaptive_clipping = opacus.clipping, opacus.adaptive_clipping
        if opacus.mapped_adaptive:
            warnings.warn(
                "clipping='adaptive': noise_multiplier is the gradient's sigma in dpfused and the "
                "accountant records sigma_eff (1/sigma_eff^2 = 1/sigma^2 + 1/(4 "
                "unclipped_num_std^2)), so epsilon is higher than without adaptive clipping at the "
                "same sigma (Opacus lowers the gradient noise instead). Use "
                "make_private_with_epsilon to target an epsilon", stacklevel=2)
        max_grad_norm, thresholds = _split_max_grad_norm(max_grad_norm, thresholds, clipping)
        _check_arguments(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         clipping=clipping, loss_reduction=loss_reduction, sampling=sampling,
                         max_epsilon=max_epsilon, delta=delta,
                         max_physical_batch_size=max_physical_batch_size)
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(module, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "module is wrapped in DistributedDataParallel; pass the unwrapped model. dpfused "
                "all-reduces the clipped sums itself when torch.distributed is initialized (DDP's "
                "gradient all-reduce never sees a gradient: per-example clipping replaces it)"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DPOptimizer):
            raise ValueError("optimizer is already a DPOptimizer; pass the original optimizer")
        _check_adaptive(adaptive_clipping, clipping)
        validate.check_module(module)
        validate.check_optimizer(optimizer, module)
        opacus.check_criterion(loss_reduction)

        rank, world_size = _data_parallel_world()
        if world_size > 1:
            _broadcast_parameters(module)
            sampling_generator = _shared_generator(sampling_generator)
        loader = dp_sampling.make_private_data_loader(
            data_loader, sampling=sampling, max_physical_batch_size=max_physical_batch_size,
            shuffle_once=shuffle_once, drop_last=drop_last, generator=sampling_generator,
            rank=rank, world_size=world_size,
        )
        inst = instrument(module, clipping=clipping, max_grad_norm=max_grad_norm,
                          thresholds=thresholds, loss_reduction=loss_reduction,
                          batch_first=batch_first, count_unclipped=adaptive_clipping is not None)
        dp_optimizer = DPOptimizer(
            optimizer, instrumentation=inst, noise_multiplier=noise_multiplier,
            loss_reduction=loss_reduction, expected_batch_size=_expected_batch_size(loader),
            sampling=sampling, data_loader=loader, accountant=self.accountant,
            generator=noise_generator, max_epsilon=max_epsilon, delta=delta,
            distributed=world_size > 1, adaptive_clipping=adaptive_clipping,
        )
        self.module, self.optimizer, self.data_loader = module, dp_optimizer, loader
        if opacus.criterion is not None:
            return module, dp_optimizer, opacus.criterion, loader
        return module, dp_optimizer, loader

    def make_private_with_epsilon(self, *, module, optimizer, data_loader, target_epsilon: float,
                                  target_delta: float, epochs: int | None = None,
                                  steps: int | None = None, last_iterate: dict | None = None,
                                  **kwargs):
        """make_private with sigma calibrated so that ``epochs`` of training spend ``target_epsilon``.

        The calibration uses the same accountant and sampling as training and returns the
        conservative side (epsilon(sigma) <= target_epsilon).

        Args:
            last_iterate: calibrate the last-iterate bound instead of the composed one (cyclic
                sampling, plain SGD at a constant learning rate): a dict with ``smoothness`` (L),
                and optionally ``weight_decay`` and ``convex``; the learning rate is read from the
                optimizer. ``privacy_report`` then reports that bound for the run.
            **kwargs: everything else make_private takes, except noise_multiplier. With
                ``adaptive_clipping`` the calibrated sigma is sigma_eff of gradient and counts
                together; the gradient's sigma is solved from it.
        """
        if "noise_multiplier" in kwargs:
            raise ValueError("make_private_with_epsilon sets noise_multiplier itself; remove it")
        kwargs, adaptive = _resolve_adaptive(kwargs)
        sampling = _OpacusArgs.sampling_of(kwargs) or "poisson"
        num_samples = len(data_loader.dataset)
        batch_size = data_loader.batch_size
        if batch_size is None:
            raise ValueError("data_loader must have a batch_size (the expected logical batch size)")
        if last_iterate is not None and adaptive is not None:
            raise ValueError("last_iterate calibration needs fixed clipping thresholds; drop "
                             "adaptive_clipping or last_iterate")
        if last_iterate is not None:
            last_iterate = {**last_iterate, "learning_rate": _constant_learning_rate(optimizer)}
        sigma = accounting.calibrate_noise_multiplier(
            target_epsilon=target_epsilon, delta=target_delta, sampling=sampling,
            sample_rate=batch_size / num_samples if sampling == "poisson" else None,
            num_samples=num_samples, batch_size=batch_size, epochs=epochs, steps=steps,
            mechanism=self.accountant_name, neighboring=self.neighboring,
            last_iterate=last_iterate, drop_last=kwargs.get("drop_last", True),
        )
        if adaptive is not None:
            # The count query's cost grows with the number of groups K; thresholds do not matter.
            _, groups = plan(module, clipping=kwargs["clipping"], max_grad_norm=1.0)
            sigma = privacy_math.gradient_noise_multiplier(sigma, adaptive.count_noise_std,
                                                           len(groups))
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, **kwargs)

    # ---- accounting -----------------------------------------------------------------------------
    def get_epsilon(self, delta: float) -> float:
        """Composed epsilon (every iterate released) for the steps taken so far (Opacus-compatible)."""
        return self.accountant.get_epsilon(delta)

    def privacy_report(self, delta: float, *, smoothness: float | None = None,
                       convex: bool = False) -> accounting.PrivacyReport:
        """Composed and (where its assumptions hold) last-iterate epsilon, with the assumptions."""
        return accounting.privacy_report(self.accountant, delta, smoothness=smoothness,
                                         convex=convex)

    def state_dict(self) -> dict:
        """Accountant ledger and sampler position: resume gives the same batches and epsilon."""
        state = {"accountant": self.accountant.state_dict()}
        if self.data_loader is not None:
            state["data_loader"] = self.data_loader.state_dict()
        if self.optimizer is not None:
            state["steps_taken"] = self.optimizer.steps_taken
            # Adaptive thresholds move: resume from where they were.
            state["thresholds"] = [g.threshold for g in self.optimizer.instrumentation.groups]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])
        if "data_loader" in state:
            if self.data_loader is None:
                raise ValueError("call make_private before load_state_dict: the saved state has a "
                                 "data loader position to restore")
            self.data_loader.load_state_dict(state["data_loader"])
        if self.optimizer is not None and "steps_taken" in state:
            self.optimizer.steps_taken = state["steps_taken"]
        if self.optimizer is not None and "thresholds" in state:
            groups = self.optimizer.instrumentation.groups
            if len(state["thresholds"]) != len(groups):
                raise ValueError(
                    f"load_state_dict: the saved state has {len(state['thresholds'])} clipping "
                    f"thresholds but this model has {len(groups)} clipping groups; make_private "
                    "with the same model and clipping= as the saved run"
                )
            for group, threshold in zip(groups, state["thresholds"]):
                group.threshold = float(threshold)

    def save_checkpoint(self, *, path, module: nn.Module, optimizer=None,
                        checkpoint_dict: dict | None = None, noise_scheduler=None,
                        grad_clip_scheduler=None) -> None:
        """Opacus' save_checkpoint: module, optimizer and this engine's state in one file.

        The engine's state is ``state_dict()``: the accountant's ledger, the sampler position and
        the clipping thresholds, so ``load_checkpoint`` resumes with the same batches and epsilon.

        Raises:
            ValueError: a noise or clipping scheduler (dpfused has none to save).
        """
        _refuse_schedulers(noise_scheduler, grad_clip_scheduler)
        checkpoint = dict(checkpoint_dict or {})
        checkpoint["module_state_dict"] = module.state_dict()
        checkpoint["privacy_engine_state_dict"] = self.state_dict()
        if optimizer is not None:
            checkpoint["optimizer_state_dict"] = optimizer.state_dict()
        torch.save(checkpoint, path)

    def load_checkpoint(self, *, path, module: nn.Module, optimizer=None, noise_scheduler=None,
                        grad_clip_scheduler=None) -> dict:
        """Restore what ``save_checkpoint`` wrote, after ``make_private``; returns the whole dict."""
        _refuse_schedulers(noise_scheduler, grad_clip_scheduler)
        checkpoint = torch.load(path)
        module.load_state_dict(checkpoint["module_state_dict"])
        self.load_state_dict(checkpoint["privacy_engine_state_dict"])
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        return checkpoint

    @staticmethod
    def detach(module: nn.Module) -> nn.Module:
        return detach(module)


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


def _refuse_schedulers(noise_scheduler, grad_clip_scheduler):
    if noise_scheduler is not None or grad_clip_scheduler is not None:
        raise ValueError("dpfused has no noise or clipping schedulers to checkpoint; change "
                         "optimizer.noise_multiplier between steps instead (the ledger records "
                         "each step's sigma)")


def _constant_learning_rate(optimizer) -> float:
    rates = {float(group["lr"]) for group in optimizer.param_groups}
    if len(rates) != 1:
        raise ValueError(
            f"last_iterate calibration needs one learning rate for all parameter groups; the "
            f"optimizer has {sorted(rates)}"
        )
    return rates.pop()


def _data_parallel_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed's default group; (0, 1) without one."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _broadcast_parameters(module: nn.Module) -> None:
    """Every rank starts from rank 0's parameters and buffers (they then stay equal: every rank
    applies the same all-reduced noised gradient)."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)


def _shared_generator(generator: torch.Generator | None) -> torch.Generator:
    """One sampler seed for all ranks: each rank keeps its slice of the SAME logical batch, so the
    union over ranks is the Poisson/cyclic/shuffled batch the accountant assumes."""
    if generator is None:  # as on one process: seeded from torch's global RNG (rank 0's)
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    state = generator.get_state()
    torch.distributed.broadcast(state, src=0)
    shared = torch.Generator()
    shared.set_state(state)
    return shared


def _check_adaptive(adaptive_clipping, clipping):
    if adaptive_clipping is None:
        return
    if not isinstance(adaptive_clipping, AdaptiveClipping):
        raise TypeError("adaptive_clipping must be a dpfused.AdaptiveClipping (or None), got "
                        f"{type(adaptive_clipping).__name__}")
    adaptive_clipping.check_clipping(clipping)


def _resolve_adaptive(kwargs):
    """make_private keywords with Opacus' adaptive ones mapped; and the AdaptiveClipping or None."""
    adaptive_keys = {k: kwargs[k] for k in _OpacusArgs.ADAPTIVE_KEYS if k in kwargs}
    args = _OpacusArgs.parse(adaptive_keys, sampling=None, clipping=kwargs.get("clipping", "flat"),
                             adaptive_clipping=kwargs.get("adaptive_clipping"))
    _check_adaptive(args.adaptive_clipping, args.clipping)
    kwargs = {k: v for k, v in kwargs.items() if k not in adaptive_keys}
    kwargs.update(clipping=args.clipping, adaptive_clipping=args.adaptive_clipping)
    return kwargs, args.adaptive_clipping


def _expected_batch_size(loader) -> float:
    if loader.sampling == "poisson":
        return loader.sample_rate * loader.num_samples
    return float(loader.batch_size)


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(map(repr, allowed))}")


def _map_accountant(name):
    if name == "prv":
        warnings.warn("accountant='prv' (Opacus) maps to dpfused's 'pld' (dp_accounting's "
                      "privacy-loss-distribution accountant): both compose numerically and tightly",
                      stacklevel=3)
        return "pld"
    if name == "gdp":
        raise ValueError("accountant='gdp' is refused: the Gaussian-DP CLT approximation is not an "
                         "upper bound on epsilon; use 'pld' (default) or 'rdp'")
    _check_choice("accountant", name, ACCOUNTANTS)
    return name


def _refuse_secure_mode(secure_mode):
    if secure_mode:
        raise ValueError(
            "secure_mode=True needs a cryptographically secure noise and sampling source, which "
            "dpfused does not ship yet (torch's generators are not CSPRNGs); use secure_mode=False"
        )


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


def _check_arguments(*, noise_multiplier, max_grad_norm, clipping, loss_reduction, sampling,
                     max_epsilon, delta, max_physical_batch_size):
    if not isinstance(max_grad_norm, (int, float)) or not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
    if (not isinstance(noise_multiplier, (int, float)) or not math.isfinite(noise_multiplier)
            or noise_multiplier < 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    _check_choice("clipping", clipping, CLIPPING_MODES)
    _check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
    _check_choice("sampling", sampling, SAMPLINGS)
    if max_physical_batch_size is not None and (
            not isinstance(max_physical_batch_size, int) or max_physical_batch_size < 1):
        raise ValueError(f"max_physical_batch_size must be a positive int, got {max_physical_batch_size!r}")
    if (max_epsilon is None) != (delta is None):
        raise ValueError("max_epsilon and delta go together: give both or neither")
    if max_epsilon is not None and not max_epsilon > 0:
        raise ValueError(f"max_epsilon must be > 0, got {max_epsilon!r}")
    if delta is not None and not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


class _OpacusArgs:
    """Opacus' make_private keywords, each mapped onto dpfused's or refused with the reason."""

    # Opacus' AdaClipDPOptimizer keywords (clipping="adaptive").
    ADAPTIVE_KEYS = ("target_unclipped_quantile", "clipbound_learning_rate", "max_clipbound",
                     "min_clipbound", "unclipped_num_std")

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
        if "secure_mode" in kwargs:
            _refuse_secure_mode(kwargs.pop("secure_mode"))
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
        # (DESIGN §7); dpfused samples and accounts shuffled batches honestly.
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
