"""Guarded import of Triton, so that `dpfused.kernels` imports on machines without it.

When Triton is missing, `triton` and `tl` below are stand-ins that only make the kernel
definitions in this package importable (decorators return the function unchanged, `tl.constexpr`
is a plain annotation). Nothing can be launched through them: `dispatch.resolve_impl` refuses
`impl="triton"` first, with a clear message.
"""

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised in a subprocess test
    HAS_TRITON = False

    class _StandIn:
        """Attribute sink: any attribute is another stand-in; calling one returns a decorator."""

        def __getattr__(self, name):
            return _StandIn()

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]  # used as a bare decorator: @triton.jit
            return lambda fn: fn  # used as a decorator factory: @triton.autotune(...)

    triton = _StandIn()
    tl = _StandIn()


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1).

    Read when a module is imported (for its autotune configs) and at each launch (to allow CPU
    tensors). Set the variable before importing `dpfused.kernels`, as tests/kernels/conftest.py
    does.
    """
    return os.environ.get("TRITON_INTERPRET") == "1"


# Triton fixes compiled-vs-interpreted when a kernel is decorated, i.e. when this package imports.
INTERPRETING_AT_IMPORT = interpreting()


__all__ = ["HAS_TRITON", "INTERPRETING_AT_IMPORT", "interpreting", "tl", "triton"]
