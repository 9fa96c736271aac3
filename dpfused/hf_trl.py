"""DP supervised fine-tuning with TRL: ``DPSFTTrainer`` is ``trl.SFTTrainer`` with DPTrainer's DP-SGD.

    trainer = DPSFTTrainer(model=model, args=SFTConfig(..., packing=False), train_dataset=data,
                           processing_class=tokenizer, peft_config=LoraConfig(...),
                           privacy=PrivacyArguments(noise_multiplier=1.0))

Everything in ``dpfused.hf`` holds (logical batches, one noised step each, per-example loss,
epsilon in the logs, no training loss logged unless ``PrivacyArguments.log_loss`` says so, the
secret resume state in ``checkpoint-N`` only). The training loss is each example's mean
next-token loss over its own completion tokens (TRL's ``labels``, -100 on prompt and padding), not
TRL's token mean over the batch; TRL's entropy and token-accuracy metrics are logged in evaluation
only. The same ``DPTrainingMixin`` in front of another Trainer subclass makes that one private:
``class MyDPTrainer(DPTrainingMixin, MyTrainer)``.

Refused: ``packing`` and ``padding_free``, which put several examples in one row (one privacy
unit per row would then be several people's text, and the clipping bound would cover the row, not
the example); ``loss_type`` other than "nll" (DPSFTTrainer trains each example's mean next-token
NLL, ``per_example_loss``; another loss would be silently replaced).

``DPDPOTrainer`` (``trl.DPOTrainer``, one preference pair per example) lives in ``dpfused.hf_dpo``
and is importable from here.
"""

from __future__ import annotations

from dpfused.hf import _OUR_CLASSES, DPTrainingMixin, PrivacyArguments

try:
    from trl import SFTTrainer
except ImportError as error:  # pragma: no cover - the dev extra installs trl
    raise ImportError("dpfused.hf_trl needs TRL: pip install trl") from error

from dpfused.hf_dpo import DPDPOTrainer  # noqa: E402  (DPO: its own module)

__all__ = ["DPDPOTrainer", "DPSFTTrainer", "PrivacyArguments"]


class DPSFTTrainer(DPTrainingMixin, SFTTrainer):
    """``trl.SFTTrainer`` with DP-SGD: ``DPSFTTrainer(..., privacy=PrivacyArguments(...))``.

    Raises:
        ValueError: ``packing=True`` or ``padding_free=True`` (several examples in one row break
            the privacy unit), ``loss_type`` other than "nll", and everything
            ``dpfused.hf.DPTrainer`` refuses.
    """

    def __init__(self, *args, privacy: PrivacyArguments, **kwargs):
        config = kwargs.get("args", args[1] if len(args) > 1 else None)
        if config is not None:
            _refuse_packing(config)
        super().__init__(*args, privacy=privacy, **kwargs)
        _refuse_packing(self.args)


def _refuse_packing(config) -> None:
    if getattr(config, "packing", False):
        raise ValueError(
            "packing=True is refused by DPSFTTrainer: packing puts several examples in one row, so "
            "one row (the unit dpfused clips and samples) mixes several examples and the guarantee "
            "would no longer be per example. Set packing=False (rows are then padded)")
    if getattr(config, "padding_free", False):
        raise ValueError(
            "padding_free=True is refused by DPSFTTrainer: it concatenates the batch's examples "
            "into one row, so per-example clipping would see one example per batch. Set "
            "padding_free=False")
    loss_type = getattr(config, "loss_type", "nll")
    if loss_type != "nll":
        raise ValueError(
            f"loss_type={loss_type!r} is refused by DPSFTTrainer: it trains each example's mean "
            "next-token NLL over its own completion tokens (per_example_loss), so TRL's "
            f"{loss_type!r} loss would be silently replaced. Use loss_type='nll' (--loss_type "
            "nll), or subclass DPSFTTrainer and override per_example_loss")


_OUR_CLASSES.add(DPSFTTrainer)
