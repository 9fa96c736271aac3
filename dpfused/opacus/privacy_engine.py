"""Opacus' ``PrivacyEngine`` on dpfused (``opacus.privacy_engine``): its keywords and return values.

Opacus' keyword arguments (``poisson_sampling``, ``grad_sample_mode``, ``criterion``,
``secure_mode``, ``wrap_model``, ``rand_on_empty``, ``clipping="adaptive"`` with its keywords, a
list of per-parameter ``max_grad_norm``, ``accountant="prv"``) are each mapped onto dpfused's or
refused with the reason, and ``make_private`` returns four values for ``grad_sample_mode="ghost"``,
as Opacus does. dpfused's own ``dpfused.PrivacyEngine`` has one typed interface and always returns
three values.

The model is instrumented in place (dpfused has no wrapper module): with ``wrap_model=True``
(Opacus' default) the returned module is the model itself, and ``model._module`` (how code unwraps
Opacus' GradSampleModule) is the model too; with ``wrap_model=False`` the first value is a
``GradSampleHooks`` whose ``cleanup()`` undoes the instrumentation, and the model is used as is.

FSDP2 as in Opacus: a model sharded by ``FSDP2Wrapper`` (``dpfused.opacus.utils.fsdp_utils``)
with ``grad_sample_mode="ghost_fsdp"`` (or "fsdp") runs on dpfused's own FSDP2 path
(docs/design.md §9). A loader with a ``DistributedSampler`` and
``batch_size=b`` per process stands, as in Opacus, for logical batches of ``b * num_replicas``:
dpfused draws each one once and gives every process its slice. A private loader returned by an
earlier ``make_private`` (a notebook cell run again) is unwrapped to the dataset and settings of
the loader it was made from, never wrapped a second time.

``poisson_sampling=False`` keeps the user's loader semantics: a loader with ``shuffle=False`` is
one fixed order, which dpfused samples and accounts as ``sampling="cyclic"`` (the user's order and
batch size); ``shuffle=True`` is ``sampling="shuffle"``; the loader's ``drop_last`` is kept (with
``drop_last=False`` the last batch of an epoch is smaller, and the accountant records its own
size). Opacus accounts such loaders as if they were Poisson, which understates epsilon
(docs/design.md §7).
"""

from __future__ import annotations

import warnings

import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from dpfused import accounting, distributed, engine, privacy_math
from dpfused.adaptive import AdaptiveClipping
from dpfused.arguments import check_choice, check_thresholds_total
from dpfused.instrument import detach, plan
from dpfused.opacus.accountants.accountants import GDP_REFUSAL
from dpfused.opacus.validators import ModuleValidator
from dpfused.sampling import DPDataLoader
from dpfused.sampling.loader import _worker_options_of

__all__ = ["GradSampleHooks", "PrivacyEngine"]


class PrivacyEngine(engine.PrivacyEngine):
    """``dpfused.PrivacyEngine`` with Opacus' keywords and return values (see the module docstring).

    Args:
        accountant: "pld" (default), "rdp", or Opacus' "prv" (mapped to "pld"); "gdp" is refused.
        secure_mode: Opacus' flag; see ``dpfused.PrivacyEngine``.
    """

    def __init__(self, *, accountant: str = "pld", secure_mode: bool = False, **kwargs):
        super().__init__(accountant=_map_accountant(accountant), secure_mode=secure_mode, **kwargs)

    @classmethod
    def get_compatible_module(cls, module: nn.Module) -> nn.Module:
        """Opacus' get_compatible_module: a fixed copy of ``module`` (``ModuleValidator.fix``),
        validated.

        Raises:
            UnsupportedModuleError: what the fix cannot repair.
        """
        return ModuleValidator.fix_and_validate(module)

    def is_compatible(self, *, module: nn.Module, optimizer=None, data_loader=None) -> bool:
        return ModuleValidator.is_valid(module)

    def validate(self, *, module: nn.Module, optimizer=None, data_loader=None) -> None:
        ModuleValidator.validate(module, strict=True)

    def make_private(self, *, module, optimizer, data_loader, max_grad_norm, sampling=None,
                     clipping="flat", thresholds=None, adaptive_clipping=None, **kwargs):
        """Opacus' make_private: ``(module, optimizer, data_loader)``, or
        ``(module, optimizer, criterion, data_loader)`` for ``grad_sample_mode="ghost"``; with
        ``wrap_model=False`` the first value is a ``GradSampleHooks`` (see the module docstring)."""
        data_loader, sample_rate = _loader_to_wrap(data_loader)
        native, opacus = _native_arguments(
            {**kwargs, "module": module, "optimizer": optimizer, "data_loader": data_loader},
            max_grad_norm=max_grad_norm, sampling=sampling, clipping=clipping,
            thresholds=thresholds, adaptive_clipping=adaptive_clipping)
        _keep_sample_rate(native, sample_rate)
        module, optimizer, loader = super().make_private(**native)
        return opacus.returned(module, optimizer, loader)

    def make_private_with_epsilon(self, *, module, optimizer, data_loader, target_epsilon,
                                  target_delta, epochs=None, steps=None, last_iterate=None,
                                  max_grad_norm, sampling=None, clipping="flat", thresholds=None,
                                  adaptive_clipping=None, **kwargs):
        """Opacus' make_private_with_epsilon, with the return values of ``make_private``."""
        if "noise_multiplier" in kwargs:
            raise ValueError("make_private_with_epsilon sets noise_multiplier itself; remove it")
        data_loader, sample_rate = _loader_to_wrap(data_loader)
        native, opacus = _native_arguments(
            {**kwargs, "module": module, "optimizer": optimizer, "data_loader": data_loader,
             "noise_multiplier": 0.0},
            max_grad_norm=max_grad_norm, sampling=sampling, clipping=clipping,
            thresholds=thresholds, adaptive_clipping=adaptive_clipping)
        del native["noise_multiplier"]
        _keep_sample_rate(native, sample_rate)
        module, optimizer, loader = super().make_private_with_epsilon(
            target_epsilon=target_epsilon, target_delta=target_delta, epochs=epochs, steps=steps,
            last_iterate=last_iterate, **native)
        return opacus.returned(module, optimizer, loader)

    @staticmethod
    def detach(module: nn.Module) -> nn.Module:
        if module.__dict__.get("_module") is module:
            del module.__dict__["_module"]
        return detach(module)


class GradSampleHooks:
    """What Opacus' ``make_private(wrap_model=False)`` returns: keep using the model itself;
    ``cleanup()`` removes dpfused's instrumentation when training is done."""

    def __init__(self, module: nn.Module):
        self._module = module

    def cleanup(self) -> None:
        PrivacyEngine.detach(self._module)

    remove_hooks = cleanup


def _loader_to_wrap(data_loader):
    """(the torch DataLoader to make private, the Poisson rate to keep or None).

    A private loader passed back in is unwrapped to its original loader's dataset and settings;
    a loader over a ``DistributedSampler`` becomes the loader of the whole logical batch. Each
    says so in a warning; any other loader is returned as it is.
    """
    if isinstance(data_loader, DPDataLoader):
        return _unwrapped_private_loader(data_loader)
    if (isinstance(getattr(data_loader, "sampler", None), DistributedSampler)
            and data_loader.batch_size is not None):
        return _loader_over_all_processes(data_loader), None
    return data_loader, None


def _unwrapped_private_loader(private: DPDataLoader):
    """The loader ``private`` was made from, rebuilt: its dataset, batch size (q N under Poisson
    sampling, whose q is kept exactly), order (shuffle=False for cyclic), drop_last, collate_fn
    and worker options. ``private`` itself is left as it is: it is not wrapped again, and its
    listeners (the earlier engine's book-keeper) never see the new loader's batches."""
    if private.sampling == "poisson":
        sample_rate = private.sample_rate
        batch_size = max(1, round(sample_rate * private.num_samples))
    else:
        sample_rate, batch_size = None, private.batch_size
    original = DataLoader(private.dataset, batch_size=batch_size,
                          shuffle=private.sampling != "cyclic", drop_last=bool(private.drop_last),
                          collate_fn=private.collate_fn.collate_fn,
                          **_worker_options_of(private.data_loader))
    kept = f", sample rate {sample_rate:.6g}" if sample_rate is not None else ""
    warnings.warn(
        "data_loader is a private DPDataLoader returned by an earlier make_private (a notebook "
        "cell run again?): dpfused makes the new private loader from its dataset and the "
        f"settings of the loader it was made from (batch_size={batch_size}{kept}, "
        f"shuffle={private.sampling != 'cyclic'}, drop_last={bool(private.drop_last)}, its "
        "collate_fn and worker options), not by wrapping it again. The earlier private loader "
        "keeps its own state; pass the original DataLoader to silence this warning",
        UserWarning, stacklevel=4)
    return original, sample_rate


def _loader_over_all_processes(loader: DataLoader) -> DataLoader:
    """Opacus' reading of a ``DistributedSampler`` loader: each of its ``num_replicas``
    processes takes ``batch_size`` examples per step, so a logical batch holds
    ``batch_size * num_replicas`` (Opacus' sample rate 1/len(loader) says the same). dpfused
    draws that batch once and gives every process its slice."""
    sampler = loader.sampler
    batch_size = loader.batch_size * sampler.num_replicas
    warnings.warn(
        f"data_loader samples with a DistributedSampler over {sampler.num_replicas} processes, "
        f"batch_size={loader.batch_size} each: as in Opacus, a logical batch holds "
        f"{batch_size} examples. dpfused draws it from the whole dataset (which every process "
        "must pass) and gives each process its slice, so the DistributedSampler is not used",
        UserWarning, stacklevel=4)
    return DataLoader(loader.dataset, batch_size=batch_size, shuffle=sampler.shuffle,
                      drop_last=loader.drop_last, collate_fn=loader.collate_fn,
                      **_worker_options_of(loader))


def _keep_sample_rate(native, sample_rate):
    """An unwrapped Poisson loader keeps its exact q, unless the call gives one."""
    if sample_rate is not None and native["sampling"] == "poisson" \
            and native.get("sample_rate") is None:
        native["sample_rate"] = sample_rate


def _native_arguments(kwargs, *, max_grad_norm, sampling, clipping, thresholds, adaptive_clipping):
    """dpfused's make_private keywords for Opacus' ones, and the parsed Opacus arguments."""
    opacus = _OpacusArgs.parse(
        {k: v for k, v in kwargs.items() if k in _OpacusArgs.KEYS},
        sampling=sampling, clipping=clipping, adaptive_clipping=adaptive_clipping,
        data_loader=kwargs["data_loader"])
    if opacus.mapped_adaptive:
        warnings.warn(
            "clipping='adaptive': noise_multiplier is the gradient's sigma in dpfused and the "
            "accountant records sigma_eff (1/sigma_eff^2 = 1/sigma^2 + 1/(4 "
            "unclipped_num_std^2)), so epsilon is higher than without adaptive clipping at the "
            "same sigma (Opacus lowers the gradient noise instead). Use "
            "make_private_with_epsilon to target an epsilon", stacklevel=3)
    native = {k: v for k, v in kwargs.items() if k not in _OpacusArgs.KEYS}
    max_grad_norm, thresholds, opacus.clipping = _split_max_grad_norm(
        max_grad_norm, thresholds, opacus.clipping, module=native["module"],
        optimizer=native["optimizer"])
    opacus.check_criterion(native.get("loss_reduction", "mean"))
    opacus.check_sharding(native["module"])
    if opacus.drop_last is not None:
        native.setdefault("drop_last", opacus.drop_last)
    native.update(max_grad_norm=max_grad_norm, thresholds=thresholds, clipping=opacus.clipping,
                  adaptive_clipping=opacus.adaptive_clipping,
                  sampling=opacus.sampling or "poisson")
    return native, opacus


class _OpacusArgs:
    """Opacus' make_private keywords, each mapped onto dpfused's or refused with the reason."""

    # Opacus' AdaClipDPOptimizer keywords (clipping="adaptive").
    ADAPTIVE_KEYS = ("target_unclipped_quantile", "clipbound_learning_rate", "max_clipbound",
                     "min_clipbound", "unclipped_num_std")
    KEYS = ("poisson_sampling", "grad_sample_mode", "secure_mode", "criterion", "wrap_model",
            "rand_on_empty", *ADAPTIVE_KEYS)
    # They only choose Opacus' implementation of per-sample gradients.
    GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch", "ew")
    # Opacus' FSDP2 modes: dpfused's own FSDP2 path (docs/design.md §9).
    FSDP_MODES = ("ghost_fsdp", "fsdp")

    def __init__(self):
        self.grad_sample_mode = "hooks"
        self.sampling = None
        self.drop_last = None  # the user's loader's, with poisson_sampling=False
        self.criterion = None
        self.return_criterion = False  # Opacus returns a criterion for grad_sample_mode="ghost"
        self.wrap_model = True
        self.clipping = "flat"
        self.adaptive_clipping = None
        self.mapped_adaptive = False  # Opacus' clipping="adaptive" keywords were given

    @classmethod
    def parse(cls, kwargs, *, sampling, clipping, adaptive_clipping=None, data_loader=None):
        args = cls()
        args.clipping, args.adaptive_clipping = clipping, adaptive_clipping
        kwargs = dict(kwargs)
        args.sampling, args.drop_last = cls.sampling_of({**kwargs, "sampling": sampling},
                                                        data_loader)
        kwargs.pop("poisson_sampling", None)
        args.grad_sample_mode = kwargs.pop("grad_sample_mode", "hooks")
        args.return_criterion = cls._grad_sample_mode(args.grad_sample_mode, clipping)
        if kwargs.pop("secure_mode", False):
            raise ValueError("secure_mode is a PrivacyEngine argument: "
                             "PrivacyEngine(secure_mode=True), then make_private without it")
        # rand_on_empty: Opacus' workaround for empty Poisson batches; dpfused steps an empty
        # batch with noise and no examples (exact), so either value is accepted.
        kwargs.pop("rand_on_empty", None)
        args.wrap_model = bool(kwargs.pop("wrap_model", True))
        if "criterion" in kwargs:
            args.criterion = kwargs.pop("criterion")
        args._parse_adaptive(kwargs)
        if kwargs:
            raise TypeError(f"make_private got unexpected keyword argument(s) {sorted(kwargs)}")
        return args

    @classmethod
    def _grad_sample_mode(cls, mode, clipping) -> bool:
        """Check Opacus' grad_sample_mode; True when Opacus would return a criterion."""
        if mode == "ghost_tp":
            raise ValueError(
                "grad_sample_mode='ghost_tp' (Opacus' tensor-parallel ghost clipping) is not "
                "supported by dpfused: its sharded parameters would hold a slice of each layer. "
                "Shard with FSDP2 instead (FSDP2Wrapper, grad_sample_mode='ghost_fsdp'), or train "
                "data parallel")
        if mode == "no_op":
            raise ValueError(
                "grad_sample_mode='no_op' is Opacus' mode for code that computes per-sample "
                "gradients itself (e.g. with torch.func) and sets p.grad_sample; dpfused computes "
                "and clips the per-example norms inside backward, so that code goes: call "
                "loss.backward() on the ordinary loss and use grad_sample_mode='hooks'")
        if mode not in cls.GRAD_SAMPLE_MODES + cls.FSDP_MODES:
            raise ValueError(
                f"grad_sample_mode={mode!r}: dpfused computes per-example norms inside backward "
                "for every clipping mode; Opacus' 'hooks', 'ghost', 'functorch', 'ew' (they only "
                "choose Opacus' implementation) and 'ghost_fsdp' / 'fsdp' (a model sharded by "
                "FSDP2Wrapper) are accepted; use clipping= to choose the clipping groups"
            )
        if mode.startswith("ghost") and clipping != "flat":
            raise ValueError(f"grad_sample_mode={mode!r} is flat clipping in Opacus; it "
                             f"contradicts clipping={clipping!r}")
        return mode.startswith("ghost")  # Opacus returns a criterion for its ghost modes

    def check_sharding(self, module) -> None:
        """Opacus' FSDP modes need a model that ``FSDP2Wrapper`` (fully_shard) sharded."""
        if self.grad_sample_mode in self.FSDP_MODES and not distributed.is_fsdp2(module):
            raise ValueError(
                f"grad_sample_mode={self.grad_sample_mode!r} needs a model sharded with FSDP2: "
                f"got an unsharded {type(module).__name__}. Shard it first (model = "
                "FSDP2Wrapper(model), from dpfused.opacus, after "
                "torch.distributed.init_process_group), or use grad_sample_mode='ghost' / "
                "'hooks' for an unsharded model")

    def returned(self, module, optimizer, loader):
        """make_private's return values, as Opacus gives them for these arguments."""
        if not self.wrap_model:
            module = GradSampleHooks(module)
        elif "_module" not in module.__dict__ and not hasattr(module, "_module"):
            # Code written for Opacus unwraps GradSampleModule as model._module: here the model
            # itself (kept out of _modules, so state_dict and named_modules are unchanged).
            module.__dict__["_module"] = module
        if self.return_criterion:
            criterion = self.criterion
            if criterion is None:  # Opacus' default criterion
                criterion = nn.CrossEntropyLoss(reduction=optimizer.instrumentation.book.loss_reduction)
            return module, optimizer, criterion, loader
        return module, optimizer, loader

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
    def sampling_of(kwargs, data_loader=None):
        """dpfused's sampling from ``sampling=`` or Opacus' ``poisson_sampling=`` (None: default),
        and the drop_last to keep (None: dpfused's default)."""
        sampling = kwargs.get("sampling")
        if "poisson_sampling" not in kwargs:
            return sampling, None
        if kwargs["poisson_sampling"]:
            mapped, drop_last = "poisson", None
        else:
            # Opacus keeps the user's loader and accounts it as Poisson, which understates epsilon
            # (docs/design.md §7); dpfused keeps its order and batch size and accounts it honestly.
            mapped, drop_last = _sampling_of_loader(data_loader)
        if sampling is not None and sampling != mapped:
            raise ValueError(f"poisson_sampling contradicts sampling={sampling!r}; give one")
        return mapped, drop_last

    def check_criterion(self, loss_reduction):
        if self.criterion is None:
            return
        reduction = getattr(self.criterion, "reduction", None)
        if reduction is not None and reduction != loss_reduction:
            raise ValueError(
                f"criterion has reduction={reduction!r} but loss_reduction={loss_reduction!r}; "
                "they must match, or per-example gradients are scaled wrongly"
            )


def _sampling_of_loader(data_loader):
    """("cyclic" | "shuffle", drop_last) for a user's loader kept as it is (poisson_sampling=False)."""
    sampler = getattr(data_loader, "sampler", None)
    drop_last = getattr(data_loader, "drop_last", None)
    if type(sampler) is SequentialSampler:
        return "cyclic", drop_last  # shuffle=False: one fixed order, the same every epoch
    if type(sampler) is RandomSampler:
        return "shuffle", drop_last  # shuffle=True: a fresh permutation every epoch
    # A custom sampler cannot be accounted: it is replaced by shuffling (make_private warns).
    return "shuffle", drop_last


def _map_accountant(name):
    if name == "prv":
        warnings.warn("accountant='prv' (Opacus) maps to dpfused's 'pld' (dp_accounting's "
                      "privacy-loss-distribution accountant): both compose numerically and tightly",
                      stacklevel=3)
        return "pld"
    if name == "gdp":
        raise ValueError(GDP_REFUSAL)
    check_choice("accountant", name, accounting.MECHANISMS)
    return name


def _split_max_grad_norm(max_grad_norm, thresholds, clipping, *, module, optimizer):
    """(max_grad_norm, thresholds, clipping) for dpfused from Opacus' max_grad_norm.

    Opacus' per-layer clipping takes a list with one threshold per trainable parameter, in the
    optimizer's order: that is dpfused's ``per_parameter`` clipping (a group per parameter tensor,
    sensitivity sqrt(sum C_p^2)). A list with one value per dpfused ``per_layer`` group (or device
    for ``per_device``) keeps dpfused's meaning.
    """
    if isinstance(max_grad_norm, (list, tuple)):
        if clipping not in ("per_layer", "per_parameter", "per_device"):
            raise ValueError(f"max_grad_norm is a list but clipping={clipping!r}; a list of "
                             "thresholds needs clipping='per_layer' (one per parameter, as in "
                             "Opacus) or 'per_device'")
        if thresholds is not None:
            raise ValueError("give group thresholds either as max_grad_norm=[...] or thresholds=, not both")
        values = [float(v) for v in max_grad_norm]
        total = privacy_math.sensitivity(values)
        if clipping in ("per_layer", "per_parameter"):
            per_parameter = _per_parameter_thresholds(values, module, optimizer, clipping)
            if per_parameter is not None:
                return total, per_parameter, "per_parameter"
        return total, values, clipping
    check_thresholds_total(thresholds, max_grad_norm)
    return max_grad_norm, thresholds, clipping


def _per_parameter_thresholds(values, module, optimizer, clipping):
    """{parameter group name: C_p} when ``values`` has one threshold per trainable parameter of
    the optimizer (Opacus' order); None when it has one per dpfused per_layer group instead.

    Raises:
        ValueError: neither count (naming both), or optimizer parameters the model does not clip.
    """
    _, groups = plan(module, clipping="per_parameter", max_grad_norm=1.0)
    name_of = {id(g.params[0]): g.name for g in groups}
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if len(values) == len(params) and all(id(p) in name_of for p in params):
        if len(params) != len(groups):
            raise ValueError(
                f"max_grad_norm has one threshold per optimizer parameter ({len(params)}) but the "
                f"model has {len(groups)} trainable parameters; every trainable parameter needs a "
                "threshold: build the optimizer from model.parameters() or freeze the others "
                "(requires_grad=False)")
        return {name_of[id(p)]: v for p, v in zip(params, values)}
    if clipping == "per_layer":
        _, layer_groups = plan(module, clipping="per_layer", max_grad_norm=1.0)
        if len(values) == len(layer_groups):
            return None
        raise ValueError(
            f"thresholds: got {len(values)} values for {len(layer_groups)} clipping groups "
            f"(layers) and {len(params)} trainable parameters: Opacus' per-layer clipping takes "
            f"one max_grad_norm per parameter, in the optimizer's order ({[g.name for g in groups]})")
    raise ValueError(
        f"thresholds: got {len(values)} values for {len(groups)} clipping groups: "
        f"clipping='per_parameter' takes one per parameter ({[g.name for g in groups]})")
