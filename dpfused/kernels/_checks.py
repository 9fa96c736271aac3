"""Input checks and small helpers shared by the ops (errors name the offending argument)."""

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, *, ndim: int, floating: bool = True) -> None:
    """Raise ValueError unless `t` is a tensor with `ndim` dims and a float (or id) dtype."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims; got shape {tuple(t.shape)}")
    if floating and t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16/bfloat16/float32/float64; got {t.dtype}")
    if not floating and t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be int64 (or int32) ids; got {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise ValueError unless every named tensor is on the first one's device."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "move them to one device")


def check_dim(name: str, size: int, other_name: str, other_size: int) -> None:
    """Raise ValueError when two sizes that must agree do not."""
    if size != other_size:
        raise ValueError(f"{name} ({size}) must equal {other_name} ({other_size})")


def check_scale(scale, batch: int, device: torch.device) -> None:
    """`scale` must be a 1-D float tensor of length B on `device`."""
    check_tensor("scale", scale, ndim=1)
    check_dim("scale.shape[0]", scale.shape[0], "the batch size", batch)
    if scale.device != device:
        raise ValueError(f"scale is on {scale.device} but the inputs are on {device}")


def check_padding_idx(padding_idx, num_embeddings: int | None = None) -> None:
    """`padding_idx` must be None or a non-negative int (below num_embeddings when known)."""
    if padding_idx is None:
        return
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or padding_idx < 0:
        raise ValueError(f"padding_idx must be None or a non-negative int (nn.Embedding stores it "
                         f"normalized); got {padding_idx!r}")
    if num_embeddings is not None and padding_idx >= num_embeddings:
        raise ValueError(f"padding_idx ({padding_idx}) must be < num_embeddings ({num_embeddings})")


def check_ids_range(ids: torch.Tensor, num_embeddings: int) -> None:
    """Ids index rows of a (V, ...) table: they must lie in [0, V). One host sync."""
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_embeddings:
        raise ValueError(f"ids must lie in [0, {num_embeddings}); found values in [{lo}, {hi}]")


def accum_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64 (oracle tests), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype all float operands are promoted to before a Triton launch."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 ("ieee", no TF32 rounding) for fp32 operands.

    TF32 would cost ~1e-3 relative error in the norms; bf16/fp16 operands ignore the setting.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
