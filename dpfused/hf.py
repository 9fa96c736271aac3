"""DP fine-tuning inside HuggingFace's ``transformers.Trainer``: change ``Trainer(...)`` to
``DPTrainer(..., privacy=PrivacyArguments(...))``.

    trainer = DPTrainer(model=model, args=TrainingArguments(...), train_dataset=train,
                        privacy=PrivacyArguments(noise_multiplier=1.0, per_sample_max_grad_norm=1.0))
    trainer.train()            # logs "epsilon" at every logging step, prints the privacy report
    trainer.evaluate()         # no DP: plain evaluation

How the Trainer's loop maps onto DP-SGD (docs/design.md §5, §6):

- One *logical* batch per optimizer step, drawn by dpfused's sampler (Poisson by default) with
  expected size ``per_device_train_batch_size x gradient_accumulation_steps x world size``; it is cut
  into *physical* batches of at most ``per_device_train_batch_size``. The Trainer's loop iterates
  logical batches (its own gradient accumulation is set to 1 on an internal copy of the arguments),
  ``training_step`` runs forward/backward on each physical batch and the optimizer takes exactly one
  noised step per logical batch, whatever its realized size (an empty one included). ``global_step``,
  ``max_steps``, ``num_train_epochs``, the scheduler, logging and saving all count logical steps.
- The training loss is a mean over examples of per-example losses (``per_example_loss``): for causal
  LMs each example's mean over its own tokens (``labels`` -100 ignored), never HF's mean over all
  tokens of the batch, whose divisor depends on the other examples (docs/design.md §3).
- Checkpoints (``checkpoint-N``) carry ``dpfused_privacy.pt``: the accountant's ledger, the
  sampler position, the clipping thresholds and the noise generator's state, as plain data (read
  back with ``weights_only=True``); resuming from one gives the same batches, noise and epsilon.
  They are SECRET as the training data: whoever holds the sampler and noise states can replay
  training on a candidate data set and compare with the released model. The model folder that
  ``save_model`` writes (and ``push_to_hub`` uploads) holds only ``dpfused_privacy.json``, the
  privacy report (epsilon, delta, accountant, sampling, steps, what was logged).
- The training loss is private data: by default (``PrivacyArguments.log_loss="off"``) no training
  loss is logged (no "loss" in the logs, ``log_history``, ``trainer_state.json`` or any reporting
  integration; ``train()``'s ``training_loss`` is NaN). ``"noised"`` logs a noised, accounted mean
  of the clipped per-example losses; ``"unprotected"`` logs the raw loss, outside the guarantee.
- ``TrainingArguments.max_grad_norm`` (HF's clipping of the summed gradient) is not applied: the
  per-example bound is ``PrivacyArguments.per_sample_max_grad_norm``, and the noised gradient is
  left as it is.

Contract for subclasses: override ``per_example_loss(model, inputs)`` (one loss per example, each
depending on its own example only). Overriding ``compute_loss`` is refused unless the class sets
``dp_compute_loss_is_per_example = True``, certifying that in training it returns the mean over the
physical batch of such per-example losses.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import secrets
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dpfused import checkpoints, privacy_math
from dpfused.accounting import PrivacyBudgetExhausted
from dpfused.adaptive import AdaptiveClipping
from dpfused.arguments import (
    check_choice,
    check_delta,
    check_flag,
    check_number,
    check_target_epsilon,
)
from dpfused.bandmf import BandMF
from dpfused.distributed import narrower_than_float32, reduce_dtype_of
from dpfused.engine import PrivacyEngine
from dpfused.losses import per_example_lm_loss
from dpfused.secure_random import ChaCha20Generator

try:
    from transformers import Trainer
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )
except ImportError as error:  # pragma: no cover - the dev extra installs transformers
    raise ImportError("dpfused.hf needs transformers: pip install transformers") from error

__all__ = ["DPTrainer", "DPTrainingMixin", "PrivacyArguments", "PRIVACY_STATE_NAME"]

PRIVACY_STATE_NAME = "dpfused_privacy.pt"  # checkpoint-N only: SECRET as the data
PRIVACY_SUMMARY_NAME = "dpfused_privacy.json"  # the privacy report, also in the model folder
IGNORE_INDEX = -100
LOG_LOSS_CHOICES = ("off", "noised", "unprotected")


_RENAMED_PRIVACY_ARGUMENTS = {"max_grad_norm": "per_sample_max_grad_norm", "seed": "privacy_seed"}


@dataclass
class PrivacyArguments:
    """How ``DPTrainer`` makes training private.

    Attributes:
        noise_multiplier: sigma (noise std = sigma x max_grad_norm). Give it or ``target_epsilon``.
        target_epsilon: calibrate sigma so that the planned run (``max_steps``, or an integer
            ``num_train_epochs``) spends this epsilon at ``delta``.
        delta: the delta of every reported epsilon; must be below 1 / (training examples).
        per_sample_max_grad_norm: C, the per-example clipping bound (sqrt(sum_g C_g^2) with
            group clipping). Not ``max_grad_norm``, which is ``TrainingArguments``' (HF's
            clipping of the summed gradient, not applied by DPTrainer): the two dataclasses share
            one ``HfArgumentParser`` (``--per_sample_max_grad_norm``, dp-transformers' name).
        clipping: "flat", "per_layer" or "per_device".
        sampling: "poisson" (default), "cyclic" or "shuffle" (docs/design.md §6).
        accountant: "pld" (default) or "rdp".
        adaptive_clipping: a ``dpfused.AdaptiveClipping`` (thresholds follow a norm quantile).
        max_epsilon: a budget: training stops cleanly before the step that would exceed it, and
            a final checkpoint is written.
        privacy_seed: seeds the batch sampler (``privacy_seed``) and the noise
            (``privacy_seed + 1``). None (default): 64 bits from the operating system, so that
            nobody who knows the Trainer's public ``seed`` can reproduce the batches or subtract
            the noise. Fix it only for experiments. (Not ``seed``: that is ``TrainingArguments``'
            model-initialization seed, and the two share one ``HfArgumentParser``.)
        secure_mode: draw batches and noise from ChaCha20 keyed by the operating system
            (``dpfused.PrivacyEngine(secure_mode=True)``); no ``privacy_seed``. A resumed secure
            run draws fresh noise (the key is never saved).
        log_loss: what the logs show of the training loss. "off" (default): nothing. "noised":
            each step releases the mean of the per-example losses clipped to [0, ``loss_bound``]
            plus Gaussian noise of std ``loss_noise_multiplier * loss_bound``, over the expected
            batch size; accounted with the gradient as one Gaussian (the gradient's sigma is
            raised to keep ``target_epsilon``). "unprotected": the raw mean loss, which is NOT
            covered by the guarantee (a UserWarning and the privacy report say so).
        loss_bound: B, the clipping bound of each example's loss (log_loss="noised").
        loss_noise_multiplier: sigma_L of the logged loss (log_loss="noised"); e.g. 10 adds
            std 10 B / (expected batch size) to each step's mean and costs 1/100 of a Gaussian
            step of sigma 1.
        noise, max_batch_size, clipping_function, stability: as ``make_private`` takes them
            (a ``dpfused.BandMF`` with sampling="cyclic_poisson"; truncated Poisson; "automatic"
            clipping with its gamma; docs/design.md §4-§6).

    The old keywords ``max_grad_norm=`` and ``seed=`` still construct it directly (a
    DeprecationWarning names the new field). They are init-only (``dataclasses.InitVar``), so an
    ``HfArgumentParser`` never sees them and ``dataclasses.replace`` keeps working; as attributes
    they read None: read ``per_sample_max_grad_norm`` and ``privacy_seed``. Assigning them after
    construction raises AttributeError (the value would be ignored).
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    per_sample_max_grad_norm: float = 1.0
    clipping: str = "flat"
    sampling: str = "poisson"
    accountant: str = "pld"
    adaptive_clipping: AdaptiveClipping | None = None
    max_epsilon: float | None = None
    privacy_seed: int | None = None
    secure_mode: bool = False
    log_loss: str = "off"
    loss_bound: float | None = None
    loss_noise_multiplier: float | None = None
    noise: BandMF | None = None
    max_batch_size: int | None = None
    clipping_function: str = "standard"
    stability: float = 0.01
    # The deprecated spellings, init-only (no dataclass field: no HfArgumentParser clash).
    _: dataclasses.KW_ONLY
    max_grad_norm: dataclasses.InitVar[float | None] = None
    seed: dataclasses.InitVar[int | None] = None

    def __post_init__(self, max_grad_norm=None, seed=None):
        self._take_deprecated("max_grad_norm", max_grad_norm, "per_sample_max_grad_norm")
        self._take_deprecated("seed", seed, "privacy_seed")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("PrivacyArguments: give exactly one of noise_multiplier (sigma) and "
                             "target_epsilon (sigma is then calibrated for the planned run)")
        if self.target_epsilon is not None:
            check_target_epsilon(self.target_epsilon, name="PrivacyArguments: target_epsilon")
        check_delta(self.delta, name="PrivacyArguments: delta")
        if self.privacy_seed is not None and not isinstance(self.privacy_seed, int):
            raise TypeError("PrivacyArguments: privacy_seed must be an int or None, got "
                            f"{type(self.privacy_seed).__name__}")
        check_flag("PrivacyArguments: secure_mode", self.secure_mode)
        if self.secure_mode and self.privacy_seed is not None:
            raise ValueError("PrivacyArguments: secure_mode=True draws batches and noise from keys "
                             "of the operating system; remove privacy_seed (a seed makes them "
                             "predictable)")
        self._check_log_loss()

    def __setattr__(self, name: str, value) -> None:
        if name in _RENAMED_PRIVACY_ARGUMENTS:  # would shadow the InitVar and be read by no one
            new = _RENAMED_PRIVACY_ARGUMENTS[name]
            raise AttributeError(f"PrivacyArguments.{name} is not read (it is the deprecated "
                                 f"constructor keyword of {new}); set privacy.{new} = {value!r}")
        super().__setattr__(name, value)

    def _take_deprecated(self, old: str, value, new: str) -> None:
        """``old=value`` given to the constructor: set field ``new`` (both given: refused)."""
        if value is None:
            return
        default = type(self).__dataclass_fields__[new].default
        if getattr(self, new) not in (default, value):
            raise ValueError(f"PrivacyArguments: {old}={value!r} and {new}={getattr(self, new)!r} "
                             f"were both given; {old} is the deprecated name of {new}: give {new} "
                             "only")
        warnings.warn(f"PrivacyArguments({old}=...) is deprecated: use {new}= (--{new} on the "
                      f"command line; {old} is TrainingArguments' name)", DeprecationWarning,
                      stacklevel=4)
        setattr(self, new, value)

    def _check_log_loss(self):
        check_choice("PrivacyArguments: log_loss", self.log_loss, LOG_LOSS_CHOICES)
        given = [name for name in ("loss_bound", "loss_noise_multiplier")
                 if getattr(self, name) is not None]
        if self.log_loss != "noised":
            if given:
                raise ValueError(f"PrivacyArguments: {', '.join(given)} apply to "
                                 f"log_loss='noised' only; got log_loss={self.log_loss!r}")
            return
        for name in ("loss_bound", "loss_noise_multiplier"):
            check_number(f"PrivacyArguments.{name}", getattr(self, name),
                         "a finite number > 0 (log_loss='noised' needs it)",
                         lambda v: math.isfinite(v) and v > 0)


class _PhysicalBatches:
    """The physical batches of one logical batch, in order (what ``training_step`` receives);
    ``len()`` counts their examples. ``infos`` holds each one's ``step.LogicalBatch``, what the
    loader handed its listeners when it drew it (its padding, whether it is the last)."""

    def __init__(self, physical: list, infos: list):
        self.physical = physical
        self.infos = infos

    def __len__(self) -> int:
        return sum(_batch_size(b) for b in self.physical)


class _LogicalBatches:
    """Iterates a DPDataLoader's physical batches grouped into logical batches.

    ``len()`` is the number of logical batches per epoch; one iteration is (the rest of) an epoch.
    The Trainer fetches a whole logical batch before its first forward, so the loader's listeners
    (the book-keeper, the DDP or FSDP2 reduction) have seen its last physical batch by then;
    ``training_step`` hands each physical batch's own ``LogicalBatch`` to them again just before
    its forward (its padding, whether FSDP reduces it), as a hand-written loop would.
    """

    def __init__(self, loader):
        self.loader = loader
        self.dataset = loader.dataset  # Trainer.num_examples reads it

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        physical, infos = [], []
        for batch in self.loader:
            physical.append(batch)
            infos.append(self.loader.current)
            if self.loader.current.is_last_physical:
                yield _PhysicalBatches(physical, infos)
                physical, infos = [], []


class DPTrainingMixin:
    """The DP-SGD overrides of ``transformers.Trainer``; ``DPTrainer`` and ``dpfused.hf_trl``'s
    ``DPSFTTrainer`` put it in front of ``Trainer`` / ``trl.SFTTrainer`` in the MRO."""

    #: Set True on a subclass whose compute_loss returns, in training, the mean over the physical
    #: batch of per-example losses that each depend on one example only.
    dp_compute_loss_is_per_example = False

    def __init__(self, *args, privacy: PrivacyArguments, **kwargs):
        if not isinstance(privacy, PrivacyArguments):
            raise TypeError("privacy must be a dpfused.hf.PrivacyArguments, got "
                            f"{type(privacy).__name__}")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        _refuse_unsupported_class(type(self))
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "compute_loss_func is refused by DPTrainer: it receives num_items_in_batch (the token "
                "count of the whole batch), so one example's loss would depend on the others and "
                "clipping would not bound the sensitivity. Override per_example_loss(model, inputs) "
                "instead (one loss per example)")
        if kwargs.get("model_init") is not None:
            raise ValueError("model_init (hyperparameter search) is not supported by DPTrainer: it "
                             "re-creates the model after it was made private; pass model=")
        if training_args is not None:
            _refuse_unsupported_args(training_args)
        # Before the parent prepares them: TRL's SFTTrainer tokenizes each into a new object.
        _refuse_evaluation_on_training_data(kwargs.get("train_dataset"), kwargs.get("eval_dataset"))
        super().__init__(*args, **kwargs)
        _refuse_unsupported_args(self.args)  # also the defaults the Trainer filled in
        _refuse_unsupported_sharding(self)  # what accelerate was set up with (launcher, args)
        _refuse_uploading_callbacks(self.callback_handler.callbacks)
        _refuse_evaluation_on_training_data(self.train_dataset, self.eval_dataset)
        self.privacy = privacy
        self.logical_batch_size = (self.args.per_device_train_batch_size
                                   * self.args.gradient_accumulation_steps * self.args.world_size)
        # The loop iterates logical batches: the Trainer's own accumulation is 1 on a private copy
        # of the arguments (the caller's object is left alone). Data skipping on resume is done by
        # dpfused's sampler state, so the Trainer must not skip batches itself.
        self.args = _copy_args(self.args, gradient_accumulation_steps=1, ignore_data_skip=True)
        if self.args.max_grad_norm != type(self.args).__dataclass_fields__["max_grad_norm"].default:
            warnings.warn(
                f"TrainingArguments.max_grad_norm={self.args.max_grad_norm} is not applied by "
                f"DPTrainer; the per-example clipping bound is "
                f"PrivacyArguments.per_sample_max_grad_norm={privacy.per_sample_max_grad_norm} "
                "(--per_sample_max_grad_norm)", stacklevel=2)
        _check_log_loss_choice(type(self), privacy)
        self.privacy_engine: PrivacyEngine | None = None
        self._dp_optimizer = None
        self._dp_loader = None
        self._loss_generator = None  # log_loss="noised": the logged loss's noise (never saved)
        self._loss_units = None  # log_loss="noised": this logical batch's clipped losses
        self._padding = 0  # padding examples at the end of the physical batch running (FSDP2)
        self._deferred = None  # FSDP2 under accelerate: the private loader, model made private later
        self.budget_exhausted = False
        self._last_training_loss = None

    # ---- data and optimizer: made private together -------------------------------------------
    def get_train_dataloader(self):
        """Logical batches from dpfused's sampler (built once; later calls continue it)."""
        if self._dp_loader is None:
            self._make_private()
        return _LogicalBatches(self._dp_loader)

    def _make_private(self) -> None:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        privacy = self.privacy
        num_examples = len(self.train_dataset)
        if privacy.delta >= 1.0 / num_examples:
            raise ValueError(
                f"PrivacyArguments.delta={privacy.delta:g} is not below 1/N = 1/{num_examples}: "
                "with such a delta a mechanism may publish an example outright; use a smaller delta")
        self.model.train()
        self.create_optimizer()
        self.privacy_engine = PrivacyEngine(accountant=privacy.accountant,
                                            secure_mode=privacy.secure_mode)
        common = dict(
            optimizer=self.optimizer, data_loader=self._base_train_loader(),
            max_grad_norm=privacy.per_sample_max_grad_norm, clipping=privacy.clipping,
            loss_reduction="mean",  # compute_loss is a mean over the physical batch
            sampling=privacy.sampling, adaptive_clipping=privacy.adaptive_clipping,
            max_physical_batch_size=self.args.per_device_train_batch_size,
            **self._generators(), noise=privacy.noise, max_batch_size=privacy.max_batch_size,
            clipping_function=privacy.clipping_function, stability=privacy.stability,
        )
        if privacy.max_epsilon is not None:
            common.update(max_epsilon=privacy.max_epsilon, delta=privacy.delta)
        if privacy.target_epsilon is not None:
            common.update(target_epsilon=privacy.target_epsilon, target_delta=privacy.delta,
                          **self._planned_length())
        else:
            common.update(noise_multiplier=privacy.noise_multiplier)
        if self.is_fsdp_enabled:  # accelerate shards the model after the loader exists
            self._make_private_deferred(common)
            return
        common.update(module=self._data_parallel_module())
        engine = self.privacy_engine
        make = (engine.make_private_with_epsilon if privacy.target_epsilon is not None
                else engine.make_private)
        _, optimizer, loader = make(**common)
        self._take_private(optimizer, loader)

    def _make_private_deferred(self, common: dict) -> None:
        """FSDP2 under accelerate: the private loader now (every rank in lockstep), the model and
        optimizer once accelerate has sharded them (``_prepare_for_training``); docs/design.md §9."""
        _check_sharded_precision(self.model, self.accelerator)
        engine = self.privacy_engine
        make = (engine.make_private_deferred_with_epsilon
                if self.privacy.target_epsilon is not None else engine.make_private_deferred)
        self._deferred = make(module=self.model, sharded=True, **common)
        self._dp_loader = self._deferred.data_loader

    def _take_private(self, optimizer, loader) -> None:
        """The DP optimizer steps from now on (and releases the noised loss, if asked)."""
        if self.privacy.log_loss == "noised":
            self._release_loss_with_each_step(optimizer)
        self.optimizer, self._dp_optimizer, self._dp_loader = optimizer, optimizer, loader

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """FSDP2: accelerate shards the model and swaps the optimizer's parameters for the shards
        (the Trainer's own preparation); then the sharded model is made private, and only then
        is a checkpoint resumed (its privacy state needs the DP optimizer)."""
        if self._deferred is None:
            return super()._prepare_for_training(max_steps, train_dataloader,
                                                 resume_from_checkpoint)
        if self._dp_optimizer is not None:
            raise ValueError(
                "DPTrainer under FSDP2 trains once per trainer (accelerate shards the model and "
                "dpfused instruments it once); to continue a run, build a new DPTrainer and "
                "call train(resume_from_checkpoint=...)")
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        _, optimizer, loader = self._deferred.complete(module=self.model, optimizer=self.optimizer)
        self._take_private(optimizer, loader)
        if self._created_lr_scheduler:  # it was made over accelerate's optimizer: remake it
            self.lr_scheduler, self._created_lr_scheduler = None, False
            self.create_scheduler(num_training_steps=max_steps)
        if resume_from_checkpoint is not None:
            self._load_from_checkpoint(resume_from_checkpoint, self.model_wrapped)
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
            self._load_scaler(resume_from_checkpoint)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        return model, train_dataloader

    def _generators(self) -> dict:
        """The sampler's and the noise's generators: seeded (``seed``, ``seed + 1``, or 63 bits of
        the operating system each), or none in secure mode (the engine keys ChaCha20 itself)."""
        if self.privacy.secure_mode:
            return {}
        sampling_seed, noise_seed = _seeds(self.privacy.privacy_seed)
        return {"sampling_generator": torch.Generator().manual_seed(sampling_seed),
                "noise_generator": torch.Generator(device=self.args.device).manual_seed(noise_seed)}

    def _release_loss_with_each_step(self, optimizer) -> None:
        """log_loss="noised": each step also releases the noised loss, accounted with the gradient
        as one Gaussian; with target_epsilon the gradient's sigma is raised so the pair still
        spends it. The loss noise comes from a generator of its own, never seeded by ``seed``."""
        privacy = self.privacy
        if privacy.target_epsilon is not None:
            column = 1.0 if privacy.noise is None else privacy.noise.max_column_norm  # BandMF
            optimizer.noise_multiplier = column * privacy_math.noise_multiplier_after(
                optimizer.noise_multiplier / column, privacy.loss_noise_multiplier)
        optimizer.joint_noise_multipliers = (privacy.loss_noise_multiplier,)
        self._loss_generator = (ChaCha20Generator() if privacy.secure_mode
                                else checkpoints.os_seeded_generator(self.args.device))

    def _data_parallel_module(self) -> torch.nn.Module:
        """Several processes: the model in dpfused's own DistributedDataParallel (DDP's bucketed
        all-reduce carries the clipped sums, docs/design.md §9). It becomes ``model_wrapped``, so
        the Trainer sees a wrapped model and does not let accelerate wrap it a second time."""
        if self.args.world_size <= 1:
            return self.model
        device = self.args.device
        ddp = torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=self.args.ddp_bucket_cap_mb or 25)
        self.model_wrapped = ddp
        return ddp

    def _base_train_loader(self) -> DataLoader:
        """The training DataLoader HF would build, with the logical batch size and no sampler of
        its own (dpfused replaces the sampling)."""
        dataset, collator = self.train_dataset, self.data_collator
        if _is_hf_dataset(dataset):
            dataset = self._remove_unused_columns(dataset, description="Training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="Training")
        args = self.args
        extra = {"prefetch_factor": args.dataloader_prefetch_factor} if args.dataloader_num_workers else {}
        return DataLoader(dataset, batch_size=self.logical_batch_size, collate_fn=collator,
                          num_workers=args.dataloader_num_workers,
                          pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
                          persistent_workers=args.dataloader_persistent_workers, **extra)

    def _planned_length(self) -> dict:
        """The run length the calibration must cover, in the Trainer's own terms."""
        if self.args.max_steps > 0:
            return {"steps": self.args.max_steps}
        epochs = self.args.num_train_epochs
        if float(epochs) != int(epochs):
            raise ValueError(
                f"PrivacyArguments.target_epsilon with num_train_epochs={epochs}: calibrate for a "
                "whole number of epochs or set TrainingArguments.max_steps")
        return {"epochs": int(epochs)}

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # No num_items_in_batch: a token count over the batch is exactly what a DP loss must not use.
        samples = []
        for _ in range(num_batches):
            try:
                samples.append(next(epoch_iterator))
            except StopIteration:
                break
        return samples, None

    # ---- the step ------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward and backward on each physical batch of one logical batch; the Trainer then
        calls optimizer.step() once, which adds the noise. Returns what ``log_loss`` releases
        of the loss: 0 ("off", never logged), the noised mean ("noised") or the mean
        per-example loss ("unprotected")."""
        if not isinstance(inputs, _PhysicalBatches):
            raise TypeError("DPTrainer.training_step takes the logical batches of its own "
                            f"train dataloader, got {type(inputs).__name__}")
        model.train()
        self._dp_optimizer.zero_grad(set_to_none=True)  # a fresh logical batch
        self._loss_units = torch.zeros((), dtype=torch.int64, device=self.args.device)
        total = torch.zeros((), dtype=torch.float64, device=self.args.device)
        count = 0
        for i, (batch, info) in enumerate(zip(inputs.physical, inputs.infos)):
            size = _batch_size(batch)
            if size == 0:  # an empty Poisson batch: no forward; the step still adds noise
                continue
            batch = self._prepare_inputs(batch)
            self._announce(info)
            self._padding = info.padding
            with self._synchronized(model, last=i == len(inputs.physical) - 1):
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, batch)
                loss.backward()  # per-example clipping happens inside; not accelerator.backward,
                # which would divide by the caller's gradient_accumulation_steps
            self._padding = 0
            if info.padding == 0:  # FSDP2's padding batches hold padding only: no example's loss
                total += loss.detach().double() * size
                count += size
        loss = (total / count).float() if count else torch.tensor(math.nan, device=self.args.device)
        self._last_training_loss = self._released_loss(loss)
        return self._last_training_loss

    def _released_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """What this step's loss may show (``PrivacyArguments.log_loss``)."""
        if self.privacy.log_loss == "unprotected":
            return loss
        if self.privacy.log_loss == "off":
            return torch.zeros((), device=self.args.device)
        units = self._loss_units
        if self.args.world_size > 1:
            torch.distributed.all_reduce(units)  # exact: int64
        released = privacy_math.noised_loss_mean(
            units, bound=self.privacy.loss_bound,
            noise_multiplier=self.privacy.loss_noise_multiplier,
            expected_batch_size=self._dp_loader.expected_batch_size, generator=self._loss_generator)
        if self.args.world_size > 1:
            torch.distributed.broadcast(released, src=0)  # one draw: rank 0's
        return released.float()

    def _announce(self, info) -> None:
        """Hand the loader's listeners (book-keeper, DDP or FSDP2 reduction) the ``LogicalBatch``
        of the physical batch about to run: the Trainer drew the whole logical batch first, so
        they last saw its last physical batch. Under FSDP2 a physical batch may be padding (an
        example of another rank, run with multiplier 0) and only the last one is reduced."""
        for listener in self._dp_loader.listeners:
            listener(info)

    @staticmethod
    def _synchronized(model, *, last: bool):
        """DDP reduces the logical batch's last physical batch only (its clipped sums so far are
        added up then). The Trainer fetches a whole logical batch before the first forward, so
        the loader-driven switch (dpfused/distributed.py) has already seen the last one."""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """In training: the mean over the batch of ``per_example_loss``. In evaluation (no
        gradient): the parent class's loss, unchanged."""
        if not (model.training and torch.is_grad_enabled()):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        losses, outputs = self.per_example_loss(model, inputs)
        if self._loss_units is not None and self.privacy.log_loss == "noised":
            # FSDP2's padding (the batch's last examples, another rank's) is no example here:
            # counted, it would add one example's loss to the release once per rank.
            examples = losses[:losses.shape[0] - self._padding]
            self._loss_units += privacy_math.clipped_loss_units(
                examples, bound=self.privacy.loss_bound).to(self._loss_units.device)
        loss = losses.mean()
        return (loss, outputs) if return_outputs else loss

    def per_example_loss(self, model, inputs: dict[str, Any]):
        """(losses (B,), outputs): one loss per example, each depending on that example only.

        Causal LMs: mean next-token loss over the example's own tokens (``labels`` -100 ignored).
        Token classification: the same without the shift. Sequence classification: cross-entropy,
        MSE (``num_labels == 1``) or BCE (``problem_type="multi_label_classification"``).
        Override for other heads.
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("DPTrainer needs labels in each training batch to compute per-example "
                             "losses (a causal-LM collator sets labels = input_ids)")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        kind = _head_kind(self.accelerator.unwrap_model(model), logits)
        if kind == "causal_lm":
            return per_example_lm_loss(logits, labels, ignore_index=IGNORE_INDEX,
                                       reduction="none"), outputs
        if kind == "token":
            return per_example_lm_loss(logits, labels, ignore_index=IGNORE_INDEX,
                                       reduction="none", shift=False), outputs
        return _sequence_classification_loss(model, logits, labels), outputs

    def compute_loss_context_manager(self):
        stack = super().compute_loss_context_manager()
        if self.args.bf16:  # bf16 autocast; norms accumulate in float32 inside dpfused
            stack.enter_context(torch.autocast(device_type=self.args.device.type,
                                               dtype=torch.bfloat16))
        return stack

    def _clip_grad_norm(self, model):
        return None  # the per-example bound is dpfused's; the noised gradient is left as it is

    def _get_grad_norm(self, model, grad_norm=None):
        return None  # before step() no parameter holds a gradient (dpfused keeps clipped sums)

    def floating_point_ops(self, inputs):
        # HF counts 6 x parameters x the batch's tokens: over the private batches that is a
        # function of how many examples Poisson sampling drew and of their lengths, which would
        # go un-noised into total_flos (trainer_state.json, every report_to integration).
        if isinstance(inputs, _PhysicalBatches):
            return 0
        return super().floating_point_ops(inputs)

    # ---- budget, logging, report ---------------------------------------------------------------
    def _run_epoch(self, *args, **kwargs):
        try:
            return super()._run_epoch(*args, **kwargs)
        except PrivacyBudgetExhausted as exhausted:
            self._stop_for_budget(kwargs.get("model", args[0] if args else self.model),
                                  kwargs.get("trial"), exhausted)

    def _stop_for_budget(self, model, trial, exhausted):
        """The refused step changed nothing: drop its loss, stop, and checkpoint where we are."""
        self.budget_exhausted = True
        if self._last_training_loss is not None and torch.isfinite(self._last_training_loss):
            self._tr_loss -= self._last_training_loss.to(self._tr_loss.device)
        self._dp_optimizer.zero_grad(set_to_none=True)
        self.control.should_training_stop = True
        if self.is_world_process_zero():
            print(f"dpfused: privacy budget reached, training stopped after {self.state.global_step} "
                  f"steps ({exhausted})")
        self.log({"dp_budget_exhausted": 1.0})
        self._save_checkpoint(model, trial)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        hidden = {"total_flos"}  # not counted over private batches (floating_point_ops)
        if self.privacy.log_loss == "off":  # never in log_history, trainer_state.json, reporters
            hidden |= {"loss", "train_loss"}
        logs = {k: v for k, v in logs.items() if k not in hidden}
        if self.privacy_engine is not None:
            logs["epsilon"] = self.get_epsilon()
        super().log(logs, start_time)

    def get_epsilon(self) -> float:
        """Epsilon spent so far, at ``PrivacyArguments.delta``."""
        if self.privacy_engine is None:
            return 0.0
        return self.privacy_engine.get_epsilon(self.privacy.delta)

    def privacy_report(self):
        """The engine's report (composed and, where it applies, last-iterate epsilon), with what
        the logs showed of the training loss among its assumptions."""
        if self.privacy_engine is None:
            raise ValueError("privacy_report: nothing was trained yet")
        report = self.privacy_engine.privacy_report(self.privacy.delta)
        report = dataclasses.replace(report,
                                     assumptions=(*report.assumptions, self._logged_loss_line()))
        if self.privacy.log_loss != "off" and report.last_iterate_epsilon is not None:
            report = dataclasses.replace(
                report, last_iterate_epsilon=None, last_iterate_worst_position=None,
                last_iterate_reason="a training loss was logged at every step: more than the "
                                    "final model was released")
        return report

    def _logged_loss_line(self) -> str:
        privacy = self.privacy
        if privacy.log_loss == "noised":
            return (f"training loss logged with noise: each step released the mean of the "
                    f"per-example losses clipped to [0, {privacy.loss_bound:g}] plus Gaussian noise "
                    f"(sigma_L = {privacy.loss_noise_multiplier:g}), accounted with the gradient "
                    "as one Gaussian; the noise multiplier shown is the joint sigma")
        if privacy.log_loss == "unprotected":
            return ("training loss logged WITHOUT noise (log_loss='unprotected'): the logged loss "
                    "is NOT covered by this guarantee; it is a function of the data")
        return "no training loss was logged (log_loss='off')"

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.privacy.log_loss == "off":  # TrainOutput carries the run's mean loss: none
            metrics = {k: v for k, v in output.metrics.items() if k != "train_loss"}
            output = output._replace(training_loss=math.nan, metrics=metrics)
        if self.privacy_engine is not None and self.is_world_process_zero():
            print(self.privacy_report())
        return output

    # ---- checkpoints ---------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """The model folder (also ``save_model``'s, which ``push_to_hub`` uploads): the weights
        and the privacy report as JSON; never the sampler's or the noise's state."""
        super()._save(output_dir, state_dict=state_dict)
        if self.privacy_engine is None or not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        with open(os.path.join(output_dir, PRIVACY_SUMMARY_NAME), "w", encoding="utf-8") as f:
            json.dump(self._privacy_summary(), f, indent=2)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """checkpoint-N only: the resume state, SECRET as the data (see the module docstring).
        Under FSDP2 every rank takes part (the model and optimizer shards, every rank's noise
        stream); rank 0 writes the privacy state."""
        with self._torch_optimizer_for_fsdp():
            super()._save_optimizer_and_scheduler(output_dir)
        if self._dp_optimizer is None:
            return
        state = self._privacy_state()  # collective under FSDP2
        if self.args.should_save:
            checkpoints.check_plain(state, PRIVACY_STATE_NAME)
            torch.save(state, os.path.join(output_dir, PRIVACY_STATE_NAME))

    def _privacy_state(self) -> dict:
        state = {
            "engine": self.privacy_engine.state_dict(),  # ledger, sampler, the optimizer's noise
            "noise_multiplier": self._dp_optimizer.noise_multiplier,
            "sampling": self.privacy.sampling,
            "clipping": self.privacy.clipping,
            "logical_batch_size": self.logical_batch_size,
        }
        if state["engine"]["noise"].get("layout") == "per_rank":
            # FSDP2: each rank noises its own shard from its own stream; the engine's state holds
            # this rank's only. All of them, in rank order, so each rank resumes its own.
            state["noise_of_ranks"] = _gathered(state["engine"]["noise"])
        return state

    @contextlib.contextmanager
    def _torch_optimizer_for_fsdp(self):
        """FSDP2: accelerate saves and loads the optimizer state through torch's state-dict
        helpers, which call ``step()`` on an optimizer that has no state yet, to create it. That
        must be the torch optimizer (a step at learning rate 0), never the DP optimizer, whose
        step releases a noised gradient and records it in the ledger."""
        if self._deferred is None or self._dp_optimizer is None:
            yield
            return
        self.optimizer = self._dp_optimizer.original_optimizer
        try:
            yield
        finally:
            self.optimizer = self._dp_optimizer

    def _privacy_summary(self) -> dict:
        """The privacy report as plain JSON: public facts of the run, nothing to replay it by."""
        return {"epsilon": self.get_epsilon(), "delta": self.privacy.delta,
                "steps": self._dp_optimizer.steps_taken,
                "noise_multiplier": self._dp_optimizer.noise_multiplier,
                "accounted_noise_multiplier": self._dp_optimizer.accounted_noise_multiplier,
                "max_grad_norm": self.privacy.per_sample_max_grad_norm,
                "sampling": self.privacy.sampling,
                "clipping": self.privacy.clipping, "accountant": self.privacy.accountant,
                "expected_logical_batch_size": self.logical_batch_size,
                "secure_mode": self.privacy.secure_mode,
                "training_loss_logged": self._logged_loss_line()}

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None or self.privacy_engine is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, PRIVACY_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"resume_from_checkpoint={checkpoint!r} has no {PRIVACY_STATE_NAME}: resuming would "
                "restart the privacy accountant and the sampler, understating epsilon. Resume from "
                "a checkpoint that DPTrainer wrote")
        state = checkpoints.load_plain(path, what="resume_from_checkpoint")
        for key, mine in (("sampling", self.privacy.sampling), ("clipping", self.privacy.clipping),
                          ("logical_batch_size", self.logical_batch_size)):
            if state[key] != mine:
                raise ValueError(f"resume_from_checkpoint: the checkpoint was trained with "
                                 f"{key}={state[key]!r}, this trainer has {mine!r}; they must match")
        steps = state["engine"].get("steps_taken")
        if steps != self.state.global_step:
            raise ValueError(
                f"resume_from_checkpoint: {PRIVACY_STATE_NAME} records {steps} private steps but "
                f"trainer_state.json global_step={self.state.global_step}; one private step is "
                "one optimizer step, so the checkpoint's files do not belong together")
        self.privacy_engine.load_state_dict(_own_noise(state))  # checks its ledger first
        with self._torch_optimizer_for_fsdp():
            super()._load_optimizer_and_scheduler(checkpoint)
        self._dp_optimizer.noise_multiplier = state["noise_multiplier"]


class DPTrainer(DPTrainingMixin, Trainer):
    """``transformers.Trainer`` with DP-SGD: ``DPTrainer(..., privacy=PrivacyArguments(...))``.

    See the module docstring for how batches, steps, losses and checkpoints map onto DP-SGD.
    Several processes (``torchrun`` / ``accelerate launch`` without an FSDP config) train with
    DistributedDataParallel: each rank runs its slice of every logical batch. Under accelerate's
    FSDP2 plugin (``accelerate launch --config_file <fsdp_version: 2 config>``, or
    ``TrainingArguments(fsdp=True)``) accelerate shards the model, dpfused instruments the shards,
    and FSDP's reduce-scatter carries the clipped sums (docs/design.md §9).

    Raises:
        ValueError: a setting that would change the privacy guarantee silently (each message names
            the fix): nn.DataParallel (n_gpu > 1 in one process), DeepSpeed, FSDP1 (and FSDP2
            with CPU offload, ignored modules, activation checkpointing, a reduce dtype or
            trainable parameters narrower than float32), fp16 (GradScaler),
            label_smoothing_factor, compute_loss_func, a custom train sampler or
            train_sampling_strategy other than "random", auto_find_batch_size, model_init, push_to_hub with hub_strategy "checkpoint" or "all_checkpoints" (it would
            upload the secret resume state), a report_to integration set to upload checkpoint
            folders (the same), torch_compile, include_num_input_tokens_seen (a count of the
            private batches), an eval_dataset that is the train_dataset, log_loss="noised" with an
            overridden compute_loss.
        TypeError: a subclass that overrides compute_loss without the per-example contract.
    """

    #: FSDP2 under accelerate is tested with this class (tests/test_hf_fsdp2.py); the other
    #: DPTrainingMixin trainers (TRL's) train with DDP until they are.
    dp_fsdp2_tested = True


# ---- refusals ----------------------------------------------------------------------------------

_OUR_CLASSES: set = set()


def _refuse_unsupported_class(cls) -> None:
    if _user_override(cls, "compute_loss") and not cls.dp_compute_loss_is_per_example:
        raise TypeError(
            f"{cls.__name__} overrides compute_loss. DPTrainer clips each example's gradient, which "
            "bounds the sensitivity only if each example's loss depends on that example alone. "
            "Override per_example_loss(model, inputs) -> (losses of shape (B,), outputs) instead, or, "
            "if your compute_loss returns the mean over the batch of such per-example losses, set "
            "dp_compute_loss_is_per_example = True on the class")
    for name in ("_get_train_sampler", "get_train_dataloader"):
        if _user_override(cls, name):
            raise ValueError(
                f"{cls.__name__} overrides {name}: a custom train sampler is refused, because the "
                "privacy accounting assumes dpfused's sampling. Choose it with "
                "PrivacyArguments.sampling ('poisson', 'cyclic' or 'shuffle') and remove the override")


def _check_log_loss_choice(cls, privacy) -> None:
    if privacy.log_loss == "noised" and _user_override(cls, "compute_loss"):
        raise ValueError(
            f"log_loss='noised' clips each example's loss, which {cls.__name__}.compute_loss "
            "does not hand over (it returns the batch mean); override per_example_loss instead, "
            "or use log_loss='off'")
    if privacy.log_loss == "unprotected":
        warnings.warn(
            "PrivacyArguments(log_loss='unprotected'): the training loss is logged without noise "
            "(log_history, trainer_state.json, every reporting integration). It is a function of "
            "the training data that the privacy guarantee does NOT cover; use 'noised' to log an "
            "accounted loss, or 'off'", UserWarning, stacklevel=3)


def _user_override(cls, name: str) -> bool:
    """True when the first class in the MRO that defines ``name`` is neither dpfused's nor
    HuggingFace's (transformers, trl)."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass not in _OUR_CLASSES and not klass.__module__.startswith(
                ("transformers.", "trl."))
    return False


def _refuse_unsupported_args(args) -> None:
    refusals = [
        (getattr(args, "deepspeed", None),
         "a DeepSpeed config is not supported by DPTrainer (DeepSpeed owns the backward and the "
         "optimizer step, which per-example clipping and the single noised step replace); remove "
         "deepspeed= and train on one device, or with dpfused's make_private in a torchrun loop"),
        (args.label_smoothing_factor,
         f"label_smoothing_factor={args.label_smoothing_factor} is refused: HF's label smoother "
         "averages over every token of the batch, so one example's loss depends on the others. Set "
         "it to 0, or override DPTrainer.per_example_loss with a smoothed per-example loss"),
        (args.fp16,
         "fp16=True needs torch.amp.GradScaler, which scales the loss and so the clipped norms; "
         "use bf16=True (autocast, no scaler) or float32"),
        (args.train_sampling_strategy != "random",
         f"train_sampling_strategy={args.train_sampling_strategy!r} is refused (group_by_length and "
         "the other samplers replace the sampling the privacy accounting assumes); remove it and "
         "choose PrivacyArguments.sampling ('poisson', 'cyclic' or 'shuffle')"),
        (args.auto_find_batch_size,
         "auto_find_batch_size=True is refused: it rebuilds the data loader after training began, "
         "which would restart the private sampler; set per_device_train_batch_size (the physical "
         "batch size) yourself"),
        (getattr(args, "torch_compile", False),
         "torch_compile=True is refused by DPTrainer: a compiled model does not take the steps the "
         "uncompiled one takes under dpfused's per-example clipping (checked: other parameters "
         "from the same batches and noise), so the clipping bound is not known to hold; remove "
         "torch_compile, torch_compile_backend and torch_compile_mode"),
        (getattr(args, "include_num_input_tokens_seen", "no") not in ("no", False),
         f"include_num_input_tokens_seen={args.include_num_input_tokens_seen!r} is refused: the "
         "count of tokens seen (logged at every step, sent to every report_to integration and "
         "saved in trainer_state.json) is a function of the private batches (how many examples "
         "Poisson sampling drew, and their lengths) that no noise covers; set it to 'no'"),
        *_uploading_reporters(getattr(args, "report_to", None) or []),
    ]
    hub_strategy = getattr(args, "hub_strategy", None)
    hub_strategy = getattr(hub_strategy, "value", hub_strategy)  # HubStrategy or its string
    if getattr(args, "push_to_hub", False) and hub_strategy in ("checkpoint", "all_checkpoints"):
        refusals.append((True,
            f"push_to_hub with hub_strategy={hub_strategy!r} would upload checkpoint "
            f"folders, whose {PRIVACY_STATE_NAME} holds the sampler's and the noise's state (with "
            "them, training can be replayed on a candidate data set: they are as secret as the "
            "data); use hub_strategy='every_save' or 'end', which upload the model folder only"))
    for refused, message in refusals:
        if refused:
            raise ValueError(message)
    if args.n_gpu > 1:
        raise ValueError(
            f"{args.n_gpu} GPUs in one process: the Trainer would wrap the model in nn.DataParallel, "
            "whose replicas dpfused cannot instrument. Use one GPU (CUDA_VISIBLE_DEVICES=0)")
    plugin_args = getattr(args, "fsdp_plugin_args", None) or {}
    if getattr(args, "fsdp", None) and plugin_args.get("fsdp_version", 2) != 2:
        raise ValueError(_FSDP1)


_FSDP1 = ("FSDP1 (fsdp_version 1, FullyShardedDataParallel) is refused by DPTrainer: it flattens "
          "each unit's parameters into one, so no layer sees its own weight and per-example "
          "clipping cannot be done; use FSDP2 (fsdp_config {'version': 2}, or fsdp_version: 2 in "
          "the accelerate config), or DistributedDataParallel (no FSDP config)")


def _refuse_unsupported_sharding(trainer) -> None:
    """What the Trainer's accelerator was set up with (``accelerate launch``'s config or
    ``TrainingArguments``): DeepSpeed and FSDP1 are refused; FSDP2 without what dpfused's
    reduction cannot do exactly (docs/design.md §9)."""
    if trainer.is_deepspeed_enabled:
        raise ValueError(
            "DeepSpeed (accelerate's DeepSpeed plugin) is not supported by DPTrainer: its engine "
            "runs backward and reduces the gradients itself, before dpfused could clip each "
            "example. Use an FSDP2 config (fsdp_version: 2) or none (DistributedDataParallel)")
    if getattr(trainer, "is_fsdp_xla_enabled", False):
        raise ValueError("XLA FSDP (fsdp_config['xla']) is not supported by DPTrainer; use FSDP2 "
                         "(fully_shard) on GPUs or CPUs, or DistributedDataParallel")
    if not trainer.is_fsdp_enabled:
        return
    plugin = trainer.accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ValueError(_FSDP1)
    if not getattr(type(trainer), "dp_fsdp2_tested", False):
        raise ValueError(
            f"FSDP2 is not supported by {type(trainer).__name__} yet (it is tested with "
            "DPTrainer); train it with DistributedDataParallel (no FSDP config)")
    from torch.distributed.fsdp import CPUOffloadPolicy

    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise ValueError(
            "FSDP2 with CPU offload (fsdp_offload_params / cpu_offload) is not supported by "
            "DPTrainer: dpfused's reduction of the clipped sums is not tested with offloaded "
            "shards; turn offloading off")
    if plugin.ignored_modules:
        raise ValueError(
            "FSDP2 with ignored_modules is not supported by DPTrainer: every trainable parameter "
            "must be sharded by fully_shard, whose reduce-scatter adds the clipped sums up; "
            "remove ignored_modules")
    if getattr(plugin, "activation_checkpointing", False):
        raise ValueError(
            "FSDP2 with activation checkpointing (fsdp_activation_checkpointing) is not supported "
            "by DPTrainer: accelerate wraps the layers in checkpoint wrappers after the model was "
            "checked, and dpfused's clipping of the recomputed layers is not tested there; set "
            "fsdp_activation_checkpointing: false")
    reduce = reduce_dtype_of(plugin.mixed_precision_policy)
    if reduce is not None and reduce.is_floating_point and narrower_than_float32(reduce):
        raise ValueError(
            f"FSDP2 mixed_precision_policy reduce_dtype={reduce}: FSDP would reduce-scatter the "
            "clipped sums in it, rounding the sum over the batch before the noise (one example "
            "could then move it by far more than per_sample_max_grad_norm); set reduce_dtype to "
            "torch.float32, or leave the policy to TrainingArguments(bf16=True)")


def _check_sharded_precision(model, accelerator) -> None:
    """FSDP2 stores and reduce-scatters the clipped sums in the trainable parameters' dtype
    before the noise: refuse parameters narrower than float32 that accelerate will not upcast
    (it keeps float32 master weights when mixed precision is on), before accelerate shards."""
    if str(accelerator.mixed_precision) != "no":
        return  # accelerate upcasts every trainable parameter to float32 before fully_shard
    for name, param in model.named_parameters():
        if param.requires_grad and param.is_floating_point() and \
                narrower_than_float32(param.dtype):
            raise ValueError(
                f"parameter '{name}' is {param.dtype} under FSDP2: FSDP would store and reduce-"
                f"scatter the clipped sums in {param.dtype}, rounding the sum over the batch "
                "before the noise (one example could then move it by far more than "
                "per_sample_max_grad_norm). Set TrainingArguments(bf16=True): accelerate then "
                "keeps float32 master weights of the trainable parameters and computes in "
                "bfloat16 (MixedPrecisionPolicy), and dpfused reduces the sums in float32; or "
                "load the model in float32")


# What an integration named in report_to uploads, when it uploads checkpoint folders (which hold
# the secret resume state, like push_to_hub's hub_strategy="checkpoint"): (setting?, the fix).
_ENV_TRUE = {"1", "ON", "YES", "TRUE"}  # transformers' ENV_VARS_TRUE_VALUES


def _env_true(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).upper() in _ENV_TRUE


_UPLOADING_REPORTERS = {
    "wandb": (lambda: os.environ.get("WANDB_LOG_MODEL", "false").lower() == "checkpoint",
              "WANDB_LOG_MODEL=checkpoint uploads every checkpoint folder; use "
              "WANDB_LOG_MODEL=end (the final model folder only) or false"),
    "mlflow": (lambda: _env_true("HF_MLFLOW_LOG_ARTIFACTS"),
               "HF_MLFLOW_LOG_ARTIFACTS uploads every checkpoint folder; unset it"),
    "dagshub": (lambda: _env_true("HF_DAGSHUB_LOG_ARTIFACTS"),
                "HF_DAGSHUB_LOG_ARTIFACTS uploads the output folder (checkpoints included) and the "
                "training dataset itself; unset it"),
    "comet_ml": (lambda: _env_true("COMET_LOG_ASSETS"),
                 "COMET_LOG_ASSETS uploads the output folder, checkpoints included; unset it"),
    "clearml": (lambda: _env_true("CLEARML_LOG_MODEL", "true"),
                "CLEARML_LOG_MODEL (on by default when the callback creates the task) uploads every "
                "checkpoint folder; set CLEARML_LOG_MODEL=false"),
    "dvclive": (lambda: os.environ.get("HF_DVCLIVE_LOG_MODEL", "false").lower() == "all",
                "HF_DVCLIVE_LOG_MODEL=all uploads the output folder at every save; use true (the "
                "final model only) or false"),
    "flyte": (lambda: True,
              "FlyteCallback syncs every checkpoint folder by default; remove 'flyte' from "
              "report_to and pass callbacks=[FlyteCallback(sync_checkpoints=False)]"),
}


def _uploading_reporters(report_to) -> list[tuple[bool, str]]:
    """Refusals (as ``_refuse_unsupported_args`` lists them) for report_to integrations set to
    upload checkpoint folders."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [(True, _uploading_message(name, _UPLOADING_REPORTERS[name][1]))
            for name in names if name in _UPLOADING_REPORTERS and _UPLOADING_REPORTERS[name][0]()]


def _uploading_message(name: str, fix: str) -> str:
    return (f"report_to={name!r} is set to upload checkpoint folders, whose {PRIVACY_STATE_NAME} "
            "holds the sampler's and the noise's state (with them, training can be replayed on a "
            f"candidate data set: they are as secret as the data): {fix}")


# The same, for integration callbacks passed explicitly (callbacks=[...]): by class name (no
# integration package is imported), the instance's own setting or the environment it reads.
_UPLOADING_CALLBACKS = {
    "WandbCallback": ("wandb", lambda cb: getattr(cb, "_log_model", None) == "checkpoint"
                      or _UPLOADING_REPORTERS["wandb"][0]()),
    "MLflowCallback": ("mlflow", lambda cb: _UPLOADING_REPORTERS["mlflow"][0]()),
    "DagsHubCallback": ("dagshub", lambda cb: _UPLOADING_REPORTERS["dagshub"][0]()),
    "CometCallback": ("comet_ml", lambda cb: _UPLOADING_REPORTERS["comet_ml"][0]()),
    "ClearMLCallback": ("clearml", lambda cb: _UPLOADING_REPORTERS["clearml"][0]()),
    "DVCLiveCallback": ("dvclive", lambda cb: getattr(cb, "_log_model", None) == "all"),
    "FlyteCallback": ("flyte", lambda cb: bool(getattr(cb, "sync_checkpoints", True))),
    "NeptuneCallback": ("neptune", lambda cb: getattr(cb, "_log_checkpoints", None) is not None),
}
_CALLBACK_FIXES = {"neptune": "pass NeptuneCallback(log_checkpoints=None)"}


def _refuse_uploading_callbacks(callbacks) -> None:
    for callback in callbacks:
        for klass in type(callback).__mro__:
            entry = _UPLOADING_CALLBACKS.get(klass.__name__)
            if entry is None:
                continue
            name, uploads = entry
            if uploads(callback):
                fix = _CALLBACK_FIXES.get(name) or _UPLOADING_REPORTERS[name][1]
                raise ValueError(_uploading_message(name, fix))
            break


def _refuse_evaluation_on_training_data(train_dataset, eval_dataset) -> None:
    """Evaluation runs without noise: its metrics, logged and reported, must not be computed on
    the training data (a dict of eval sets is checked set by set)."""
    if train_dataset is None or eval_dataset is None:
        return
    sets = eval_dataset.items() if isinstance(eval_dataset, Mapping) else [(None, eval_dataset)]
    for name, dataset in sets:
        if dataset is train_dataset:
            where = "eval_dataset" if name is None else f"eval_dataset[{name!r}]"
            raise ValueError(
                f"{where} is the train_dataset: evaluation runs without DP, so its metrics (logged "
                "at every eval_strategy step and sent to every report_to integration) would "
                "release statistics of the training data that no noise covers. Evaluate on "
                "held-out data (e.g. dataset.train_test_split)")


def _copy_args(args, **changes):
    """A shallow copy of TrainingArguments with ``changes`` (no __post_init__ re-run)."""
    internal = copy.copy(args)
    for key, value in changes.items():
        setattr(internal, key, value)
    return internal


def _seeds(seed: int | None) -> tuple[int, int]:
    if seed is None:
        return secrets.randbits(63), secrets.randbits(63)
    return seed, seed + 1


def _is_hf_dataset(dataset) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(dataset, datasets.Dataset)


def _batch_size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    # Any Mapping: HF's padding collators return a BatchEncoding, a Mapping but not a dict.
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__} batch: it holds no "
                    "batched tensor")


def _gathered(noise: dict) -> list:
    """Every rank's noise-stream state (``checkpoints.noise_state``), in rank order, on every
    rank; tensors on the CPU (rank 0 writes them)."""
    mine = _on_cpu(noise)
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    return every


def _on_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, Mapping):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    return value


def _own_noise(state: dict) -> dict:
    """The engine state to load on this rank: with per-rank noise streams (FSDP2), this rank's
    own, never another rank's (two ranks on one stream would add the same noise to different
    coordinates) and never a restarted one (it would replay noise already released).

    Raises:
        ValueError: the checkpoint's streams belong to another number of processes.
    """
    streams = state.get("noise_of_ranks")
    if streams is None:
        return state["engine"]
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if len(streams) != world:
        raise ValueError(
            f"resume_from_checkpoint: {PRIVACY_STATE_NAME} holds the noise streams of "
            f"{len(streams)} processes (FSDP2: one per rank) and this run has {world}; a noise "
            "stream cannot move to another number of processes without replaying noise already "
            f"released or losing the exact resume. Resume with {len(streams)} processes")
    return {**state["engine"], "noise": streams[rank]}


def _model_class_name(model) -> str:
    """The model's class name. FSDP2's ``fully_shard`` gives a sharded module a class of its
    own (``FSDPLlamaForCausalLM``): the first class in its MRO that is not FSDP's."""
    from torch.distributed.fsdp import FSDPModule

    return next(klass.__name__ for klass in type(model).__mro__
                if not issubclass(klass, FSDPModule))


def _head_kind(model, logits) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = _model_class_name(base)
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return "causal_lm"
    if logits.dim() == 3:
        return "token"
    if logits.dim() == 2 and (name in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()
                              or name.endswith("ForSequenceClassification")):
        return "sequence"
    raise TypeError(
        f"DPTrainer cannot tell the per-example loss of {name} (logits of shape "
        f"{tuple(logits.shape)}); override per_example_loss(model, inputs)")


def _sequence_classification_loss(model, logits, labels):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    problem = getattr(getattr(base, "config", None), "problem_type", None)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 autocast: float32
    if problem == "regression" or (problem is None and logits.shape[-1] == 1):
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1), reduction="none")
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(
            logits, labels.to(logits.dtype), reduction="none").mean(dim=-1)
    return F.cross_entropy(logits, labels.view(-1), reduction="none")


_OUR_CLASSES.update({DPTrainingMixin, DPTrainer})
