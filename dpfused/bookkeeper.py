"""The book-keeper of one step, and the taps that feed it (docs/design.md §2, §4).

Layers deliver pieces (per-example gradients in compact form) from their backward. The ``Bookkeeper``
routes each piece to the clipping group of its parameter (the groups and their thresholds are
``dpfused.groups``'). A group completes:

- inside the backward of its only layer, when that layer is its group's sole member, shares no
  parameter and was called once in this forward: the ``per_layer`` fast path, where the clipped
  weight gradient a^T diag(c) g is the only weight gradient ever computed;
- otherwise at the end of the backward pass (an autograd callback): ``flat`` book-keeping, groups
  joined by shared parameters, layers called more than once, recomputed (checkpointed) layers.

Completing a group: per-example upper bounds of the norm of what the group releases (estimates
with their rigorous floating-point error, cross terms for parameters used more than once, and a
magnitude fallback: ``privacy_math.norm_upper_bound``), multipliers c_i * loss_scale, clipped sums
per parameter, each example reduced before the examples are added. Clipped sums of a pass are
merged into the step's sums only when the whole pass succeeded, so a failed pass leaves no half.

A NaN/inf gradient (``nonfinite``; a huge finite one is clipped like any other): "raise" fails the
pass (nothing of it is kept); "drop" gives that example multiplier 0 in every group. Dropping needs all of an example's group norms
before any group's sum, so with "drop" every group completes at the end of backward (no fast path).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from dpfused import privacy_math
from dpfused.arguments import check_choice, check_clipping_function
from dpfused.groups import set_thresholds
from dpfused.pieces import disjoint, joint_release_error, joint_weighted_sum, merge_factor_uses
from dpfused.step import ClippedStep, LogicalBatch

__all__ = ["Bookkeeper"]


class _LayerTap:
    """What one layer's rule talks to: forward counting and piece delivery."""

    def __init__(self, book, layer):
        self._book, self.layer = book, layer
        self.batch_first = book.batch_first

    def record_forward(self, batch=None):
        self._book.record_forward(self.layer, batch)

    @property
    def forward_batch(self):
        return self._book.forward_batch

    def deliver(self, pieces):
        self._book.deliver(self.layer, pieces)


@dataclass
class _OpenStep:
    """What the backward passes of the logical batch being accumulated have produced so far."""

    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    unclipped: dict[int, torch.Tensor] = field(default_factory=dict)  # see ClippedStep
    examples: int = 0
    backward_passes: int = 0
    dropped: int = 0  # examples dropped for a non-finite gradient (nonfinite="drop")
    logical_batches: int = 1  # logical batches whose backward passes were collected
    # Backward passes ran before the private loader drew this step's batch: they were on other
    # data, so the step is closed as one on batches the loader did not draw (``close``).
    undrawn: bool = False


class Bookkeeper:
    """Collects pieces during backward passes and closes each logical batch into a ClippedStep.

    The data loader tells it which logical batch each physical batch belongs to (``begin``); the
    optimizer asks for the closed step (``close``) and starts the next one (``next_step``).
    """

    def __init__(self, groups, *, loss_reduction, batch_first, count_unclipped=False,
                 nonfinite="raise", clipping_function="standard",
                 stability=privacy_math.DEFAULT_STABILITY):
        check_choice("nonfinite_gradients", nonfinite, privacy_math.NONFINITE_CHOICES)
        check_clipping_function(clipping_function, stability)
        # min(1, C / N) or AUTO-S's C / (N + gamma): privacy_math.clip_factors.
        self.clipping_function, self.stability = clipping_function, float(stability)
        self.groups = groups
        self.nonfinite = nonfinite  # "raise" or "drop" (module docstring)
        self.count_unclipped = count_unclipped  # adaptive thresholds need per-group counts
        self.loss_reduction = loss_reduction
        self.batch_first = batch_first
        self._group_of = {id(p): i for i, g in enumerate(groups) for p in g.params}
        self._params = [p for g in groups for p in g.params]
        self.paths: dict[str, str] = {}  # layer -> its pieces' norm paths, for explain()
        self._step = _OpenStep()
        self._batch: LogicalBatch | None = None  # of the physical batch last yielded
        self._accumulating = False  # a step() came before the logical batch's last physical one
        self._failure: str | None = None
        # Called with no argument at the end of every backward pass, after its sums are merged
        # (or after it failed, see ``pass_failed``): DDP's deferred buckets are filled there, FSDP2
        # reduce-scatters what did not complete inside backward (dpfused/distributed.py).
        self.pass_end_listeners: list = []
        # Called with a group's index when it completes inside backward (the per_layer fast path):
        # FSDP2 hands that group's clipped sums to its reduce-scatter there.
        self.group_complete_listeners: list = []
        # Called with no argument when a backward pass starts: FSDP2 forgets what a pass that
        # failed half way (raised out of backward) handed over, as the book forgets its sums.
        self.pass_start_listeners: list = []
        # Parameters whose .grad must stay empty in backward (a gradient there came from autograd,
        # not from dpfused). FSDP2 writes the reduced sums into .grad and watches its own
        # unsharded parameters instead.
        self.leak_checked_params = self._params
        self.amp_scale = 1.0  # fp16 loss scale s (dpfused.amp.GradScaler); 1 without a scaler
        # FSDP2: layers see the unsharded parameter; this maps it to the sharded one make_private
        # grouped (dpfused/distributed.py). None: parameters are used as they were instrumented.
        self.resolve_param = None
        self._reset_pass()
        self._reset_forward()

    def tap(self, layer):
        return _LayerTap(self, layer)

    # ---- forward ---------------------------------------------------------------------------
    def record_forward(self, layer, batch=None):
        if not torch.is_grad_enabled():
            return
        task = torch._C._current_graph_task_id()
        if task == -1:
            self._expected[layer.path] += 1
            if batch is not None and batch != 1:
                self.forward_batch = batch
            return
        # A forward re-run inside a backward (activation checkpointing). It is not counted, so
        # its groups complete at the end of the pass. Reentrant checkpointing then runs a nested
        # backward (a new graph task): mark this task as its host so the nested task's pieces
        # join this pass instead of starting a new one (docs/design.md §4: one backward, one clipping).
        self._enter_pass()
        self._hosts.add(task)

    # ---- backward --------------------------------------------------------------------------
    def deliver(self, layer, pieces):
        self._enter_pass()
        self._arrived[layer.path] += 1
        touched = set()
        for piece in pieces:
            self._check_batch(layer, piece.batch_size)
            g = self._group_of.get(self._key(piece.param))
            if g is None:
                self._fail(
                    f"module '{layer.path}' used a parameter of shape {tuple(piece.param.shape)} "
                    "that make_private did not instrument: were the parameters replaced after "
                    "make_private (e.g. fully_shard applied after it)? Shard the model first, "
                    "then build the optimizer, then call make_private")
            if not self._completes_now(g, layer):
                piece = piece.compact()  # kept until the end of backward: keep the smaller form
            self._pieces[g].append((layer.path, piece))
            touched.add(g)
        for g in touched:
            if self._completes_now(g, layer):
                self._complete(g)
                for listener in self.group_complete_listeners:
                    listener(g)

    def _key(self, param) -> int | None:
        """id of the instrumented parameter ``param`` stands for (itself, or under FSDP2 the
        sharded parameter of an unsharded one); None if none."""
        key = id(param)
        if key in self._group_of or self.resolve_param is None:
            return key if key in self._group_of else None
        sharded = self.resolve_param(param)
        return id(sharded) if sharded is not None and id(sharded) in self._group_of else None

    def _completes_now(self, g, layer):
        """The per_layer fast path: the group's only layer, called once, has delivered."""
        return (self.groups[g].completes_in_backward and self.nonfinite == "raise"
                and self._expected[layer.path] == 1 and self._arrived[layer.path] == 1)

    def _enter_pass(self):
        task = torch._C._current_graph_task_id()
        if task == self._task or task in self._nested:
            return
        if self._task is not None and self._hosts:
            self._nested.add(task)  # a backward nested in this pass (reentrant checkpointing)
            return
        if self._failure is not None:
            raise RuntimeError(
                f"{self._failure}; call optimizer.zero_grad() before the next backward pass"
            )
        self._reset_pass()
        self._task = task
        torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)
        for listener in self.pass_start_listeners:
            listener()

    def _reset_pass(self):
        self._task = None
        self._hosts: set[int] = set()  # graph tasks of this pass that re-ran forwards
        self._nested: set[int] = set()  # backward tasks nested in this pass
        self._pieces = defaultdict(list)
        self._arrived = defaultdict(int)
        self._pass_batch = None
        self._pass_sums: dict[int, torch.Tensor] = {}
        self._pass_counts: dict[int, torch.Tensor] = {}
        self._pass_dropped = 0
        self._completed: set[int] = set()  # groups completed in this pass

    def _reset_forward(self):
        self._expected = defaultdict(int)  # forward calls per layer since the last pass
        # Batch size seen by the layers of the current forward (for broadcast lookups, see
        # rules/embedding.py).
        self.forward_batch: int | None = None

    def _check_batch(self, layer, batch):
        if self._pass_batch is None:
            self._pass_batch = batch
        elif batch != self._pass_batch:
            self._fail(
                f"module '{layer.path}' saw {batch} examples in this backward pass but other layers "
                f"saw {self._pass_batch}: the first dimension of its input is not the batch "
                "(was (B, T) flattened into B*T, or is the model sequence-first? then pass "
                "batch_first=False)"
            )

    def _fail(self, message):
        self._failure = message
        raise ValueError(message)

    def _loss_scale(self):
        """From the raw gradients the rules see to the true per-example ones: times B for a mean
        loss, divided by the loss scale s of fp16 training (``dpfused.amp``)."""
        reduction = float(self._pass_batch) if self.loss_reduction == "mean" else 1.0
        return reduction / self.amp_scale

    def set_amp_scale(self, scale: float) -> None:
        """The loss of the next backward pass is multiplied by ``scale`` (``dpfused.amp``)."""
        if self._task is not None:
            raise RuntimeError("the loss scale changed during a backward pass")
        self.amp_scale = float(scale)

    def _complete(self, g, uses=None, bound=None, dropped=None):
        """Clip group g's pieces into the pass's sums; ``dropped`` (nonfinite="drop"): the
        examples to give multiplier 0, decided from all groups' norms (``_complete_all``)."""
        group = self.groups[g]
        if uses is None:
            tagged = self._pieces.pop(g)
            uses = self._uses(tagged)
            bound = self._group_norm_bound(uses)
            self._record_norm_paths(tagged)
        self._completed.add(g)
        if dropped is None:
            self._check_finite(group, bound)
        elif self._pass_dropped:
            uses = {key: [_without_examples(piece, dropped) for piece in plist]
                    for key, plist in uses.items()}
        scale = self._loss_scale()
        if self.count_unclipped:  # over the batch's own examples (padding is no example)
            real = len(bound) - self._padding()
            self._pass_counts[g] = privacy_math.centered_unclipped_count(
                bound[:real], group.threshold, scale,
                dropped=None if dropped is None else dropped[:real])
        dropped = self._with_padding(dropped, len(bound))
        multipliers = privacy_math.example_multipliers(
            bound, group.threshold, scale, dropped=dropped,
            clipping_function=self.clipping_function, stability=self.stability)
        for key, plist in uses.items():
            clipped = _clipped_sum(plist, multipliers)
            if key in self._pass_sums:
                self._pass_sums[key].add_(clipped)
            else:
                self._pass_sums[key] = clipped

    def _uses(self, tagged):
        """{parameter key: its pieces in this group}, plain factor uses of one parameter joined
        (``pieces.merge_factor_uses``)."""
        by_param = defaultdict(list)
        for _, piece in tagged:
            by_param[self._key(piece.param)].append(piece)
        return {key: merge_factor_uses(plist) for key, plist in by_param.items()}

    def _padding(self) -> int:
        return self._batch.padding if self._batch is not None else 0

    def _with_padding(self, dropped, examples: int):
        """``dropped`` with the physical batch's padding examples (its last ``padding``; FSDP2
        lockstep, ``LogicalBatch.padding``) added: they run, and their multiplier is exactly 0.
        Adaptive counts leave them out (``_complete``)."""
        padding = self._padding()
        if not padding:
            return dropped
        mask = torch.zeros(examples, dtype=torch.bool)
        mask[examples - padding:] = True
        return mask if dropped is None else dropped | mask.to(dropped.device)

    def _check_finite(self, group, bound):
        """A non-finite norm bound means a NaN/inf gradient (a huge finite one is clipped)."""
        if not torch.isfinite(bound).all():
            bad = torch.nonzero(~torch.isfinite(bound)).flatten().tolist()[:10]
            self._fail(
                f"non-finite per-example gradient norm in clipping group '{group.name}' for "
                f"examples {bad} of this batch; no step was taken from this backward pass "
                "(check the loss for inf/nan, e.g. an example with no counted token; or pass "
                "nonfinite_gradients='drop' to make_private to drop such examples)"
            )

    def _complete_all(self):
        """Complete every group still open at the end of the pass."""
        pending = list(self._pieces)
        if self.nonfinite == "raise" or not pending:
            for g in pending:
                self._complete(g)
            return
        tagged = {g: self._pieces.pop(g) for g in pending}
        uses = {g: self._uses(tagged[g]) for g in pending}
        bounds = {g: self._group_norm_bound(uses[g]) for g in pending}
        for g in pending:
            self._record_norm_paths(tagged[g])
        dropped = privacy_math.nonfinite_examples(list(bounds.values()))
        self._pass_dropped = int(dropped.sum())
        if self._pass_dropped:
            warnings.warn(
                "dpfused dropped example(s) whose per-example gradient is NaN/inf "
                "(nonfinite_gradients='drop'); optimizer.examples_dropped counts them. The count "
                "is not private: do not release it", RuntimeWarning, stacklevel=2)
        for g in pending:
            self._complete(g, uses[g], bounds[g], dropped)

    def _group_norm_bound(self, uses):
        """Per-example upper bounds (B,) of the norm of what the group releases, for any input
        (``privacy_math.norm_upper_bound``; docs/design.md §3, "Floating point").

        Per parameter: the squared norm of the summed uses, sum_u ||G^u||^2 + 2 sum_{u<v} <G^u, G^v>,
        with the error bounds of every term; how far its clipped sum's per-example gradient can be
        from it; and a magnitude from positive quantities. Parameters are disjoint coordinates.
        """
        value = error = release_sq = magnitude_sq = 0
        for plist in uses.values():
            for i, piece in enumerate(plist):
                terms = [piece.norm_estimate()] + [piece.inner_estimate(q) for q in plist[i + 1:]]
                for k, term in enumerate(terms):
                    weight = 1 if k == 0 else 2
                    value = value + weight * term.value
                    error = error + weight * term.error
            release = _release_error(plist)
            magnitude = sum(piece.magnitude() for piece in plist) + release
            release_sq = release_sq + release * release
            magnitude_sq = magnitude_sq + magnitude * magnitude
        return privacy_math.norm_upper_bound(value, error, torch.sqrt(release_sq),
                                             torch.sqrt(magnitude_sq))

    def _record_norm_paths(self, tagged):
        """layer -> how its pieces' norms were computed, e.g. "ghost+dense", for explain()."""
        recorded = defaultdict(list)
        for path, piece in tagged:
            if piece.norm_path and piece.norm_path not in recorded[path]:
                recorded[path].append(piece.norm_path)
        self.paths.update({path: "+".join(names) for path, names in recorded.items()})

    def _end_pass(self):
        try:
            if self._failure is not None:
                return
            self._complete_all()
            self._check_no_autograd_gradients()
            _merge(self._step.sums, self._pass_sums)
            if self.count_unclipped:
                _merge(self._step.unclipped, self._pass_counts_of_every_group())
            examples = self._pass_batch or 0
            self._step.examples += examples - (self._padding() if examples else 0)
            self._step.backward_passes += 1
            self._step.dropped += self._pass_dropped
            self._reset_pass()
            self._reset_forward()
        finally:  # also after a failure: other ranks wait on this rank's collectives
            for listener in self.pass_end_listeners:
                listener()

    # ---- what data parallel reductions read during backward (dpfused/distributed.py) ----------
    def is_final(self, param) -> bool:
        """True once ``param``'s sum for the logical batch can no longer change in this pass:
        its group completed in this pass (the per_layer fast path), or no pass is running."""
        return self._task is None or self._group_of[id(param)] in self._completed

    def logical_sum(self, param) -> torch.Tensor | None:
        """This rank's clipped sum of ``param`` over the logical batch so far (earlier physical
        batches and the running pass); None where no example touched it."""
        key = id(param)
        parts = [d[key] for d in (self._step.sums, self._pass_sums) if key in d]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else parts[0] + parts[1].to(parts[0].device)

    @property
    def pass_failed(self) -> bool:
        """The running (or just ended) backward pass failed; nothing of it was kept."""
        return self._failure is not None

    def _check_no_autograd_gradients(self):
        leaked = [p for p in self.leak_checked_params if p.grad is not None and bool(p.grad.any())]
        if leaked:
            self.fail_autograd_gradient(len(leaked), leaked[0].shape)

    def fail_autograd_gradient(self, count: int, shape) -> None:
        """Fail the pass: ``count`` private parameter(s) received a gradient from autograd."""
        self._fail(
            f"{count} private parameter(s) (first of shape {tuple(shape)}) hold "
            "a gradient that did not come through dpfused: either the gradients of the last "
            "step were not cleared (call optimizer.zero_grad() after each optimizer.step()), or "
            "a parameter is used outside its module's forward (e.g. F.linear(x, layer.weight)), "
            "which dpfused cannot clip per example; call the module instead"
        )

    def _pass_counts_of_every_group(self):
        """A group no example touched in this pass (an unused layer) clipped nobody: +1/2 each."""
        examples = (self._pass_batch or 0) - (self._padding() if self._pass_batch else 0)
        return {g: self._pass_counts.get(g, torch.tensor(0.5 * examples, dtype=torch.float64))
                for g in range(len(self.groups))}

    # ---- step ------------------------------------------------------------------------------
    def begin(self, batch: LogicalBatch) -> None:
        """The data loader is about to yield a physical batch of ``batch`` (a loader listener)."""
        if (self._batch is not None and batch.step != self._batch.step
                and self._step.backward_passes > 0):
            self._step.logical_batches += 1  # no step() since: manual gradient accumulation
        if self._batch is None and self._step.backward_passes > 0:
            self._step.undrawn = True  # passes on data the loader had not drawn (yet)
        self._batch = batch

    def close(self) -> ClippedStep | None:
        """The logical batch's clipped step, or None while more of its physical batches follow.

        Does not reset anything: the optimizer calls ``next_step`` once the step is released, so a
        step refused before release (privacy budget) loses nothing. A step whose backward passes
        did not all run on batches the private loader drew for it (none was drawn, or some
        passes came before the draw) is closed with ``batch=None``: the optimizer records it as
        a step with no guarantee.

        Raises:
            RuntimeError: a failed or unfinished backward pass, a step without a backward pass, or
                a logical batch whose examples did not all go through one backward pass.
        """
        self._check_no_failure()
        batch = self._batch
        if batch is not None and not batch.is_last_physical:
            self._accumulating = True
            return None
        if self._step.undrawn:
            batch = None  # not this logical batch's data alone: no sampling to account
        self._check_complete(batch)
        return ClippedStep(
            batch=batch, sums=self._step.sums, thresholds=tuple(g.threshold for g in self.groups),
            loss_reduction=self.loss_reduction, unclipped=self._step.unclipped,
            examples=self._step.examples, backward_passes=self._step.backward_passes,
            dropped=self._step.dropped,
        )

    def next_step(self) -> None:
        """The closed step was released: start collecting the next logical batch."""
        self._step = _OpenStep()
        self._batch = None
        self._accumulating = False

    @property
    def step_in_progress(self) -> bool:
        """Backward passes of the current logical batch were clipped and not yet released."""
        return self._step.backward_passes > 0 or self._task is not None

    def set_thresholds(self, values) -> None:
        """New C_g for every group (adaptive clipping, a loaded checkpoint); see groups.py."""
        set_thresholds(self.groups, values)

    def _check_no_failure(self):
        if self._failure is not None:
            raise RuntimeError(f"{self._failure}; call optimizer.zero_grad() and redo the batch")
        if self._task is not None:
            raise RuntimeError(
                "optimizer.step() was called while a backward pass is unfinished (during "
                "backward, or after a backward that raised: then call optimizer.zero_grad() and "
                "redo the batch)"
            )

    def _check_complete(self, batch: LogicalBatch | None) -> None:
        step = self._step
        empty_batch = batch is not None and batch.local_size == 0
        if step.backward_passes == 0 and not empty_batch:
            raise RuntimeError(
                "optimizer.step() was called without loss.backward() since the last step (or "
                "zero_grad() cleared it). Only an empty logical batch may step without a backward: "
                "it still takes a noised step"
            )
        if step.logical_batches > 1:
            raise RuntimeError(
                f"optimizer.step() came after the backward passes of {step.logical_batches} "
                "logical batches: gradient accumulation over several batches of the DP data "
                "loader is not allowed (each batch it yields is one sampled logical batch, clipped "
                "and noised once). To train with logical batches larger than memory allows, pass "
                "max_physical_batch_size= to make_private or use BatchMemoryManager(data_loader=, "
                "max_physical_batch_size=, optimizer=): the loader then yields physical batches "
                "and optimizer.step() only steps at the end of each logical batch. Otherwise call "
                "optimizer.step() after every batch (and optimizer.zero_grad() to redo this one)")
        if batch is not None and step.examples != batch.local_size:
            raise RuntimeError(
                f"the logical batch has {batch.local_size} examples (on this process) but the "
                f"backward passes since the last step saw {step.examples}: each example must go "
                "through exactly one backward pass per step (clipping per pass bounds only that "
                "pass's contribution)"
            )

    def clear(self):
        """optimizer.zero_grad(): forget the open step's sums and any failure, unless a logical
        batch is being accumulated over several physical batches (then only the failure)."""
        if self._accumulating and self._failure is None:
            return  # the sums of the logical batch's earlier physical batches stay
        if not self._accumulating:
            self._step = _OpenStep()
        self._failure = None
        self._reset_pass()
        self._reset_forward()


def _clipped_sum(plist, multipliers):
    """One parameter's clipped sum over its pieces, each example reduced before the examples are
    added: a piece at a time when they hold disjoint rows (or there is one), else jointly."""
    if len(plist) == 1 or disjoint(plist):
        return sum(piece.weighted_sum(multipliers) for piece in plist)
    return joint_weighted_sum(plist, multipliers)


def _release_error(plist):
    """How far one parameter's released per-example gradient can be from the sum of its pieces'
    estimated ones (``_clipped_sum``'s two ways)."""
    if len(plist) == 1 or disjoint(plist):
        return sum(piece.release_error() for piece in plist)
    return joint_release_error(plist)


def _merge(into: dict, new: dict) -> None:
    """Add a pass's tensors into the step's, in place (the pass's dict is dropped afterwards)."""
    for key, value in new.items():
        if key in into:
            into[key].add_(value.to(into[key].device))
        else:
            into[key] = value


def _without_examples(piece, dropped):
    """A copy of ``piece`` whose per-example tensors (examples first; every floating tensor field
    but the parameter itself) are 0 for the dropped examples."""
    zeroed = {}
    for f in dataclasses.fields(piece):
        value = getattr(piece, f.name)
        if (f.init and isinstance(value, torch.Tensor) and value.is_floating_point()
                and not isinstance(value, nn.Parameter)):
            zeroed[f.name] = privacy_math.without_examples(value, dropped)
    return dataclasses.replace(piece, **zeroed)
