"""PrivacyEngine: make an existing PyTorch training loop differentially private.

    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
        data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    ... the user's loop, unchanged ...
    engine.get_epsilon(delta=1e-5)

Opacus' keyword arguments and return values live in ``dpfused.opacus`` (change the import:
``from dpfused.opacus import PrivacyEngine``); this engine has dpfused's own, typed interface.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping

import torch
import torch.nn as nn

from dpfused import accounting, checkpoints, distributed, hf_accelerate, privacy_math
from dpfused import sampling as dp_sampling
from dpfused.adaptive import AdaptiveClipping
from dpfused.arguments import (check_calibration, check_choice, check_make_private,
                               check_module_and_optimizer)
from dpfused.bandmf import BandMF, check_bands_fit
from dpfused.instrument import detach, instrument, plan
from dpfused.optimizer import DPOptimizer
from dpfused.secure_random import ChaCha20Generator
from dpfused.step import partition_sample_rate

__all__ = ["DeferredPrivacy", "PrivacyEngine"]

_STATE_FORMAT = 2  # 2: plain data, the noise stream and ledger_start saved (docs/design.md §7.6)


class PrivacyEngine:
    """Makes modules, optimizers and data loaders private and accounts for the privacy spent.

    Args:
        accountant: "pld" (default; dp_accounting's privacy-loss-distribution accountant) or "rdp".
        neighboring: None (default: the adjacency each sampling's proof covers, add/remove for
            Poisson, zero-out for cyclic/shuffle; docs/design.md §7), "zero_out", "replace_one"
            (sensitivity 2C), or "add_remove" (Poisson sampling only).
        secure_mode: draw the noise and the batches from a cryptographically secure generator
            (ChaCha20 keyed from the operating system, Gaussian samples hardened against the
            floating-point attack; ``dpfused.secure_random``) instead of torch's Mersenne Twister.
    """

    def __init__(self, *, accountant: str = "pld", neighboring: str | None = None,
                 secure_mode: bool = False):
        check_choice("accountant", accountant, accounting.MECHANISMS)
        if neighboring is not None:
            check_choice("neighboring", neighboring, accounting.NEIGHBORINGS)
        self.secure_mode = bool(secure_mode)
        self.accountant = accounting.PrivacyAccountant(mechanism=accountant, neighboring=neighboring)
        self.accountant_name = accountant
        self.neighboring = neighboring
        self.optimizer: DPOptimizer | None = None
        self.data_loader = None
        self.module: nn.Module | None = None
        self._ledger_start = 0  # ledger entries recorded before the last make_private
        self._noise_layout = "one"  # checkpoints.NOISE_LAYOUTS

    # ---- make_private ---------------------------------------------------------------------------
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: torch.utils.data.DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        clipping: str = "flat",
        loss_reduction: str = "mean",
        sampling: str = "poisson",
        sample_rate: float | None = None,
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
        nonfinite_gradients: str = "raise",
        noise: BandMF | None = None,
        max_batch_size: int | None = None,
        clipping_function: str = "standard",
        stability: float = privacy_math.DEFAULT_STABILITY,
    ) -> tuple[nn.Module, DPOptimizer, dp_sampling.DPDataLoader]:
        """Instrument ``module`` in place and wrap ``optimizer`` and ``data_loader``.

        Args:
            module: the model, in train mode, or a ``DistributedDataParallel`` wrapping it, or
                sharded with FSDP2's ``fully_shard`` (also as ``accelerator.prepare`` returns
                them; docs/design.md §9). The same object is returned, instrumented in place.
            optimizer: any torch.optim optimizer over the module's parameters (accelerate's
                ``AcceleratedOptimizer`` is unwrapped: the DP optimizer steps the one inside).
            data_loader: a DataLoader over a map-style dataset; rebuilt with a DP batch sampler.
                Not one prepared by accelerate: dpfused splits each logical batch over the ranks.
            noise_multiplier: sigma >= 0 (noise std is sigma * C).
            max_grad_norm: C, the total clipping norm (sqrt(sum_g C_g^2) for group-wise clipping).
            clipping: "flat" (one group; book-keeping), "per_layer" (a group per layer; fast path)
                or "per_device" (a group per device).
            loss_reduction: "mean" or "sum": how the loss you backpropagate reduces over examples.
            sampling: "poisson" (default), "cyclic", "shuffle" or "cyclic_poisson" (b-min-sep
                Poisson with b = ``noise.bands`` partitions, for BandMF; docs/design.md §6).
            sample_rate: Poisson (and cyclic Poisson) q, fixed independently of the data
                (default: the loader's batch_size / len(dataset), which treats the dataset size
                as public).
            thresholds: per_layer/per_device group thresholds, a dict {group: C_g} or a list
                (with ``adaptive_clipping``, the starting values).
            adaptive_clipping: an ``AdaptiveClipping``: thresholds follow a quantile of the
                per-example norms, from noisy counts released with each step; ``noise_multiplier``
                stays the gradient's sigma and the accountant records sigma_eff < sigma.
            batch_first: False when the model's inputs are (T, B, ...).
            max_physical_batch_size: split logical batches into physical ones of at most this size.
            shuffle_once: cyclic sampling: draw one seeded order before training.
            drop_last: cyclic/shuffle: drop the last partial batch of an epoch.
            noise_generator, sampling_generator: torch.Generators for the noise and the sampler.
            max_epsilon, delta: a budget; a step that would exceed it raises PrivacyBudgetExhausted.
            nonfinite_gradients: what a NaN/inf per-example gradient norm does (docs/design.md §4).
                "raise" (default): the backward raises a ValueError naming the group and the
                examples, and nothing of that backward pass is kept. "drop": that example's
                contribution is 0 in every clipping group (decided from its own gradient alone, so
                the guarantee is unchanged); it still counts in the expected batch size, counts as
                clipped for adaptive clipping, and ``optimizer.examples_dropped`` counts it (a
                RuntimeWarning says so; the count is not private). "drop" turns off the per_layer
                fast path: every group completes at the end of backward.
            noise: None (default: independent Gaussian noise, DP-SGD) or a ``dpfused.BandMF``:
                noise correlated over ``bands`` steps (docs/design.md §5.1). More than one band
                needs sampling="cyclic_poisson" (or "cyclic" with at least ``bands`` batches per
                epoch), so that an example's steps are at least ``bands`` apart; adaptive
                thresholds are refused with it.
            max_batch_size: truncated Poisson sampling: a Poisson draw of more than K examples
                is cut to a random subset of K; accounted exactly (PLD accountant only); a mean
                loss is divided by E[min(Binomial(N, q), K)] (docs/design.md §5, §6).
            clipping_function: "standard" (min(1, C / ||g||), default) or "automatic" (AUTO-S, Bu
                et al. 2023: every example scaled by C / (||g|| + stability); sensitivity C, the
                accounting unchanged; refused with adaptive thresholds). The update is then
                lr * sum_i C g_i / (||g_i|| + gamma) / B_norm: each example's direction at length
                about C, the gradient's own scale no longer reaches the step. Examples above C are
                scaled as standard clipping scales them, so start from the same lr; small
                gradients grow up to C / gamma times (docs/design.md §4).
            stability: gamma of automatic clipping (default 0.01, the paper's), > 0.

        Returns:
            ``(module, optimizer, data_loader)``.

        Raises:
            ValueError / TypeError: a bad argument or a module that cannot be made private, before
                anything is changed.
        """
        # Every argument, by name (nothing else is bound yet), for the checks of arguments.py.
        settings = {name: value for name, value in locals().items() if name != "self"}
        deferred = self._private_data_loader(settings, sharded=None)
        return deferred.complete(module=module, optimizer=optimizer)

    def make_private_deferred(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: torch.utils.data.DataLoader,
        sharded: bool,
        noise_multiplier: float,
        max_grad_norm: float,
        **kwargs,
    ) -> DeferredPrivacy:
        """``make_private`` in two stages: the private data loader now, the module and optimizer
        once they are sharded (``DeferredPrivacy.complete``). For frameworks that need the data
        loader before they shard the model, as HuggingFace's Trainer under accelerate's FSDP
        plugin does (``dpfused.hf.DPTrainer``; docs/design.md §9)::

            deferred = engine.make_private_deferred(module=model, optimizer=optimizer,
                data_loader=loader, sharded=True, noise_multiplier=1.0, max_grad_norm=1.0)
            len(deferred.data_loader)                        # the loader exists, draws nothing yet
            model, optimizer = accelerator.prepare(model, optimizer)   # fully_shard, in place
            model, optimizer, loader = deferred.complete(module=model, optimizer=optimizer)

        Every argument check of ``make_private`` runs now, on the module and optimizer as they are
        (unsharded), and so do the cross-rank data check and the sampler's seed agreement; the
        returned loader is the one ``make_private`` would return. Iterating it before ``complete``
        raises (a batch drawn for an uninstrumented model would be trained on without clipping).

        Args:
            module, optimizer: the model and its optimizer, before sharding; ``complete`` must
                get these very objects (sharded in place by ``fully_shard`` or
                ``accelerator.prepare``; accelerate's optimizer wrapper and a DDP wrapper are
                fine).
            data_loader: as for ``make_private``.
            sharded: True when the module will be sharded with FSDP2 before ``complete``: every
                rank then runs the same number of physical batches per logical batch (FSDP's
                collectives need it; docs/design.md §9, lockstep). False for a module that stays
                unsharded (plain, or wrapped in DDP later).
            noise_multiplier, max_grad_norm, **kwargs: every other ``make_private`` keyword.

        Returns:
            A ``DeferredPrivacy``: its ``data_loader`` now, ``complete(module=, optimizer=)``
            later.

        Raises:
            ValueError / TypeError: what ``make_private`` refuses, before anything is changed.
        """
        if not isinstance(sharded, bool):
            raise TypeError(f"sharded must be True or False, got {sharded!r}")
        bound = inspect.signature(PrivacyEngine.make_private).bind(
            self, module=module, optimizer=optimizer, data_loader=data_loader,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            **kwargs)  # TypeError for an unknown keyword
        bound.apply_defaults()
        settings = {name: value for name, value in bound.arguments.items() if name != "self"}
        return self._private_data_loader(settings, sharded=sharded)

    def make_private_deferred_with_epsilon(self, *, module, optimizer, data_loader,
                                           target_epsilon: float, target_delta: float,
                                           sharded: bool, epochs: int | None = None,
                                           steps: int | None = None,
                                           last_iterate: dict | None = None,
                                           **kwargs) -> DeferredPrivacy:
        """``make_private_deferred`` with sigma calibrated as ``make_private_with_epsilon``
        calibrates it (same arguments, same guarantee)."""
        sigma = self._sigma_for_epsilon(
            module=module, optimizer=optimizer, data_loader=data_loader,
            target_epsilon=target_epsilon, target_delta=target_delta, epochs=epochs, steps=steps,
            last_iterate=last_iterate, kwargs=kwargs)
        return self.make_private_deferred(module=module, optimizer=optimizer,
                                          data_loader=data_loader, sharded=sharded,
                                          noise_multiplier=sigma, **kwargs)

    def _private_data_loader(self, settings: dict, *, sharded: bool | None) -> DeferredPrivacy:
        """Stage one of make_private: every check of ``settings`` (make_private's arguments by
        name), then the private data loader (``sharded`` None: lockstep if the module is sharded
        already)."""
        s = settings
        optimizer = hf_accelerate.unwrap_optimizer(s["optimizer"])  # accelerate's wrapper, if any
        wrapper, module = s["module"], distributed.unwrap(s["module"])
        check_make_private({**s, "module": module, "optimizer": optimizer},
                           accountant=self.accountant_name, neighboring=self.neighboring)
        if wrapper is not module:
            distributed.check_ddp(wrapper)
        distributed.check_sharding(module, clipping=s["clipping"])
        lockstep = distributed.is_fsdp2(module) if sharded is None else sharded
        noise_generator, sampling_generator = self._generators(s["noise_generator"],
                                                               s["sampling_generator"])
        rank, world_size = _data_parallel_world()
        if world_size > 1:
            distributed.drain_torch_threads_at_exit()  # a torch bug at exit (§9)
            distributed.check_same_data(
                s["data_loader"], sampling=s["sampling"], sample_rate=s["sample_rate"],
                drop_last=s["drop_last"], shuffle_once=s["shuffle_once"], clipping=s["clipping"],
                loss_reduction=s["loss_reduction"])
            sampling_generator = distributed.replicated_generator(sampling_generator,
                                                                  torch.device("cpu"))
        loader = dp_sampling.make_private_data_loader(
            s["data_loader"], sampling=s["sampling"], sample_rate=s["sample_rate"],
            shuffle_once=s["shuffle_once"], max_physical_batch_size=s["max_physical_batch_size"],
            drop_last=s["drop_last"], generator=sampling_generator, secure_mode=self.secure_mode,
            rank=rank, world_size=world_size, lockstep=lockstep,
            partitions=s["noise"].bands if s["sampling"] == "cyclic_poisson" else None,
            max_batch_size=s["max_batch_size"])
        return DeferredPrivacy(engine=self, module=wrapper, optimizer=optimizer, loader=loader,
                               settings={**s, "noise_generator": noise_generator},
                               lockstep=lockstep, world_size=world_size,
                               guarded=sharded is not None)

    def _instrument(self, wrapper: nn.Module, optimizer, loader,
                    settings: dict) -> tuple[nn.Module, DPOptimizer, dp_sampling.DPDataLoader]:
        """Stage two of make_private: instrument the (wrapped or sharded) module, connect the
        loader and the reduction, wrap the optimizer (all checked in stage one or by
        ``DeferredPrivacy.complete``)."""
        s = settings
        module = distributed.unwrap(wrapper)
        sharded = distributed.is_fsdp2(module)
        _, world_size = _data_parallel_world()
        if world_size > 1:
            _broadcast_parameters(module, buffers_only=sharded)
        inst = instrument(module, clipping=s["clipping"], max_grad_norm=s["max_grad_norm"],
                          thresholds=s["thresholds"], loss_reduction=s["loss_reduction"],
                          batch_first=s["batch_first"],
                          count_unclipped=s["adaptive_clipping"] is not None,
                          nonfinite=s["nonfinite_gradients"],
                          clipping_function=s["clipping_function"], stability=s["stability"])
        loader.add_listener(inst.book.begin)  # the one way a logical batch reaches the book
        reduction, self._noise_layout = None, "one"
        noise_generator = s["noise_generator"]
        if noise_generator is None:  # never torch's global RNG: a resume could replay it (§7.6)
            noise_generator = _os_seeded_noise_generator(inst.params, several=world_size == 1
                                                         and wrapper is module and not sharded)
        if wrapper is not module:  # DDP: its all-reduce carries the clipped sums (§9)
            reduction = distributed.DDPReduction(wrapper, inst.book)
            loader.add_listener(reduction.begin)
            noise_generator = distributed.replicated_generator(
                noise_generator, next(iter(inst.params)).device)
            self._noise_layout = "replicated"
        elif sharded:  # FSDP2: each rank noises the shard it owns (§9)
            reduction = distributed.FSDP2Reduction(module, inst.book)
            loader.add_listener(reduction.begin)
            noise_generator = distributed.per_rank_generator(
                noise_generator, next(iter(inst.params)).to_local().device)
            self._noise_layout = "per_rank"
        elif world_size > 1:  # a plain module: one all-reduce at the release (§9)
            reduction = distributed.ProcessGroupReduction(inst.book)
            noise_generator = distributed.replicated_generator(
                noise_generator, next(iter(inst.params)).device)
            self._noise_layout = "replicated"
        dp_optimizer = DPOptimizer(
            optimizer, instrumentation=inst, noise_multiplier=s["noise_multiplier"],
            accountant=self.accountant, generator=noise_generator, max_epsilon=s["max_epsilon"],
            delta=s["delta"], adaptive_clipping=s["adaptive_clipping"], reduction=reduction,
            expected_batch_size=_expected_batch_size_per_process(loader, world_size),
            noise=s["noise"],
        )
        # A second make_private on this engine: the new loader counts its epochs from 0 again,
        # and they are new epochs (docs/design.md §7.2).
        self.accountant.begin_phase()
        self.module, self.optimizer, self.data_loader = wrapper, dp_optimizer, loader
        self._ledger_start = self.accountant.steps  # entries of earlier make_private calls
        return wrapper, dp_optimizer, loader

    def _generators(self, noise_generator, sampling_generator):
        """(noise, sampling) generators: the user's, or fresh secure ones in secure mode."""
        if not self.secure_mode:
            return noise_generator, sampling_generator
        if noise_generator is not None or sampling_generator is not None:
            raise ValueError(
                "secure_mode=True draws the noise and the batches from ChaCha20 generators keyed "
                "from the operating system; drop noise_generator / sampling_generator (a seeded "
                "generator is predictable), or use secure_mode=False for repeatable runs")
        return ChaCha20Generator(), ChaCha20Generator()

    def make_private_with_epsilon(self, *, module, optimizer, data_loader, target_epsilon: float,
                                  target_delta: float, epochs: int | None = None,
                                  steps: int | None = None, last_iterate: dict | None = None,
                                  **kwargs):
        """make_private with sigma calibrated so that ``epochs`` of training spend ``target_epsilon``.

        The calibration uses the same accountant, sampling and public sizes as training and returns
        the conservative side (epsilon(sigma) <= target_epsilon). It warns (UserWarning) when
        ``target_delta`` >= 1/N, N the dataset size: such a target allows releasing an example in
        the clear. The target covers the run being made private, not steps already in this
        engine's ledger (``get_epsilon`` reports the whole ledger).

        Args:
            last_iterate: calibrate the last-iterate bound instead of the composed one (cyclic
                sampling, plain SGD at a constant learning rate): a dict with ``smoothness`` (L),
                and optionally ``convex``. The learning rate and every parameter group's weight
                decay are read from the optimizer (a ``weight_decay`` key must agree with them),
                the loss reduction from ``loss_reduction``; C and sigma are taken as constant
                (schedulers change the bound; ``privacy_report`` then reports the run's own).
            **kwargs: everything else make_private takes, except noise_multiplier. With
                ``adaptive_clipping`` the calibrated sigma is sigma_eff of gradient and counts
                together; the gradient's sigma is solved from it.

        Returns:
            ``(module, optimizer, data_loader)``, as make_private.
        """
        sigma = self._sigma_for_epsilon(
            module=module, optimizer=optimizer, data_loader=data_loader,
            target_epsilon=target_epsilon, target_delta=target_delta, epochs=epochs, steps=steps,
            last_iterate=last_iterate, kwargs=kwargs)
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, **kwargs)

    def _sigma_for_epsilon(self, *, module, optimizer, data_loader, target_epsilon, target_delta,
                           epochs, steps, last_iterate, kwargs) -> float:
        """make_private_with_epsilon's checks (before the slow calibration) and its sigma."""
        if "noise_multiplier" in kwargs:
            raise ValueError("make_private_with_epsilon sets noise_multiplier itself; remove it")
        check_calibration(target_epsilon=target_epsilon, target_delta=target_delta, epochs=epochs,
                          steps=steps, last_iterate=last_iterate)
        self._check_before_calibration(module, optimizer, data_loader, kwargs)
        return self._calibrated_sigma(
            module=module, optimizer=optimizer, data_loader=data_loader,
            target_epsilon=target_epsilon, target_delta=target_delta, epochs=epochs, steps=steps,
            last_iterate=last_iterate, kwargs=kwargs)

    def _check_before_calibration(self, module, optimizer, data_loader, kwargs):
        """make_private's argument checks, before the (slow) calibration rather than after it."""
        # dpfused's own signature, also when a subclass (dpfused.opacus) has mapped its keywords.
        bound = inspect.signature(PrivacyEngine.make_private).bind(
            self, module=module, optimizer=optimizer, data_loader=data_loader,
            noise_multiplier=0.0, **kwargs)  # TypeError for an unknown or missing keyword
        bound.apply_defaults()
        settings = {name: value for name, value in bound.arguments.items() if name != "self"}
        check_make_private({**settings, "module": distributed.unwrap(module),
                            "optimizer": hf_accelerate.unwrap_optimizer(optimizer)},
                           accountant=self.accountant_name, neighboring=self.neighboring)

    def _calibrated_sigma(self, *, module, optimizer, data_loader, target_epsilon, target_delta,
                          epochs, steps, last_iterate, kwargs) -> float:
        """The gradient's sigma for make_private_with_epsilon (see there)."""
        sampling = kwargs.get("sampling", "poisson")
        adaptive = kwargs.get("adaptive_clipping")
        noise = kwargs.get("noise")
        batch_size = data_loader.batch_size
        if batch_size is None:
            raise ValueError("data_loader must have a batch_size (the expected logical batch size)")
        if last_iterate is not None and adaptive is not None:
            raise ValueError("last_iterate calibration needs fixed clipping thresholds; drop "
                             "adaptive_clipping or last_iterate")
        if last_iterate is not None:
            last_iterate = _last_iterate_plan(last_iterate, hf_accelerate.unwrap_optimizer(optimizer),
                                              kwargs.get("loss_reduction", "mean"))
        if noise is not None:
            check_bands_fit(noise.bands, _planned_steps(
                data_loader, sampling=sampling, sample_rate=kwargs.get("sample_rate"),
                drop_last=kwargs.get("drop_last", True), partitions=noise.bands, epochs=epochs,
                steps=steps))
        sigma = accounting.calibrate_noise_multiplier(
            target_epsilon=target_epsilon, delta=target_delta, sampling=sampling,
            sample_rate=kwargs.get("sample_rate") if sampling in ("poisson", "cyclic_poisson")
            else None,
            num_samples=len(data_loader.dataset), batch_size=batch_size, epochs=epochs,
            steps=steps, mechanism=self.accountant_name, neighboring=self.neighboring,
            last_iterate=last_iterate, drop_last=kwargs.get("drop_last", True),
            partitions=noise.bands if sampling == "cyclic_poisson" else None,
            max_batch_size=kwargs.get("max_batch_size"),
        )
        if noise is not None:  # the accountant records sigma / max column norm (§7.2)
            sigma = sigma * noise.max_column_norm
        if adaptive is None:
            return sigma
        # The count query's cost grows with the number of groups K; thresholds do not matter.
        _, groups = plan(module, clipping=kwargs.get("clipping", "flat"), max_grad_norm=1.0)
        return privacy_math.gradient_noise_multiplier(sigma, adaptive.count_noise_std, len(groups))

    # ---- accounting -----------------------------------------------------------------------------
    def get_epsilon(self, delta: float) -> float:
        """Composed epsilon (every iterate released) for the steps taken so far (Opacus-compatible).

        Warns (UserWarning) when delta >= 1/N, N the private data loader's dataset size: such a
        guarantee allows releasing an example in the clear.
        """
        epsilon = self.accountant.get_epsilon(delta)  # checks delta first
        accounting.warn_if_delta_not_small(delta, self._num_samples())
        return epsilon

    def privacy_report(self, delta: float, *, smoothness: float | None = None,
                       convex: bool = False) -> accounting.PrivacyReport:
        """Composed and (where its assumptions hold) last-iterate epsilon, with the assumptions.

        Warns (UserWarning) when delta >= 1/N, as :meth:`get_epsilon`.
        """
        report = accounting.privacy_report(self.accountant, delta, smoothness=smoothness,
                                           convex=convex)
        accounting.warn_if_delta_not_small(delta, self._num_samples())
        return report

    def _num_samples(self) -> int | None:
        """N of the private data loader (the latest make_private's), None before make_private."""
        return None if self.data_loader is None else self.data_loader.num_samples

    # ---- checkpoints (docs/design.md §7.6) --------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resume needs, as plain data (tensors, numbers, strings, lists, dicts).

        The accountant's ledger, the sampler's position and generator state, the steps taken, sigma,
        the clipping thresholds and the noise generator's state (never a secure-mode key), so that
        a resumed run draws the batches and noise the uninterrupted run would have drawn, and none
        it already released. SECRET as the data: the sampler and noise states let whoever holds
        them replay training on a candidate data set. Never publish it with the model.
        """
        state = {"format": _STATE_FORMAT, "secure_mode": self.secure_mode,
                 "accountant": self.accountant.state_dict()}
        if self.data_loader is not None:
            state["data_loader"] = self.data_loader.state_dict()
        if self.optimizer is not None:
            rank, world_size = _data_parallel_world()
            state["steps_taken"] = self.optimizer.steps_taken
            state["ledger_start"] = self._ledger_start
            state["noise_multiplier"] = self.optimizer.noise_multiplier  # schedulers change it
            # Adaptive thresholds move: resume from where they were.
            state["thresholds"] = [g.threshold for g in self.optimizer.instrumentation.groups]
            state["noise"] = checkpoints.noise_state(self.optimizer.generator,
                                                     layout=self._noise_layout, rank=rank,
                                                     world_size=world_size)
            history = self.optimizer.noise_history
            if history is not None and state["noise"]["kind"] == "torch":
                # BandMF's last bands - 1 noises go with the stream they came from (per rank in a
                # distributed checkpoint), and only where the stream itself is saved: a secure
                # run's history is as secret as its key (docs/design.md §5.1, §9).
                state["noise"]["history"] = history.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s state, after ``make_private`` with the saved run's settings.

        Checked before anything changes: the ledger must agree with the steps taken and the
        sampler's position (``dpfused.checkpoints.check_ledger``), the secure mode and the number
        of clipping groups with this run's. The noise stream continues where it was; where it
        cannot (secure mode, another rank's stream, an older checkpoint), the generator gets a
        fresh seed from the operating system and a UserWarning says so.

        Raises:
            ValueError: a state that disagrees with itself or with this run, naming what; nothing
                was changed.
        """
        self._check_state(state)
        checked = accounting.PrivacyAccountant(mechanism=self.accountant_name,
                                               neighboring=self.neighboring)
        checked.load_state_dict(state["accountant"])  # raises before self.accountant changes
        if "data_loader" in state:
            self.data_loader.load_state_dict(state["data_loader"])
        self.accountant.load_state_dict(state["accountant"])
        if self.optimizer is None:
            return
        self._ledger_start = int(state.get("ledger_start", 0))
        if "steps_taken" in state:
            self.optimizer.steps_taken = state["steps_taken"]
        if "noise_multiplier" in state:
            _warn_if_restored_sigma_differs(state["noise_multiplier"],
                                            self.optimizer.noise_multiplier)
            self.optimizer.noise_multiplier = state["noise_multiplier"]
        if "thresholds" in state:
            self.optimizer.instrumentation.book.set_thresholds(state["thresholds"])
        self._restore_noise(state.get("noise"))

    def _check_state(self, state) -> None:
        """What load_state_dict refuses, before it changes anything."""
        if not isinstance(state, Mapping) or not isinstance(state.get("accountant"), Mapping):
            raise ValueError("load_state_dict expects the dict PrivacyEngine.state_dict() returned "
                             f"(with an 'accountant' dict); got {type(state).__name__}")
        if state.get("secure_mode", self.secure_mode) != self.secure_mode:
            raise ValueError(
                f"load_state_dict: the saved run used secure_mode={state['secure_mode']}, this "
                f"engine secure_mode={self.secure_mode}; resume with the saved run's secure_mode")
        if "data_loader" in state and self.data_loader is None:
            raise ValueError("call make_private before load_state_dict: the saved state has a "
                             "data loader position to restore")
        if self.optimizer is None or "steps_taken" not in state:
            return
        groups = self.optimizer.instrumentation.groups
        if "thresholds" in state and len(state["thresholds"]) != len(groups):
            raise ValueError(
                f"load_state_dict: the saved state has {len(state['thresholds'])} clipping "
                f"thresholds but this model has {len(groups)} clipping groups; make_private "
                "with the same model and clipping= as the saved run")
        if "data_loader" not in state:
            raise ValueError("load_state_dict: the saved state has steps but no data loader "
                             "position; save it with PrivacyEngine.state_dict()")
        loader = self.data_loader
        checkpoints.check_ledger(
            entries=state["accountant"].get("entries"), ledger_start=int(state.get("ledger_start", 0)),
            steps_taken=int(state["steps_taken"]), loader_state=state["data_loader"],
            sampling=loader.sampling, batches_per_epoch=loader.batches_per_epoch,
            sample_rate=_event_rate(loader), batch_size=loader.batch_size)
        self._check_noise_history(state.get("noise"))

    def _check_noise_history(self, noise) -> None:
        """A saved BandMF history must fit this run's strategy and parameters (checked before
        anything changes); a history with no BandMF here is refused too."""
        if not isinstance(noise, Mapping) or noise.get("history") is None:
            return
        history = self.optimizer.noise_history
        if history is None:
            raise ValueError(
                "load_state_dict: the saved run used BandMF correlated noise (its state holds a "
                "noise history) and this one does not; make_private with the saved run's "
                "noise=BandMF(...)")
        history.check_state(noise["history"], shapes=self._noise_shapes())

    def _noise_shapes(self) -> dict[int, torch.Size]:
        """Shape of the noise of every private parameter, by its place in the optimizer's order
        (this rank's shard under FSDP2)."""
        optimizer = self.optimizer
        shape = (optimizer.reduction.local_shape if optimizer.reduction is not None
                 else (lambda p: p.shape))
        return {i: torch.Size(shape(p)) for i, p in enumerate(optimizer.instrumentation.params)}

    def _restore_noise(self, saved) -> None:
        rank, world_size = _data_parallel_world()
        reason = checkpoints.restore_noise(self.optimizer.generator, saved,
                                           layout=self._noise_layout, rank=rank,
                                           world_size=world_size)
        self._restore_noise_history(saved, restored=reason is None)
        if reason is None:
            return
        fresh = ("the resumed run draws fresh noise from a generator seeded by the operating "
                 "system, so it never repeats noise already released"
                 if self.optimizer.generator is not None else
                 "re-seeding torch's global generator with a seed it had before replays noise")
        warnings.warn(f"the noise stream was not restored ({reason}): {fresh}", UserWarning,
                      stacklevel=3)

    def _restore_noise_history(self, saved, *, restored: bool) -> None:
        """BandMF: the history goes back only with the stream it came from, and only when the
        next release is the loader's next batch; else the correlation restarts (still private:
        a restarted strategy is block diagonal, docs/design.md §5.1)."""
        history = self.optimizer.noise_history
        if history is None:
            return
        saved_history = saved.get("history") if isinstance(saved, Mapping) else None
        if (restored and saved_history is not None
                and saved_history["next_step"] in (None, self.data_loader.step)):
            params = self.optimizer.instrumentation.params
            history.load_state_dict(saved_history, shapes=self._noise_shapes(),
                                    devices=dict(enumerate(_noise_device(p) for p in params)))
            return
        history.restart()
        if self.optimizer.steps_taken:
            warnings.warn(
                "the BandMF noise history was not restored (the noise stream was not, e.g. in "
                "secure mode; the checkpoint holds none; or it was saved between a batch's draw "
                "and its step): "
                "the correlated noise restarts here; the guarantee is unchanged, the noise of the "
                "next bands - 1 steps cancels less", UserWarning, stacklevel=4)

    def save_checkpoint(self, *, path, module: nn.Module, optimizer=None,
                        checkpoint_dict: dict | None = None, noise_scheduler=None,
                        grad_clip_scheduler=None) -> None:
        """Opacus' save_checkpoint: module, optimizer, schedulers and this engine's state in one file.

        The engine's state is ``state_dict()`` (ledger, sampler position, noise stream, thresholds,
        sigma), so ``load_checkpoint`` resumes with the same batches, noise and epsilon: the file
        is SECRET as the data (docs/design.md §7.6). Schedulers (``dpfused.opacus.schedulers``)
        are saved under Opacus' keys, as their parameters. Everything is plain data, which
        ``load_checkpoint`` reads without running code.

        Raises:
            TypeError: ``checkpoint_dict`` (or a scheduler's state) holds something other than
                plain data; nothing was written.
        """
        checkpoint = dict(checkpoint_dict or {})
        checkpoints.check_plain(checkpoint, "checkpoint_dict")
        checkpoint["module_state_dict"] = module.state_dict()
        checkpoint["privacy_engine_state_dict"] = self.state_dict()
        if optimizer is not None:
            checkpoint["optimizer_state_dict"] = optimizer.state_dict()
        checkpoint.update(_scheduler_states(noise_scheduler, grad_clip_scheduler))
        checkpoints.check_plain(checkpoint, "the checkpoint")
        torch.save(checkpoint, path)

    def load_checkpoint(self, *, path, module: nn.Module, optimizer=None, noise_scheduler=None,
                        grad_clip_scheduler=None) -> dict:
        """Restore what ``save_checkpoint`` wrote, after ``make_private``; returns the whole dict.

        Read with ``torch.load(weights_only=True)``: a file that names code to run is refused.

        Raises:
            ValueError: a file that is not plain data; a ledger that disagrees with the saved run
                (``load_state_dict``); a scheduler is passed but the checkpoint holds no state
                for it.
        """
        checkpoint = checkpoints.load_plain(path, what="load_checkpoint")
        self.load_state_dict(checkpoint["privacy_engine_state_dict"])
        module.load_state_dict(checkpoint["module_state_dict"])
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        _load_scheduler_states(checkpoint, noise_scheduler, grad_clip_scheduler)
        return checkpoint

    def save_distributed_checkpoint(self, *, path, module: nn.Module, optimizer=None) -> None:
        """A sharded checkpoint (torch.distributed.checkpoint) of an FSDP2, DDP or one-process
        run: model, optimizer, this engine's ``state_dict()`` and each rank's noise stream
        (never a secure-mode key). Collective: call on every rank. See
        ``dpfused.distributed_checkpoint`` and docs/design.md §9."""
        from dpfused.distributed_checkpoint import save_distributed_checkpoint

        save_distributed_checkpoint(path=path, engine=self, module=module, optimizer=optimizer)

    def load_distributed_checkpoint(self, *, path, module: nn.Module, optimizer=None) -> None:
        """Restore ``save_distributed_checkpoint``'s checkpoint after ``make_private`` (on every
        rank): the resumed run gets the same batches, noise (seeded runs) and epsilon."""
        from dpfused.distributed_checkpoint import load_distributed_checkpoint

        load_distributed_checkpoint(path=path, engine=self, module=module, optimizer=optimizer)

    @staticmethod
    def detach(module: nn.Module) -> nn.Module:
        return detach(module)


class DeferredPrivacy:
    """The first stage of ``PrivacyEngine.make_private_deferred``: the private data loader exists
    and every argument was checked; ``complete`` makes the module and optimizer private once they
    are sharded (docs/design.md §9).

    Attributes:
        data_loader: the ``DPDataLoader`` that ``complete`` returns too. Its length is known now;
            iterating it before ``complete`` raises a RuntimeError, so no batch can train a
            model that clips nothing.
        sharded: True when the loader runs every rank in lockstep for FSDP2 (``complete`` then
            takes an FSDP2-sharded module only), False for a module that stays unsharded.
    """

    def __init__(self, *, engine: PrivacyEngine, module: nn.Module, optimizer, loader,
                 settings: dict, lockstep: bool, world_size: int, guarded: bool) -> None:
        self._engine = engine
        self._wrapper, self._module = module, distributed.unwrap(module)
        self._optimizer = optimizer  # accelerate's wrapper already taken off
        self._parameters = _parameter_ids(self._module, optimizer)
        self._settings = settings
        self._world_size = world_size
        self._completed = False
        self.data_loader = loader
        self.sharded = lockstep
        if guarded:
            loader.add_listener(self._refuse_before_complete)

    def complete(self, *, module: nn.Module, optimizer: torch.optim.Optimizer
                 ) -> tuple[nn.Module, DPOptimizer, dp_sampling.DPDataLoader]:
        """Instrument ``module`` in place and wrap ``optimizer``: the rest of ``make_private``.

        Args:
            module: the module given to ``make_private_deferred``, sharded in place since
                (``fully_shard``, ``accelerator.prepare``) or wrapped in DistributedDataParallel.
            optimizer: the optimizer given to ``make_private_deferred`` (its parameters swapped
                for the shards by accelerate are fine; so is accelerate's wrapper around it).

        Returns:
            ``(module, optimizer, data_loader)``, as ``make_private`` returns them.

        Raises:
            ValueError / TypeError: another module or optimizer; a module sharded although the
                loader was made with ``sharded=False`` (or the other way round); a process group
                of another size; what ``make_private`` refuses of a sharded or wrapped module;
                a second call. Nothing was changed.
        """
        if self._completed:
            raise ValueError("DeferredPrivacy.complete was called already: it makes the module "
                             "private once; call make_private_deferred again for another run")
        inner_optimizer = hf_accelerate.unwrap_optimizer(optimizer)
        inner = distributed.unwrap(module)
        if inner is not self._module or inner_optimizer is not self._optimizer:
            which = "module" if inner is not self._module else "optimizer"
            raise ValueError(
                f"{which} is not the {which} passed to make_private_deferred, whose checks and "
                f"private data loader were made for it; shard that {which}'s model in place "
                "(fully_shard, accelerator.prepare) and pass the same objects to complete")
        if module is not self._wrapper or _parameter_ids(inner, inner_optimizer) != self._parameters:
            _check_model(module, inner_optimizer, clipping=self._settings["clipping"])
        self._check_layout(inner)
        result = self._engine._instrument(module, inner_optimizer, self.data_loader,
                                          self._settings)
        self._completed = True
        return result

    def _check_layout(self, module: nn.Module) -> None:
        """The loader's lockstep and world size must be those of the module as it is now."""
        sharded = distributed.is_fsdp2(module)
        if sharded != self.sharded:
            raise ValueError(
                f"the module is {'' if sharded else 'not '}sharded with FSDP2 but the data loader "
                f"was made with sharded={self.sharded}: "
                + ("FSDP2's collectives need every rank to run the same number of physical "
                   "batches, which only a loader made with sharded=True does"
                   if sharded else "pass sharded=False to make_private_deferred for a module "
                   "that stays unsharded (plain or DistributedDataParallel)")
                + "; call make_private_deferred again with the right sharded=")
        _, world_size = _data_parallel_world()
        if world_size != self._world_size:
            raise ValueError(
                f"the data loader was split over {self._world_size} processes and the default "
                f"process group now has {world_size}; call make_private_deferred again after "
                "torch.distributed is initialized")

    def _refuse_before_complete(self, _batch) -> None:
        """Loader listener: no batch before the module is instrumented."""
        if not self._completed:
            raise RuntimeError(
                "the data loader of make_private_deferred was iterated before "
                "DeferredPrivacy.complete(module=..., optimizer=...): its batches would train a "
                "model that clips nothing. Shard the model, call complete, then iterate")


def _parameter_ids(module: nn.Module, optimizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Which parameter objects the module and the optimizer hold (sharding replaces them)."""
    return (tuple(id(p) for p in module.parameters()),
            tuple(id(p) for group in optimizer.param_groups for p in group["params"]))


def _check_model(module: nn.Module, optimizer, *, clipping: str) -> None:
    """What make_private checks of the module (inside a DDP wrapper, if any) and its optimizer
    (accelerate's wrapper already taken off)."""
    inner = distributed.unwrap(module)
    check_module_and_optimizer(inner, optimizer)
    if module is not inner:
        distributed.check_ddp(module)
    distributed.check_sharding(inner, clipping=clipping)


_SCHEDULER_KEYS = (("noise_scheduler", "noise_scheduler_state_dict"),
                   ("grad_clip_scheduler", "grad_clip_scheduler_state_dict"))


def _scheduler_states(noise_scheduler, grad_clip_scheduler) -> dict:
    """Opacus' checkpoint keys for the schedulers' states (those given)."""
    given = dict(zip(("noise_scheduler", "grad_clip_scheduler"),
                     (noise_scheduler, grad_clip_scheduler)))
    for name, scheduler in given.items():
        if scheduler is not None and not callable(getattr(scheduler, "state_dict", None)):
            raise TypeError(f"{name} must be a scheduler with state_dict() "
                            f"(dpfused.opacus.schedulers), got {type(scheduler).__name__}")
    return {key: given[name].state_dict() for name, key in _SCHEDULER_KEYS
            if given[name] is not None}


def _load_scheduler_states(checkpoint, noise_scheduler, grad_clip_scheduler) -> None:
    given = dict(zip(("noise_scheduler", "grad_clip_scheduler"),
                     (noise_scheduler, grad_clip_scheduler)))
    for name, key in _SCHEDULER_KEYS:
        if given[name] is None:
            continue
        if key not in checkpoint:
            raise ValueError(f"load_checkpoint: {name} was passed but the checkpoint has no "
                             f"'{key}'; save it with save_checkpoint({name}=...)")
        given[name].load_state_dict(checkpoint[key])


def _last_iterate_plan(last_iterate, optimizer, loss_reduction) -> dict:
    """calibrate_noise_multiplier's ``last_iterate``: the user's L and convexity, and what the
    optimizer will do: its learning rate and every parameter group's weight decay (a group
    without weight decay does not contract, so one lambda for all would understate epsilon)."""
    _check_plain_sgd(optimizer)
    decays = [float(group.get("weight_decay", 0.0)) for group in optimizer.param_groups]
    if "weight_decay" in last_iterate and any(w != last_iterate["weight_decay"] for w in decays):
        raise ValueError(
            f"last_iterate['weight_decay']={last_iterate['weight_decay']!r} but the optimizer's "
            f"parameter groups have weight_decay {decays}; drop the key (the weight decays are "
            "read from the optimizer)")
    plan = {key: last_iterate[key] for key in ("smoothness", "convex") if key in last_iterate}
    return {**plan, "learning_rate": _constant_learning_rate(optimizer), "weight_decay": decays,
            "loss_reduction": loss_reduction}


def _check_plain_sgd(optimizer) -> None:
    groups = optimizer.param_groups
    if type(optimizer) is not torch.optim.SGD or any(
            g.get("momentum", 0) != 0 or g.get("nesterov", False) or g.get("maximize", False)
            for g in groups):
        raise accounting.LastIterateUnavailable(
            "last_iterate calibration needs plain SGD (torch.optim.SGD with momentum=0, "
            f"nesterov=False, maximize=False); got {type(optimizer).__name__} "
            f"{[{k: g.get(k) for k in ('momentum', 'nesterov', 'maximize') if k in g} for g in groups]}")


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
        _refuse_uninitialized_launch()
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _refuse_uninitialized_launch() -> None:
    """A launcher (torchrun, accelerate launch) started several processes but torch.distributed
    is not initialized: each process would train alone on the whole data set, unnoticed. (On a
    CPU-only machine ``Accelerator()`` leaves it so; ``Accelerator(cpu=True)`` initializes gloo.)"""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise ValueError(
            f"WORLD_SIZE={world}: this is one of {world} launched processes, but "
            "torch.distributed is not initialized, so each process would train on its own; "
            "call torch.distributed.init_process_group() before make_private (under accelerate "
            "on CPUs: Accelerator(cpu=True))")


def _broadcast_parameters(module: nn.Module, *, buffers_only: bool = False) -> None:
    """Every rank starts from rank 0's parameters and buffers (they then stay equal: every rank
    applies the same all-reduced noised gradient). FSDP2 (``buffers_only``): each rank holds a
    different shard of the parameters; only the buffers are broadcast."""
    params = [] if buffers_only else list(module.parameters())
    with torch.no_grad():
        for tensor in [*params, *module.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)


def _os_seeded_noise_generator(params, *, several: bool):
    """make_private's noise generator when none is given: seeded from the operating system, never
    torch's global RNG (a resume after ``torch.manual_seed`` would replay it). A model spread over
    several devices of one process gets one per device (``several``); the optimizer picks it."""
    devices = sorted({_local_device(p) for p in params}, key=str)
    if several and len(devices) > 1:
        return {device: checkpoints.os_seeded_generator(device) for device in devices}
    return checkpoints.os_seeded_generator(devices[0])


def _local_device(param) -> torch.device:
    to_local = getattr(param, "to_local", None)  # FSDP2's DTensor: the shard's device
    return to_local().device if callable(to_local) else param.device


def _warn_if_restored_sigma_differs(restored: float, configured: float) -> None:
    """Opacus treats sigma as configuration; dpfused resumes the saved run's sigma (a noise
    scheduler continues where it was). Say so when the two differ."""
    if restored != configured:
        warnings.warn(
            f"the loaded state restores noise_multiplier={restored} (the saved run's, e.g. set by "
            f"a noise scheduler), not the {configured} passed to make_private; set "
            "optimizer.noise_multiplier after loading to change it (the ledger records each "
            "step's own sigma, so epsilon is right either way)", UserWarning, stacklevel=3)


def _event_rate(loader) -> float | None:
    """The rate the ledger's events carry: q, or q b for cyclic Poisson (a partition's rate)."""
    if loader.sampling == "cyclic_poisson":
        return partition_sample_rate(loader.sample_rate, loader.partitions)
    return loader.sample_rate


def _noise_device(param) -> torch.device:
    """Where a parameter's noise (and so its BandMF history) lives: its local shard's device."""
    local = param.to_local() if hasattr(param, "to_local") else param
    return local.device


def _expected_batch_size_per_process(loader, world_size: int) -> int:
    """Opacus' ``optimizer.expected_batch_size``: q N (Poisson) or b, over the ranks."""
    return int(loader.expected_batch_size / world_size)


def _planned_steps(data_loader, *, sampling, sample_rate, drop_last, partitions, epochs,
                   steps) -> int:
    """The steps make_private_with_epsilon plans for (``steps``, or ``epochs`` whole epochs)."""
    if steps is not None:
        return int(steps)
    n = len(data_loader.dataset)
    q = sample_rate
    if q is None and sampling in ("poisson", "cyclic_poisson"):
        q = dp_sampling.samplers.poisson_rate_of_batch_size(data_loader.batch_size, n)
    per_epoch = dp_sampling.batches_per_epoch(
        sampling=sampling, num_samples=n, sample_rate=q, batch_size=data_loader.batch_size,
        drop_last=drop_last, partitions=partitions)
    return int(epochs) * per_epoch
