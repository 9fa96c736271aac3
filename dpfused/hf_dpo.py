"""DP preference optimisation with TRL: ``DPDPOTrainer`` is ``trl.DPOTrainer`` with DP-SGD.

    trainer = DPDPOTrainer(model=model, args=DPOConfig(...), train_dataset=pairs,
                           processing_class=tokenizer, peft_config=LoraConfig(...),
                           privacy=PrivacyArguments(noise_multiplier=1.0))

Everything in ``dpfused.hf`` holds (logical batches, one noised step each, epsilon in the logs, no
training loss logged unless ``PrivacyArguments.log_loss`` says so, the secret resume state in
``checkpoint-N`` only, several processes with DistributedDataParallel). TRL's training metrics
(rewards, log-probabilities, token counts: functions of the pairs) are not computed in training;
``evaluate()`` runs TRL's own loss and metrics, without DP. What changes is the privacy unit
(docs/design.md §7.7):

- **One preference pair (prompt, chosen, rejected) is one example.** dpfused's sampler draws pairs
  (Poisson by default), epsilon is counted per pair, and the pair's gradient is clipped as ONE
  example. TRL collates B pairs into 2B rows (the B chosen sequences, then the B rejected ones)
  and runs them as one batch; dpfused clips per row of the batch dimension, so that forward would
  clip the chosen and the rejected half of a pair separately, each to C (2C per pair; the
  book-keeper refuses the step, having seen 2B examples for B drawn). ``per_example_loss`` runs
  the policy twice instead, on the B chosen rows and on the B rejected rows, row i of both calls
  being pair i. Each layer is then called twice before one backward, which dpfused handles as a
  weight used twice: pair i's gradient is the sum over both calls (its norm with the cross terms,
  docs/design.md §3), clipped once.
- **The per-pair loss is TRL's loss of that pair**: ``pair_losses`` computes, per pair, what
  ``DPOTrainer`` averages over the batch (every loss type that is a function of one pair, TRL's
  f-divergences, ``ld_alpha``, ``loss_weights``, WPO ``use_weighting``), from the completion
  tokens' log-probabilities through the model's own LM head (TRL's fused head bypasses the
  ``lm_head`` module, and so dpfused's clipping of it).
- **The reference model is public.** Its log-probabilities come from TRL's own
  ``compute_ref_log_probs`` without gradients (or from ``precompute_ref_log_probs``, computed
  before training from the same reference). It must not have been trained on the private data:
  the public base model (``ref_model`` left out: TRL then loads the policy's base again, uses the
  initial policy for ``precompute_ref_log_probs``, or the base with the adapters off under a new
  LoRA adapter; an adapter passed in already trained becomes the reference as it is), or a model
  trained on public data only. A reference fine-tuned on the private data without DP leaks it
  through every step's loss, outside the guarantee; one trained with DP on the same data spends
  its own epsilon too (add them).

Refused, each with the fix: loss types that mix pairs (``aot`` and ``aot_unpaired`` sort the
batch's log-ratios; ``sft`` averages the chosen tokens over the whole batch), ``padding_free``,
``use_liger_kernel``, ``sync_ref_model`` (the reference would follow the privately trained
policy), an MoE router's load-balancing loss (an average over the batch's tokens),
``activation_offloading``, vision-language data, a custom ``data_collator`` (the pairing of rows
is TRL's collator's), and a ``ref_model`` sharing trainable parameters with the policy.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dpfused.hf import _OUR_CLASSES, IGNORE_INDEX, DPTrainingMixin, PrivacyArguments

try:
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
except ImportError as error:  # pragma: no cover - the dev extra installs trl
    raise ImportError("dpfused.hf_dpo needs TRL: pip install trl") from error

__all__ = ["DPDPOTrainer", "LossSettings", "PrivacyArguments", "pair_losses"]

_DPO_ASSUMPTIONS = (
    "one example is one preference pair (prompt, chosen, rejected): the sampler draws pairs and "
    "each pair's gradient (both completions) is clipped as one",
    "the reference model is public (not trained on the private data): its log-probabilities "
    "enter each pair's loss as a fixed function of that pair",
)

# Loss types whose value for one pair depends on the other pairs of the batch.
_MIXING_LOSSES = {
    "aot": "sorts the log-ratios of the whole batch, so a pair's loss is computed from the "
           "other pairs' log-ratios",
    "aot_unpaired": "sorts the log-ratios of the whole batch, so a pair's loss is computed from "
                    "the other pairs' log-ratios",
    "sft": "averages the chosen completions' tokens over the whole batch, so one pair's length "
           "rescales every other pair's gradient",
}


class DPDPOTrainer(DPTrainingMixin, DPOTrainer):
    """``trl.DPOTrainer`` with DP-SGD over preference pairs: ``DPDPOTrainer(..., privacy=...)``.

    Keyword-only; the arguments are ``DPOTrainer``'s. See the module docstring for the privacy
    unit, the reference model's assumption and what is refused.

    Args:
        model: the policy (a model, a PEFT model or a model id), as for ``DPOTrainer``.
        privacy: how training is made private (``dpfused.hf.PrivacyArguments``); one example is
            one preference pair.
        ref_model: the reference model; it must be public (not trained on the private data).
            None: TRL's default (the policy's base, or the base with the adapters off).
        args: a ``trl.DPOConfig``.
        data_collator: None (TRL's ``DataCollatorForPreference``) or an instance of it.
        **kwargs: the other ``DPOTrainer`` arguments (``train_dataset``, ``processing_class``,
            ``peft_config``, ``optimizers``, ...).

    Raises:
        ValueError: a setting that would mix pairs or move the reference with the private policy
            (the message names the fix), and everything ``dpfused.hf.DPTrainer`` refuses.
        TypeError: ``privacy`` is not a ``PrivacyArguments``.
    """

    def __init__(self, *, model, privacy: PrivacyArguments, ref_model=None, args=None,
                 data_collator=None, **kwargs):
        if args is not None:
            _refuse_dpo_args(args)
        _refuse_custom_collator(data_collator)
        super().__init__(model=model, ref_model=ref_model, args=args,
                         data_collator=data_collator, privacy=privacy, **kwargs)
        _refuse_dpo_args(self.args)  # also the defaults TRL filled in
        self._refuse_unsupported_setup()

    def _refuse_unsupported_setup(self) -> None:
        if self._is_vision_dataset:
            raise ValueError(
                "DPDPOTrainer trains on text preference pairs only: the dataset has images, whose "
                "collated pixel values are not one row per pair, so a pair could not be clipped "
                "as one example. Remove the image columns or train without DP")
        if self.aux_loss_enabled:
            raise ValueError(
                "the MoE load-balancing loss (router_aux_loss_coef) averages the router's "
                "statistics over every token of the batch, so one pair changes every other pair's "
                "gradient; set DPOConfig(router_aux_loss_coef=0.0)")
        if self.ref_model is not None:
            _refuse_shared_reference(self.model, self.ref_model)

    # ---- the report ------------------------------------------------------------------------
    def privacy_report(self):
        """The engine's report, with DPO's privacy unit and the reference model among its
        assumptions."""
        report = super().privacy_report()
        return dataclasses.replace(report, assumptions=(*report.assumptions, *_DPO_ASSUMPTIONS))

    def _privacy_summary(self) -> dict:
        return {**super()._privacy_summary(), "privacy_unit": _DPO_ASSUMPTIONS[0],
                "reference_model": _DPO_ASSUMPTIONS[1]}

    # ---- the per-pair loss -----------------------------------------------------------------
    def per_example_loss(self, model, inputs: dict[str, Any]):
        """(losses (B,), None): TRL's DPO loss of each pair of the physical batch.

        ``inputs`` is TRL's collated batch: 2B rows, pair i's chosen sequence in row i and its
        rejected one in row B + i. The policy sees them in two calls of B rows each, so every
        instrumented layer holds pair i in example slot i in both (module docstring).
        """
        chosen, rejected = _halves(inputs)
        policy_chosen = _completion_token_logps(model, chosen, wpo=self.use_weighting)
        policy_rejected = _completion_token_logps(model, rejected, wpo=self.use_weighting)
        if self.precompute_ref_logps:
            reference = (inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])
        else:  # TRL's own reference forward: no gradient, adapters off (or "ref") under PEFT
            reference_model = self.model if self.ref_model is None else self.ref_model
            reference = self.compute_ref_log_probs(reference_model, inputs)
        losses = pair_losses(
            policy=_sequence_logps(policy_chosen, policy_rejected, self.ld_alpha),
            reference=reference, completion_tokens=(chosen["completion_mask"].sum(dim=1),
                                                    rejected["completion_mask"].sum(dim=1)),
            settings=LossSettings.of(self),
            wpo_weights=_wpo_weights(policy_chosen, policy_rejected))
        return losses, None


# ---- log-probabilities ---------------------------------------------------------------------


@dataclass(frozen=True)
class _TokenLogps:
    """Per-token log-probabilities of B sequences' completion tokens (0 elsewhere)."""

    values: torch.Tensor  # (B, T-1), next-token log-probability at each completion position
    mask: torch.Tensor  # (B, T-1), the shifted completion mask
    log_sum_sq_probs: torch.Tensor | None  # (B, T-1), log sum_v p_v^2 (WPO), without gradient


def _halves(inputs: dict[str, Any]) -> tuple[dict, dict]:
    """TRL's 2B collated rows as (chosen rows, rejected rows): pair i is row i of both."""
    rows = inputs["input_ids"].shape[0]
    if rows % 2:
        raise ValueError(f"a DPO batch has 2B rows (chosen, then rejected); got {rows}")
    pairs = rows // 2
    keys = ("input_ids", "attention_mask", "completion_mask")
    return ({k: inputs[k][:pairs] for k in keys}, {k: inputs[k][pairs:] for k in keys})


def _completion_token_logps(model, rows: dict, *, wpo: bool) -> _TokenLogps:
    """The policy's next-token log-probabilities on ``rows``' completion tokens, from the logits
    of the model's own forward (its LM head is a layer dpfused clips)."""
    input_ids, completion_mask = rows["input_ids"], rows["completion_mask"]
    seq_len = input_ids.shape[1]
    outputs = model(input_ids=input_ids, attention_mask=rows["attention_mask"], use_cache=False)
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    # Prompt-learning PEFT prepends virtual tokens: keep the real positions. (B, T-1, V)
    logits = logits[:, -seq_len:-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16: softmax in fp32
    mask = completion_mask[:, 1:].bool()
    targets = input_ids[:, 1:].masked_fill(~mask, IGNORE_INDEX)
    batch, positions, vocab = logits.shape
    values = -F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="none").view(batch, positions)
    log_sum_sq = None
    if wpo:
        with torch.no_grad():
            log_sum_sq = torch.logsumexp(2 * torch.log_softmax(logits.detach(), dim=-1), dim=-1)
    return _TokenLogps(values, mask, log_sum_sq)


def _sequence_logps(chosen: _TokenLogps, rejected: _TokenLogps, ld_alpha: float | None):
    """Each sequence's log-probability, the sum over its completion tokens; with LD-DPO's
    ``ld_alpha`` the tokens past the pair's shared length weigh ``ld_alpha`` (TRL's rule)."""
    if ld_alpha is None:
        return chosen.values.sum(dim=1), rejected.values.sum(dim=1)
    shared = torch.minimum(chosen.mask.sum(dim=1), rejected.mask.sum(dim=1)).unsqueeze(1)

    def weighted(side: _TokenLogps):
        position = side.mask.long().cumsum(dim=1)
        inside = (position > 0) & (position <= shared)
        tail = position > shared
        return (side.values * inside).sum(dim=1) + ld_alpha * (side.values * tail).sum(dim=1)

    return weighted(chosen), weighted(rejected)


def _wpo_weights(chosen: _TokenLogps, rejected: _TokenLogps) -> torch.Tensor | None:
    """WPO (TRL's ``use_weighting``): each pair's weight, the product of its two sequences'
    length-normalised probabilities; a constant of the pair (no gradient)."""
    if chosen.log_sum_sq_probs is None:
        return None

    def weight(side: _TokenLogps):
        with torch.no_grad():
            aligned = (side.values - side.log_sum_sq_probs) * side.mask
            return torch.exp(aligned.sum(dim=1) / side.mask.sum(dim=1).clamp_min(1))

    return weight(chosen) * weight(rejected)


# ---- TRL's losses, one pair at a time --------------------------------------------------------


@dataclass(frozen=True)
class _Pairs:
    """What TRL's loss types read, one entry per pair (each (B,))."""

    chosen_logratios: torch.Tensor
    rejected_logratios: torch.Tensor
    chosen_scores: torch.Tensor  # the log-ratios through the f-divergence (TRL's f-DPO)
    rejected_scores: torch.Tensor
    chosen_tokens: torch.Tensor  # completion tokens (IPO's and sigmoid_norm's normalisers)
    rejected_tokens: torch.Tensor
    beta: float
    label_smoothing: float
    discopop_tau: float

    @property
    def delta(self):
        return self.chosen_scores - self.rejected_scores

    @property
    def normalised_delta(self):
        return (self.chosen_scores / self.chosen_tokens.clamp(min=1.0)
                - self.rejected_scores / self.rejected_tokens.clamp(min=1.0))


def _exo_pair(p: _Pairs):
    epsilon = torch.tensor(p.label_smoothing, device=p.delta.device)
    logits = p.beta * p.delta
    return (torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-epsilon))
            + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - torch.log(epsilon)))


def _robust(p: _Pairs):
    logits = p.beta * p.delta
    clean = -(1 - p.label_smoothing) * F.logsigmoid(logits)
    flipped = -p.label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1 - 2 * p.label_smoothing)


def _discopop(p: _Pairs):
    logits = p.beta * p.delta
    modulation = torch.sigmoid(logits / p.discopop_tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


# The formulas of trl.DPOTrainer._compute_loss (TRL 1.x), applied to each pair on its own;
# tests/test_hf_dpo.py checks each against TRL's code on one pair.
_PAIR_LOSSES = {
    "sigmoid": lambda p: -F.logsigmoid(p.beta * p.delta),
    "hinge": lambda p: torch.relu(1 - p.beta * p.delta),
    "ipo": lambda p: (p.normalised_delta - 1 / (2 * p.beta)) ** 2,
    "exo_pair": _exo_pair,
    "nca_pair": lambda p: (-F.logsigmoid(p.beta * p.chosen_logratios)
                           - 0.5 * F.logsigmoid(-p.beta * p.chosen_logratios)
                           - 0.5 * F.logsigmoid(-p.beta * p.rejected_logratios)),
    "robust": _robust,
    "bco_pair": lambda p: (-F.logsigmoid(p.beta * p.chosen_logratios)
                           - F.logsigmoid(-p.beta * p.rejected_logratios)),
    "sppo_hard": lambda p: ((p.chosen_logratios - 0.5 / p.beta) ** 2
                            + (p.rejected_logratios + 0.5 / p.beta) ** 2),
    "apo_zero": lambda p: (1 - torch.sigmoid(p.beta * p.chosen_logratios)
                           + torch.sigmoid(p.beta * p.rejected_logratios)),
    "apo_down": lambda p: (torch.sigmoid(p.beta * p.chosen_logratios) + 1
                           - torch.sigmoid(p.beta * (p.chosen_logratios - p.rejected_logratios))),
    "discopop": _discopop,
    "sigmoid_norm": lambda p: -F.logsigmoid(p.beta * p.normalised_delta),
}


@dataclass(frozen=True)
class LossSettings:
    """What TRL's DPO loss is made of: the ``DPOTrainer`` attributes ``_compute_loss`` reads."""

    loss_types: tuple[str, ...]
    loss_weights: tuple[float, ...]
    beta: float
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5

    def __post_init__(self):
        _check_loss_types(self.loss_types)
        if len(self.loss_weights) != len(self.loss_types):
            raise ValueError(f"loss_weights {self.loss_weights} do not match loss_type "
                             f"{self.loss_types}: one weight per loss type")

    @classmethod
    def of(cls, trainer) -> "LossSettings":
        """The settings a ``trl.DPOTrainer`` (or DPDPOTrainer) uses now."""
        return cls(loss_types=tuple(trainer.loss_types), loss_weights=tuple(trainer.loss_weights),
                   beta=trainer.beta, label_smoothing=trainer.label_smoothing,
                   discopop_tau=trainer.args.discopop_tau,
                   f_divergence_type=trainer.f_divergence_type,
                   f_alpha_divergence_coef=trainer.f_alpha_divergence_coef)


def _f_divergence_scores(logratios: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """TRL's f-DPO: the log-ratio through f' of the chosen f-divergence, elementwise."""
    kind = settings.f_divergence_type
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":
        alpha = settings.f_alpha_divergence_coef
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        t = (alpha - 1.0) * logratios
        if t.dtype == torch.float64:  # TRL's table has no float64 entry: its float32 bound
            return (torch.exp(t.clamp(max=80.0)) - 1.0) / (alpha - 1.0)
        bound = 11.0 if t.dtype == torch.float16 else 80.0
        return (torch.exp(t.float().clamp(max=bound)) - 1.0).to(t.dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"DPOConfig.f_divergence_type={kind!r} is not known to DPDPOTrainer")


def pair_losses(*, policy, reference, completion_tokens, settings: LossSettings,
                wpo_weights=None) -> torch.Tensor:
    """TRL's DPO loss of each pair: ``sum_k loss_weights[k] * loss_types[k](pair)``, shape (B,).

    ``trl.DPOTrainer`` returns the mean over the batch of exactly these per-pair values; every
    loss type here is a function of one pair (the sequences' log-probabilities under the policy
    and the reference and their completion lengths), so the pair's gradient depends on that pair
    alone.

    Args:
        policy: (chosen, rejected) sequence log-probabilities under the policy, each (B,).
        reference: the same under the reference model (no gradient).
        completion_tokens: (chosen, rejected) completion token counts, each (B,).
        settings: the loss types, weights and parameters (``LossSettings.of(trainer)``).
        wpo_weights: WPO's per-pair weights (``use_weighting``), or None.
    """
    chosen_logratios = policy[0] - reference[0].to(policy[0].dtype)
    rejected_logratios = policy[1] - reference[1].to(policy[1].dtype)
    pairs = _Pairs(chosen_logratios, rejected_logratios,
                   _f_divergence_scores(chosen_logratios, settings),
                   _f_divergence_scores(rejected_logratios, settings),
                   completion_tokens[0], completion_tokens[1], beta=settings.beta,
                   label_smoothing=settings.label_smoothing, discopop_tau=settings.discopop_tau)
    total = 0.0
    for loss_type, weight in zip(settings.loss_types, settings.loss_weights, strict=True):
        losses = _PAIR_LOSSES[loss_type](pairs)
        if wpo_weights is not None:
            losses = losses * wpo_weights
        total = total + losses * weight
    return total


# ---- refusals --------------------------------------------------------------------------------


def _check_loss_types(loss_types) -> None:
    for loss_type in loss_types:
        if loss_type in _MIXING_LOSSES:
            raise ValueError(
                f"DPOConfig(loss_type={loss_type!r}) is refused by DPDPOTrainer: it "
                f"{_MIXING_LOSSES[loss_type]}, and clipping one pair would no longer bound its "
                "influence. Use a per-pair loss type ('sigmoid', the default, "
                f"{', '.join(repr(t) for t in _PAIR_LOSSES if t != 'sigmoid')})")
        if loss_type not in _PAIR_LOSSES:
            raise ValueError(f"DPOConfig(loss_type={loss_type!r}) is not known to DPDPOTrainer; "
                             f"use one of {', '.join(map(repr, _PAIR_LOSSES))}")


def _refuse_dpo_args(config) -> None:
    loss_type = getattr(config, "loss_type", ["sigmoid"])
    _check_loss_types([loss_type] if isinstance(loss_type, str) else loss_type)
    refusals = [
        (getattr(config, "padding_free", False),
         "padding_free=True is refused by DPDPOTrainer: it concatenates the batch's sequences "
         "into one row, so one row would hold several pairs; set padding_free=False"),
        (getattr(config, "use_liger_kernel", False),
         "use_liger_kernel=True is refused by DPDPOTrainer: Liger's kernels replace the layers "
         "dpfused clips per example; set use_liger_kernel=False"),
        (getattr(config, "sync_ref_model", False),
         "sync_ref_model=True is refused by DPDPOTrainer: it mixes the privately trained policy "
         "into the reference model, whose log-probabilities the guarantee takes as a fixed public "
         "function (and the last-iterate analysis as a fixed loss); set sync_ref_model=False"),
        (getattr(config, "activation_offloading", False),
         "activation_offloading=True is not supported by DPDPOTrainer (its context is TRL's "
         "training_step, which DP training replaces); use gradient_checkpointing=True to save "
         "memory"),
    ]
    for refused, message in refusals:
        if refused:
            raise ValueError(message)


def _refuse_custom_collator(data_collator) -> None:
    if data_collator is not None and not isinstance(data_collator, DataCollatorForPreference):
        raise ValueError(
            f"data_collator={type(data_collator).__name__} is refused by DPDPOTrainer: a pair is "
            "clipped as one example because TRL's DataCollatorForPreference puts its chosen "
            "sequence in row i and its rejected one in row B + i; another collator's layout "
            "could split a pair across example slots. Leave data_collator out (or pass a "
            "DataCollatorForPreference)")


def _refuse_shared_reference(model, ref_model) -> None:
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if any(id(p) in trainable for p in ref_model.parameters()):
        raise ValueError(
            "ref_model shares trainable parameters with model: the reference would move with the "
            "privately trained policy. Pass a separate, frozen copy of the public base model as "
            "ref_model, or leave ref_model out")


_OUR_CLASSES.add(DPDPOTrainer)
