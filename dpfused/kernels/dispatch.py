"""Which implementation runs an op, and which norm form a linear-type layer uses.

- `resolve_impl(impl, *tensors)`: every public op calls it to turn `impl="auto" | "triton" |
  "torch"` into the path that runs. "auto" is Triton when every tensor is on CUDA and Triton
  imports, else the torch reference twin. "triton" on CPU works only under the interpreter
  (TRITON_INTERPRET=1).
- `choose_norm_path(seq_len=T, rows=m, cols=n)`: ghost or direct per-example norm by the FLOP model
  of docs/design.md §3. Ghost form costs ~T²·(m+n) per example (two T×T Gram matrices), direct ~T·m·n (build
  G_i = Σ_t left_t ⊗ right_t); ghost wins when T·(m+n) < m·n. At T = 1 the ghost form is just
  ‖left‖²·‖right‖², always the cheaper one.
"""

from typing import Literal

import torch

from ._compat import HAS_TRITON, INTERPRETING_AT_IMPORT, interpreting

_IMPLS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """True when the `triton` package imported (it may still lack a GPU to run on)."""
    return HAS_TRITON


def resolve_impl(impl: str, *tensors: torch.Tensor) -> Literal["triton", "torch"]:
    """Turn an `impl` argument into the path that runs.

    Args:
        impl: "auto", "triton" or "torch".
        *tensors: the op's tensor inputs (all on one device; the op checks that).

    Returns:
        "triton" or "torch".

    Raises:
        ValueError: unknown `impl`; "triton" without the triton package, on CPU tensors outside the
            interpreter, or with float64 inputs (the Triton kernels are fp32/bf16/fp16 only).
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}; got {impl!r}")
    if impl == "torch":
        return "torch"
    has_fp64 = any(t.dtype == torch.float64 for t in tensors)
    all_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        return "triton" if (HAS_TRITON and all_cuda and not has_fp64) else "torch"
    # impl == "triton": refuse loudly rather than fall back.
    if not HAS_TRITON:
        raise ValueError("impl='triton' needs the `triton` package, which is not importable here; "
                         "use impl='torch' or impl='auto'")
    if has_fp64:
        raise ValueError("impl='triton' does not support float64 inputs (float64 is torch-only); "
                         "use impl='torch' for float64 oracles")
    if not all_cuda and not (interpreting() and INTERPRETING_AT_IMPORT):
        raise ValueError("impl='triton' got CPU tensors; Triton kernels run on CUDA, or on the CPU "
                         "only under the interpreter (set TRITON_INTERPRET=1 before importing "
                         "dpfused.kernels)")
    return "triton"


def choose_norm_path(*, seq_len: int, rows: int, cols: int) -> Literal["ghost", "direct"]:
    """Pick the cheaper per-example norm form for a linear-type layer (docs/design.md §3).

    Args:
        seq_len: T, positions per example (1 for 2-D inputs).
        rows: m, the gradient's first dimension (d_out for nn.Linear).
        cols: n, the gradient's second dimension (d_in for nn.Linear).

    Returns:
        "ghost" when T·(m+n) < m·n or T == 1, else "direct".

    Raises:
        ValueError: a size that is not a positive int.
    """
    for name, value in (("seq_len", seq_len), ("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if seq_len == 1:
        return "ghost"
    return "ghost" if seq_len * (rows + cols) < rows * cols else "direct"


__all__ = ["choose_norm_path", "resolve_impl", "triton_available"]
