"""Input checks and small helpers shared by the ops (errors name the offending argument)."""

import contextlib
import math
from typing import NamedTuple

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


# ---- floating-point error bounds (docs/design.md §3, "Floating point") ---------------------------
#
# Every op that feeds a clip factor reports, next to its value, a rigorous bound on how far the value
# can be from the exact one, for ANY input: a clip factor computed from an underestimated norm lets a
# crafted example escape clipping. The bounds are Higham's (Accuracy and Stability of Numerical
# Algorithms, 2nd ed., §3.1): a sum of n terms, in any order, is off by at most gamma_n * (sum of
# |terms|), gamma_n = n u / (1 - n u), u the unit roundoff of the accumulation. SAFETY doubles every
# gamma: tensor cores and some BLAS kernels accumulate with truncation or without guard digits, whose
# per-addition error is up to 2u (Fasi, Higham, Mikaitis, Pranesh 2021).

SAFETY = 2.0


class Estimate(NamedTuple):
    """A computed per-example quantity and a rigorous bound on its error, both (B,) float64.

    |value - exact| <= error for any input. A non-finite value or error means the computation
    overflowed (entries near the dtype's range): the caller must then bound the quantity another way.
    """

    value: torch.Tensor
    error: torch.Tensor


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """Upper bounds of the Euclidean norms of the last dimension, (B, T) float64 from (B, T, d).

    Squares summed in float32 (float64 for float64 input), then rounded up by the sum's gamma: a
    sum of d positive terms is off by at most gamma_d of itself, so the result is never below the
    true norm. Rows whose float32 sum overflows (entries beyond ~1e19) are summed again in float64,
    where every finite fp32/bf16/fp16 row fits. (float32 first: the float64 copy of the strided
    views the rules hand over, such as unfolded convolution inputs, costs ~6x as much.)
    """
    if x.dtype == torch.float64:
        squares = (x * x).sum(dim=-1)
        return (squares * (1 + gamma(x.shape[-1] + 1, torch.float64))).sqrt()
    x = x.float()
    squares = (x * x).sum(dim=-1).double() * (1 + gamma(x.shape[-1] + 1, torch.float32))
    overflowed = ~torch.isfinite(squares)
    if bool(overflowed.any()):
        squares[overflowed] = x[overflowed].double().square().sum(dim=-1)
    return squares.sqrt()


class FactorNorms(NamedTuple):
    """The row norms of a factor pair (left, right), (B, T) float64 each; computed once per piece
    and shared by its norm bound, magnitude and release error."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def magnitude(self) -> torch.Tensor:
        """K_i = Σ_t ‖left_{i,t}‖·‖right_{i,t}‖, (B,) float64: an upper bound of ‖G_i‖."""
        return (self.left * self.right).sum(dim=1)


def factor_norms(left: torch.Tensor, right: torch.Tensor) -> FactorNorms:
    return FactorNorms(row_norms(left), row_norms(right))


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p of an accumulation dtype: float32 2^-24, float64 2^-53 (fp16/bf16 accumulate in fp32)."""
    return 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24


def gamma(n: int, dtype: torch.dtype) -> float:
    """SAFETY * gamma_n: the relative error bound of an n-term sum (or dot product) in ``dtype``'s
    accumulation, n counted generously (every addition and multiplication of a term's path)."""
    nu = SAFETY * max(int(n), 1) * unit_roundoff(dtype)
    if nu >= 0.5:
        return math.inf  # no useful bound: callers then fall back to the magnitude bound
    return nu / (1.0 - nu)


@contextlib.contextmanager
def exact_fp32_matmul():
    """torch matmuls inside run in IEEE float32 on CUDA, never TF32 (HF ``tf32=True`` turns TF32 on
    globally): TF32 rounds the operands to 10-bit mantissas, which the error bounds above do not
    cover. No effect on the CPU."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = saved
