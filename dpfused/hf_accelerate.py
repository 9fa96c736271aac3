"""HuggingFace accelerate: what make_private takes from ``accelerator.prepare`` (design.md §9).

The supported order: ``model, optimizer = accelerator.prepare(model, optimizer)`` (accelerate wraps
the model in DistributedDataParallel, or shards it with FSDP2's ``fully_shard``, and wraps the
optimizer in its ``AcceleratedOptimizer``), then ``engine.make_private(module=model,
optimizer=optimizer, data_loader=<the DataLoader NOT prepared by accelerate>, ...)``.

- The DP data loader is dpfused's: it draws each logical batch with the sampling the accountant
  assumes and gives every rank its slice. A loader prepared by accelerate (which gives each process
  batches of its own) is refused. The ``DPDataLoader`` make_private returns is not a torch
  DataLoader, so ``accelerator.prepare`` hands it back unchanged.
- The ``AcceleratedOptimizer`` is unwrapped: the DP optimizer steps the torch optimizer inside, so
  a step whose noise was drawn and accounted always updates the model (accelerate's wrapper skips
  steps under gradient accumulation or a GradScaler overflow).
- Refused, from accelerate's own state: gradient accumulation (``gradient_accumulation_steps`` > 1;
  ``max_physical_batch_size`` is the DP way), fp16 and fp8 mixed precision (a GradScaler scales the
  loss, so per-example norms would be clipped in scaled units), DeepSpeed and Megatron-LM (their
  engines own backward and the gradient reduction).

accelerate is never imported here: when the user's program has not imported it, nothing can come
from it.
"""

from __future__ import annotations

import sys

__all__ = ["check_accelerator_state", "refuse_prepared_loader", "unwrap_optimizer"]

_GRADIENT_ACCUMULATION = (
    "accelerate's gradient accumulation (gradient_accumulation_steps={steps}) adds the gradients "
    "of several batches and skips the optimizer step in between, but a DP step releases one "
    "noised sum of clipped per-example gradients per logical batch, the batch the accountant "
    "counts. Use Accelerator(gradient_accumulation_steps=1) and make_private("
    "max_physical_batch_size=...): dpfused splits each logical batch into physical batches and "
    "steps once per logical batch")


def refuse_prepared_loader(data_loader) -> None:
    """Refuse a loader returned by ``accelerator.prepare`` (DataLoaderShard, DataLoaderDispatcher,
    SkipDataLoader): it yields batches of this process only, sharded by accelerate.

    Raises:
        TypeError: naming the loader's type, why, and the fix.
    """
    if type(data_loader).__module__.split(".")[0] != "accelerate":
        return
    raise TypeError(
        f"data_loader is accelerate's {type(data_loader).__name__} (returned by "
        "accelerator.prepare): pass the DataLoader from before accelerator.prepare(). dpfused "
        "draws each logical batch itself (Poisson, cyclic or shuffled, as the accountant assumes) "
        "and gives every rank its slice; accelerate's loader gives each process batches of its "
        "own. Prepare the model and optimizer with accelerate, not the DP data loader")


def unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (else ``optimizer``),
    after refusing what a DP step cannot honour (``check_accelerator_state``)."""
    accelerate_optimizer = _accelerate_attr("optimizer", "AcceleratedOptimizer")
    if accelerate_optimizer is None:
        return optimizer
    check_accelerator_state()
    while isinstance(optimizer, accelerate_optimizer):
        if optimizer.scaler is not None:
            raise ValueError(
                "optimizer is an AcceleratedOptimizer with a GradScaler (accelerate's fp16 mixed "
                "precision): the scaler multiplies the loss, so per-example norms would be "
                "clipped in scaled units. Use Accelerator(mixed_precision='bf16') (autocast, no "
                "scaler) or 'no'")
        optimizer = optimizer.optimizer
    return optimizer


def check_accelerator_state() -> None:
    """Refuse accelerate settings that change what a DP step releases (module docstring).

    Reads accelerate's shared state (set by ``Accelerator(...)``) without creating it.

    Raises:
        ValueError: gradient accumulation, fp16/fp8 mixed precision, DeepSpeed or Megatron-LM.
    """
    accelerator_state = _accelerate_attr("state", "AcceleratorState")
    gradient_state = _accelerate_attr("state", "GradientState")
    if accelerator_state is None or gradient_state is None:
        return
    state = accelerator_state._shared_state
    steps = gradient_state._shared_state.get("plugin_kwargs", {}).get("num_steps", 1)
    if steps > 1:
        raise ValueError(_GRADIENT_ACCUMULATION.format(steps=steps))
    precision = str(state.get("_mixed_precision", "no"))
    if precision in ("fp16", "fp8"):
        raise ValueError(
            f"accelerate's mixed_precision='{precision}' is not supported: it scales the loss "
            "(GradScaler), so per-example norms would be clipped in scaled units. Use "
            "Accelerator(mixed_precision='bf16') (autocast, no scaler) or 'no'")
    kind = str(state.get("distributed_type", "")).split(".")[-1]
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise ValueError(
            f"accelerate with {kind} is not supported: its engine runs backward and reduces the "
            "gradients itself, before dpfused could clip each example. Use accelerate's FSDP2 "
            "(fsdp_version: 2) or plain multi-process (DistributedDataParallel) configuration")


def _accelerate_attr(module: str, name: str):
    """``accelerate.<module>.<name>`` if the program has imported accelerate, else None."""
    if "accelerate" not in sys.modules:
        return None
    from importlib import import_module

    return getattr(import_module(f"accelerate.{module}"), name, None)
