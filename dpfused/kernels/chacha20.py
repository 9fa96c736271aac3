"""ChaCha20 keystream blocks (RFC 8439 §2.3), many blocks per launch.

One ChaCha20 block is 16 32-bit words: the state

    cccccccc  cccccccc  cccccccc  cccccccc      c: the constant "expand 32-byte k"
    kkkkkkkk  kkkkkkkk  kkkkkkkk  kkkkkkkk      k: 256-bit key (8 little-endian words)
    kkkkkkkk  kkkkkkkk  kkkkkkkk  kkkkkkkk
    bbbbbbbb  nnnnnnnn  nnnnnnnn  nnnnnnnn      b: 32-bit block counter, n: 96-bit nonce

after 20 rounds (10 column + diagonal double rounds of quarter rounds), added word by word to
the initial state. Block i of a call uses counter `counter + i`: its low 32 bits in word 12 and
its carry added to word 13 (nonce[0]), so words 12–13 act as one 64-bit little-endian counter.
For counters below 2^32 with no carry this is RFC 8439 exactly; across the boundary it is what
DJB's original ChaCha20 and OpenSSL (hence the `cryptography` package) do. The keystream bytes are
the words in little-endian order, block after block; the op returns them as (num_blocks, 16)
int32 (each word's bits), i.e. that byte stream in memory.

Kernel: one program per BLOCK_B consecutive blocks; each of the 16 state words is a (BLOCK_B,)
vector of uint32 (one block per lane), so the 80 quarter rounds are plain vector arithmetic with
no cross-lane traffic. The output is (num_blocks, 16) int32 in keystream order; each of the 16
stores writes one word of BLOCK_B blocks (a 64-byte stride), and L2 merges the partial sectors
before they reach memory.

Key and nonce come in as a small int64 tensor (cached on the device by the caller), the start
counter as two 32-bit scalars that are never specialized on, so one compiled kernel serves every
key and every counter.
"""

import torch

from ._compat import INTERPRETING_AT_IMPORT, tl, triton
from .dispatch import resolve_impl

WORDS_PER_BLOCK = 16
BYTES_PER_BLOCK = 64
_MASK32 = 0xFFFFFFFF
_MAX_COUNTER = 1 << 64  # the 64-bit counter of words 12-13 must not wrap
_CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k", LE words

# ---------------------------------------------------------------------------------------------
# Autotune configs: (BLOCK_B, num_warps), keyed on the bucketed block count. Each lane holds the
# 16 working words of one block (~32 registers per block it owns). The interpreter gets one.
# ---------------------------------------------------------------------------------------------
_GPU_CONFIGS = [(128, 4), (256, 4), (512, 4), (1024, 8)]
_INTERPRETER_CONFIGS = [(256, 1)]  # the interpreter's cost is per program, not per lane
_CONFIGS = _INTERPRETER_CONFIGS if INTERPRETING_AT_IMPORT else _GPU_CONFIGS
_MAX_LAUNCH_BLOCKS = 2**31  # block offsets within a launch stay below 2^31 (the carry logic)


def _autotune_configs():
    return [triton.Config({"BLOCK_B": bb}, num_warps=w, num_stages=1) for bb, w in _CONFIGS]


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def _rotl(x, N: tl.constexpr):
    return (x << N) | (x >> (32 - N))


@triton.jit
def _quarter_round(a, b, c, d):
    a = a + b
    d = _rotl(d ^ a, 16)
    c = c + d
    b = _rotl(b ^ c, 12)
    a = a + b
    d = _rotl(d ^ a, 8)
    c = c + d
    b = _rotl(b ^ c, 7)
    return a, b, c, d


@triton.jit(do_not_specialize=["start_lo", "start_hi"])
def _chacha20_kernel(
    key_nonce_ptr, out_ptr,
    start_lo, start_hi,
    num_blocks,
    stride_outw, stride_outb,
    NUM_BLOCKS_BUCKET,  # autotune key only
    BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < num_blocks

    # ---- phase 1: the initial state, one block per lane ----------------------------------------
    zero = tl.zeros((BLOCK_B,), dtype=tl.uint32)
    k0 = zero + tl.load(key_nonce_ptr + 0).to(tl.uint32)
    k1 = zero + tl.load(key_nonce_ptr + 1).to(tl.uint32)
    k2 = zero + tl.load(key_nonce_ptr + 2).to(tl.uint32)
    k3 = zero + tl.load(key_nonce_ptr + 3).to(tl.uint32)
    k4 = zero + tl.load(key_nonce_ptr + 4).to(tl.uint32)
    k5 = zero + tl.load(key_nonce_ptr + 5).to(tl.uint32)
    k6 = zero + tl.load(key_nonce_ptr + 6).to(tl.uint32)
    k7 = zero + tl.load(key_nonce_ptr + 7).to(tl.uint32)
    n0 = zero + tl.load(key_nonce_ptr + 8).to(tl.uint32)
    n1 = zero + tl.load(key_nonce_ptr + 9).to(tl.uint32)
    n2 = zero + tl.load(key_nonce_ptr + 10).to(tl.uint32)
    # 64-bit counter start + offs_b, as (low word, carry into word 13); offs_b < 2^31.
    lo = start_lo.to(tl.uint32) + offs_b.to(tl.uint32)
    carry = (lo < start_lo.to(tl.uint32)).to(tl.uint32)
    ctr = lo
    w13 = n0 + start_hi.to(tl.uint32) + carry
    c0 = tl.full((BLOCK_B,), 0x61707865, tl.uint32)  # "expa"
    c1 = tl.full((BLOCK_B,), 0x3320646E, tl.uint32)  # "nd 3"
    c2 = tl.full((BLOCK_B,), 0x79622D32, tl.uint32)  # "2-by"
    c3 = tl.full((BLOCK_B,), 0x6B206574, tl.uint32)  # "te k"

    # ---- phase 2: 10 double rounds (columns, then diagonals) ------------------------------------
    x0, x1, x2, x3 = c0, c1, c2, c3
    x4, x5, x6, x7 = k0, k1, k2, k3
    x8, x9, x10, x11 = k4, k5, k6, k7
    x12, x13, x14, x15 = ctr, w13, n1, n2
    for _ in range(10):
        x0, x4, x8, x12 = _quarter_round(x0, x4, x8, x12)
        x1, x5, x9, x13 = _quarter_round(x1, x5, x9, x13)
        x2, x6, x10, x14 = _quarter_round(x2, x6, x10, x14)
        x3, x7, x11, x15 = _quarter_round(x3, x7, x11, x15)
        x0, x5, x10, x15 = _quarter_round(x0, x5, x10, x15)
        x1, x6, x11, x12 = _quarter_round(x1, x6, x11, x12)
        x2, x7, x8, x13 = _quarter_round(x2, x7, x8, x13)
        x3, x4, x9, x14 = _quarter_round(x3, x4, x9, x14)

    # ---- phase 3: add the initial state; store the words' bits as int32 ------------------------
    out_ptrs = out_ptr + offs_b * stride_outb
    tl.store(out_ptrs + 0 * stride_outw, (x0 + c0).to(tl.int32, bitcast=True), mask=mask_b)
    tl.store(out_ptrs + 1 * stride_outw, (x1 + c1).to(tl.int32, bitcast=True), mask=mask_b)
    tl.store(out_ptrs + 2 * stride_outw, (x2 + c2).to(tl.int32, bitcast=True), mask=mask_b)
    tl.store(out_ptrs + 3 * stride_outw, (x3 + c3).to(tl.int32, bitcast=True), mask=mask_b)
    tl.store(out_ptrs + 4 * stride_outw, (x4 + k0).to(tl.int32, bitcast=True), mask=mask_b)
    tl.store(out_ptrs + 5 * stride_outw, (x5 + k1).to(tl.int32, bitcast=True), mask=mask_b)
    tl.store(out_ptrs + 6 * stride_outw, (x6 + k2).to(tl.int32, bitcast=True), mask=mask_b)
    tl.store(out_ptrs + 7 * stride_outw, (x7 + k3).to(tl.int32, bitcast=True), mask=mask_b)
    tl.store(out_ptrs + 8 * stride_outw, (x8 + k4).to(tl.int32, bitcast=True), mask=mask_b)
    tl.store(out_ptrs + 9 * stride_outw, (x9 + k5).to(tl.int32, bitcast=True), mask=mask_b)
    tl.store(out_ptrs + 10 * stride_outw, (x10 + k6).to(tl.int32, bitcast=True), mask=mask_b)
    tl.store(out_ptrs + 11 * stride_outw, (x11 + k7).to(tl.int32, bitcast=True), mask=mask_b)
    tl.store(out_ptrs + 12 * stride_outw, (x12 + ctr).to(tl.int32, bitcast=True), mask=mask_b)
    tl.store(out_ptrs + 13 * stride_outw, (x13 + w13).to(tl.int32, bitcast=True), mask=mask_b)
    tl.store(out_ptrs + 14 * stride_outw, (x14 + n1).to(tl.int32, bitcast=True), mask=mask_b)
    tl.store(out_ptrs + 15 * stride_outw, (x15 + n2).to(tl.int32, bitcast=True), mask=mask_b)


_chacha20_kernel_tuned = triton.autotune(configs=_autotune_configs(),
                                         key=["NUM_BLOCKS_BUCKET"])(_chacha20_kernel)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def _launch(key_nonce: torch.Tensor, counter: int, num_blocks: int,
            *, config: dict | None = None) -> torch.Tensor:
    """Run the kernel; `config` (BLOCK_B) bypasses autotuning (tests)."""
    out = torch.empty((num_blocks, WORDS_PER_BLOCK), dtype=torch.int32, device=key_nonce.device)
    if num_blocks > 0:
        if num_blocks > _MAX_LAUNCH_BLOCKS:
            raise ValueError(f"num_blocks={num_blocks} exceeds {_MAX_LAUNCH_BLOCKS} (128 GiB of "
                             "keystream) for one launch; split the call")
        kernel = _chacha20_kernel if config else _chacha20_kernel_tuned
        grid = lambda meta: (triton.cdiv(num_blocks, meta["BLOCK_B"]),)  # noqa: E731
        kernel[grid](
            key_nonce, out,
            counter & _MASK32, counter >> 32,
            num_blocks,
            out.stride(1), out.stride(0),
            _bucket(num_blocks),
            **(config or {}),
        )
    return out


def _bucket(num_blocks: int) -> int:
    """Power-of-4 bucket of the block count, so the autotuner re-tunes only on big changes."""
    bucket = 1
    while bucket < num_blocks:
        bucket *= 4
    return bucket


# ---------------------------------------------------------------------------------------------
# Torch reference twin: the same rounds on (4, num_blocks) int64 rows holding 32-bit values
# ---------------------------------------------------------------------------------------------
def _rotl_(x: torch.Tensor, n: int) -> torch.Tensor:
    """In-place 32-bit rotate left of int64 values in [0, 2^32)."""
    high = x >> (32 - n)
    return x.bitwise_left_shift_(n).bitwise_and_(_MASK32).bitwise_or_(high)


def _quarter_rounds_(a, b, c, d) -> None:
    """Four quarter rounds at once, in place: row r of (a, b, c, d) is one quarter round."""
    a.add_(b).bitwise_and_(_MASK32)
    _rotl_(d.bitwise_xor_(a), 16)
    c.add_(d).bitwise_and_(_MASK32)
    _rotl_(b.bitwise_xor_(c), 12)
    a.add_(b).bitwise_and_(_MASK32)
    _rotl_(d.bitwise_xor_(a), 8)
    c.add_(d).bitwise_and_(_MASK32)
    _rotl_(b.bitwise_xor_(c), 7)


def _as_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same 32 bits (v - 2^32 above 2^31 - 1)."""
    return torch.where(words > 0x7FFFFFFF, words - (1 << 32), words).to(torch.int32).contiguous()


def initial_state(key_nonce: torch.Tensor, counter: int, num_blocks: int) -> torch.Tensor:
    """(16, num_blocks) int64 initial ChaCha20 states of blocks counter .. counter+num_blocks-1."""
    device = key_nonce.device
    state = torch.empty((WORDS_PER_BLOCK, num_blocks), dtype=torch.int64, device=device)
    state[0:4] = torch.tensor(_CONSTANTS, dtype=torch.int64, device=device)[:, None]
    state[4:12] = key_nonce[0:8, None]
    block = torch.arange(num_blocks, dtype=torch.int64, device=device) + (counter & _MASK32)
    state[12] = block & _MASK32
    state[13] = (key_nonce[8] + (counter >> 32) + (block >> 32)) & _MASK32
    state[14:16] = key_nonce[9:11, None]
    return state


def chacha20_blocks_torch(key_nonce: torch.Tensor, counter: int, num_blocks: int) -> torch.Tensor:
    """ChaCha20 blocks with torch ops on any device: (num_blocks, 16) int32, keystream order.

    The diagonal round is the column round on rows rotated by 1, 2 and 3 (the usual SIMD layout),
    so each of the 20 rounds is four quarter rounds done at once on (4, num_blocks) rows.
    """
    state = initial_state(key_nonce, counter, num_blocks)
    a, b, c, d = (state[4 * r: 4 * r + 4].clone() for r in range(4))
    for _ in range(10):
        _quarter_rounds_(a, b, c, d)  # columns: (0,4,8,12), (1,5,9,13), ...
        b, c, d = b.roll(-1, 0), c.roll(-2, 0), d.roll(-3, 0)
        _quarter_rounds_(a, b, c, d)  # diagonals: (0,5,10,15), (1,6,11,12), ...
        b, c, d = b.roll(1, 0), c.roll(2, 0), d.roll(3, 0)
    out = torch.cat((a, b, c, d)).add_(state).bitwise_and_(_MASK32)  # (16, num_blocks)
    return _as_int32_bits(out.t())


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def chacha20_blocks(key_nonce: torch.Tensor, *, counter: int, num_blocks: int,
                    impl: str = "auto") -> torch.Tensor:
    """ChaCha20 keystream blocks counter, counter+1, ..., on key_nonce's device.

    Args:
        key_nonce: (11,) int64 tensor: the 8 key words then the 3 nonce words, each the
            little-endian 32-bit value of 4 key/nonce bytes, in [0, 2^32). See `key_nonce_words`.
        counter: first block's counter, 0 <= counter and counter + num_blocks <= 2^64 (words 12-13
            are one 64-bit counter; below 2^32 it is RFC 8439's 32-bit block counter).
        num_blocks: number of 64-byte blocks, >= 0.
        impl: "auto" (Triton on CUDA, else torch), "triton" or "torch".

    Returns:
        (num_blocks, 16) contiguous int32: each keystream word's 32 bits (a word >= 2^31 reads
        as negative), block after block. The memory is RFC 8439's keystream bytes (on a
        little-endian machine, i.e. every device torch runs on), so ``.view(torch.int64)`` gives
        its 64-bit little-endian words. `keystream_bytes` returns the bytes.

    Raises:
        ValueError: bad key_nonce, counter or num_blocks; see dispatch.resolve_impl for `impl`.
    """
    _check_key_nonce(key_nonce)
    for name, value in (("counter", counter), ("num_blocks", num_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int; got {value!r}")
    if counter + num_blocks > _MAX_COUNTER:
        raise ValueError(f"counter + num_blocks ({counter} + {num_blocks}) exceeds 2^64: the block "
                         "counter would wrap and repeat keystream; use a fresh key")
    if resolve_impl(impl, key_nonce) == "torch":
        return chacha20_blocks_torch(key_nonce, counter, num_blocks)
    return _launch(key_nonce, counter, num_blocks)


def key_nonce_words(key: bytes, nonce: bytes = bytes(12), *,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """The (11,) int64 `key_nonce` of a 32-byte key and a 12-byte nonce (RFC 8439 byte order).

    Raises:
        ValueError: a key that is not 32 bytes or a nonce that is not 12 bytes.
    """
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise ValueError(f"key must be 32 bytes; got {type(key).__name__} of length "
                         f"{len(key) if hasattr(key, '__len__') else '?'}")
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != 12:
        raise ValueError(f"nonce must be 12 bytes; got {type(nonce).__name__} of length "
                         f"{len(nonce) if hasattr(nonce, '__len__') else '?'}")
    raw = bytes(key) + bytes(nonce)
    words = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 44, 4)]
    return torch.tensor(words, dtype=torch.int64, device=device)


def keystream_bytes(blocks: torch.Tensor) -> bytes:
    """RFC 8439's keystream bytes of (num_blocks, 16) words: little-endian words, block by block."""
    words = blocks.detach().to("cpu").reshape(-1).numpy()
    return words.astype("<i4").tobytes()


def _check_key_nonce(key_nonce) -> None:
    if not isinstance(key_nonce, torch.Tensor):
        raise ValueError(f"key_nonce must be a torch.Tensor; got {type(key_nonce).__name__}")
    if key_nonce.shape != (11,) or key_nonce.dtype != torch.int64:
        raise ValueError(f"key_nonce must be an (11,) int64 tensor (key_nonce_words builds one); "
                         f"got shape {tuple(key_nonce.shape)} and dtype {key_nonce.dtype}")


__all__ = ["BYTES_PER_BLOCK", "WORDS_PER_BLOCK", "chacha20_blocks", "chacha20_blocks_torch",
           "key_nonce_words", "keystream_bytes"]
