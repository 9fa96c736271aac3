"""A cryptographically secure random source for noise and batch sampling (``secure_mode=True``).

torch's generators (Mersenne Twister on the CPU, Philox on CUDA) are fast and statistically good,
but not unpredictable: whoever sees enough output, or guesses the seed, can reproduce the noise
and subtract it from the released gradients. `ChaCha20Generator` draws everything from the
ChaCha20 keystream (RFC 8439) under a 256-bit key from the operating system (``os.urandom``):
predicting any of its output without the key is as hard as breaking ChaCha20.

Keystream. The generator reads the keystream block by block: block ``i`` is the ChaCha20 block with
64-bit counter ``i`` (words 12–13; nonce words 14–15 zero), see `dpfused.kernels.chacha20`.
``counter`` (the next unused block) only moves forward; every call takes whole blocks and drops
the words it does not use, so no block feeds two draws. The blocks are computed on the device the
output lives on: by a Triton kernel on CUDA (a step never waits for the CPU), by OpenSSL through
the ``cryptography`` package on the CPU (or by the torch twin of the kernel when ``cryptography``
is not installed). All three give the same bits, so a key and a counter give the same words,
uniforms and permutations on every device (Gaussian values may differ in their last bits: each
device's math library computes log, cos and sin).

Secrecy. The key *is* the noise: anyone who holds it can recompute every noise vector and strip it
from the released model updates. ``state_dict()`` and ``get_state()`` contain the key; a checkpoint
that holds either must be kept as secret as the training data. Copying or pickling the generator
is refused (a copy would replay the same keystream); restore one explicitly with
``load_state_dict`` or ``set_state``, which replay the stream from the saved counter: fine for
resuming, where the steps after the checkpoint are redone and their earlier results discarded,
and for a sampler regenerating an epoch's batches; but never use one state for two runs whose
outputs are both released (equal noise on two releases leaks their difference).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dpfused.arguments import check_choice, check_integer, check_number

from .kernels.chacha20 import BYTES_PER_BLOCK, WORDS_PER_BLOCK, chacha20_blocks, key_nonce_words

try:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    HAS_CRYPTOGRAPHY = True
except ImportError:  # pragma: no cover - the torch twin computes the same blocks, only slower
    HAS_CRYPTOGRAPHY = False

__all__ = ["ChaCha20Generator"]

KEY_BYTES = 32
_COUNTER_BYTES = 16  # in get_state(); the counter reaches 2^64 when the stream is used up
IMPLS = ("auto", "triton", "torch", "cryptography")
_MAX_COUNTER = 1 << 64
_MASK32 = 0xFFFFFFFF

# Gaussian noise: the sum of NORMAL_DRAWS independent N(0, 1) draws, times std / sqrt(NORMAL_DRAWS)
# (Holohan & Braghin 2021, as Opacus' secure mode does with 4 draws; see `normal`).
NORMAL_DRAWS = 4
# At most this many output values are drawn at once (bounds the int64 keystream buffer: 8 words
# per Gaussian value, i.e. 64 MiB for 2^20 values).
_CHUNK_VALUES = 1 << 20


class ChaCha20Generator:
    """Uniforms, permutations and Gaussian noise from the ChaCha20 keystream (see module docstring).

    Every draw is keyword-only and takes its ``device``; the output is computed there.

    Args:
        key: 32 secret bytes. None (the default, and the only choice for real training) draws them
            from ``os.urandom``; pass a fixed key only in tests.
        impl: where the keystream is computed: "auto" (Triton on CUDA; OpenSSL through
            ``cryptography`` on the CPU, else the torch twin), "triton", "torch" or
            "cryptography" (CPU only). Every choice gives the same bits.

    Raises:
        ValueError: a key that is not 32 bytes, an unknown ``impl``, or "cryptography" without
            the package.
    """

    def __init__(self, *, key: bytes | None = None, impl: str = "auto") -> None:
        check_choice("impl", impl, IMPLS)
        if impl == "cryptography" and not HAS_CRYPTOGRAPHY:
            raise ValueError("impl='cryptography' needs the `cryptography` package "
                             "(pip install cryptography); or use impl='auto'")
        self.impl = impl
        self._key = _check_key(os.urandom(KEY_BYTES) if key is None else key)
        self._counter = 0
        self._key_nonce: dict[torch.device, torch.Tensor] = {}  # device -> (11,) key words

    @property
    def counter(self) -> int:
        """The next unused keystream block; every draw advances it."""
        return self._counter

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}(counter={self._counter}, impl={self.impl!r})"

    # -- uniform draws -----------------------------------------------------------------------
    def random_words(self, num_words: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
        """``num_words`` fresh 32-bit keystream words as int32 (each word's bits), contiguous.

        Consecutive pairs viewed as int64 (``.view(torch.int64)``) are the keystream's 64-bit
        little-endian words.

        Raises:
            ValueError: a negative or non-int ``num_words``.
        """
        num_words = check_integer("num_words", num_words, at_least=0)
        num_blocks = -(-num_words // WORDS_PER_BLOCK)
        start = self._reserve(num_blocks)
        blocks = self._blocks(start, num_blocks, torch.device(device))
        return blocks.reshape(-1)[:num_words]

    def rand(self, size: int | Sequence[int], *, dtype: torch.dtype = torch.float64,
             device: torch.device | str = "cpu") -> torch.Tensor:
        """Uniform floats in [0, 1): multiples of 2^-53 (float64) or 2^-24 (float32), all equally
        likely.

        Poisson sampling draws ``rand(N) < q``: in float64 an index joins with probability q up
        to 2^-53 (float32 would round q to a multiple of 2^-24).

        Args:
            size: output shape (an int or a sequence of ints).
            dtype: torch.float64 (53 random bits per value, two keystream words) or torch.float32
                (24 bits, one word).
            device: where the draw is computed and returned.

        Raises:
            ValueError: a bad size; TypeError: another dtype.
        """
        shape = _check_shape(size)
        numel = math.prod(shape)
        if dtype == torch.float64:
            return _uniform53(self.random_words(2 * numel, device=device)).reshape(shape)
        if dtype == torch.float32:
            words = self.random_words(numel, device=device)
            top24 = (words >> 8).bitwise_and_(0xFFFFFF)  # the word's 24 high bits
            return top24.to(torch.float32).mul_(2.0 ** -24).reshape(shape)
        raise TypeError(f"dtype must be torch.float64 or torch.float32; got {dtype}")

    def randperm(self, n: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
        """A uniformly random permutation of 0 .. n-1 (int64).

        Sorts n random 64-bit keys; the draw is redone (rarely: probability < n^2 / 2^65) while
        two keys tie, so every permutation is exactly equally likely, with no modulo bias.

        Raises:
            ValueError: a negative or non-int ``n``.
        """
        n = check_integer("n", n, at_least=0)
        while True:
            keys = self.random_words(2 * n, device=device).view(torch.int64)  # (n,)
            sorted_keys, order = torch.sort(keys)
            if n < 2 or not bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
                return order

    # -- Gaussian noise ----------------------------------------------------------------------
    def normal(self, size: int | Sequence[int], *, std: float, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """Gaussian noise N(0, std^2) that resists the floating-point attack on textbook samplers.

        The attack (Mironov 2012, for Laplace; Holohan & Braghin 2021 for Gaussians from
        Box–Muller and the polar method): a sampler that maps a uniform float through log/sqrt/cos
        reaches only a sparse, irregular set of floating-point values, so a released
        ``value + noise`` can rule out candidate values and reveal ``value``. The mitigation of
        Holohan & Braghin (2021), the one Opacus' secure mode uses: return the sum of several
        independent Gaussian draws, whose reachable set is dense. Exactly what is computed here,
        in float64:

        1. uniforms u1, u2 with 53 random bits each (`rand`, two keystream words per uniform);
        2. Box–Muller: ``r = sqrt(-2 log1p(-u1))`` (1 - u1 lies in (0, 1], so r is finite),
           ``z = r cos(2π u2)`` and ``r sin(2π u2)``, two N(0, 1) draws per pair;
        3. ``NORMAL_DRAWS = 4`` independent such draws per output value, summed, times
           ``std / 2`` (= std / sqrt(4)): the sum has variance exactly std^2, as Opacus' sum of
           four N(0, std^2) draws divided by 2;
        4. rounded once to ``dtype`` at the end.

        Each value thus costs 8 keystream words (32 bytes). This mitigates the attack; it is not
        a proof of exact floating-point DP (a discrete Gaussian sampler would be).

        Args:
            size: output shape (an int or a sequence of ints).
            std: standard deviation, finite and >= 0 (0 gives zeros and draws nothing).
            dtype: a float dtype; bfloat16/float16 are computed in float64 and rounded like the
                rest (the privacy engine adds noise in float32 or wider).
            device: where the noise is computed and returned.

        Raises:
            ValueError: a bad size or std; TypeError: a non-float dtype.
        """
        shape = _check_shape(size)
        std = check_number("std", std, "a finite number >= 0",
                           lambda v: math.isfinite(v) and v >= 0)
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype; got {dtype}")
        numel = math.prod(shape)
        out = torch.empty(numel, dtype=dtype, device=device)
        if std == 0.0:
            return out.zero_().reshape(shape)
        scale = std / math.sqrt(NORMAL_DRAWS)
        for start in range(0, numel, _CHUNK_VALUES):
            stop = min(numel, start + _CHUNK_VALUES)
            out[start:stop] = self._standard_normal_sum(stop - start, device).mul_(scale)
        return out.reshape(shape)

    def _standard_normal_sum(self, count: int, device) -> torch.Tensor:
        """``count`` float64 sums of NORMAL_DRAWS independent Box–Muller N(0, 1) draws."""
        pairs = -(-count // 2)
        u = self.rand((NORMAL_DRAWS, 2, pairs), dtype=torch.float64, device=device)
        radius = u[:, 0].neg().log1p_().mul_(-2.0).sqrt_()  # (draws, pairs)
        angle = u[:, 1].mul_(2.0 * math.pi)
        z = torch.empty_like(u)  # (draws, 2, pairs): the cos draws, then the sin draws
        torch.cos(angle, out=z[:, 0]).mul_(radius)
        torch.sin(angle, out=z[:, 1]).mul_(radius)
        return z.sum(dim=0).reshape(-1)[:count]  # (count,)

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"key": bytes, "counter": int}``. SECRET: whoever holds the key can recompute the
        noise; keep a checkpoint holding this as secret as the training data."""
        return {"key": self._key, "counter": self._counter}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the saved stream (same key, from the saved counter); see the module docstring
        on replaying.

        Raises:
            ValueError: a state without a 32-byte key or a valid counter.
        """
        if not isinstance(state, Mapping) or set(state) != {"key", "counter"}:
            raise ValueError("state must be a mapping with exactly 'key' and 'counter' (from "
                             f"ChaCha20Generator.state_dict()); got {_describe(state)}")
        counter = check_integer("state['counter']", state["counter"], at_least=0,
                                at_most=_MAX_COUNTER)
        self._key = _check_key(state["key"])
        self._counter = counter
        self._key_nonce.clear()

    def get_state(self) -> torch.Tensor:
        """The state as a (48,) uint8 CPU tensor: the key, then the counter in 16 little-endian
        bytes. SECRET, like `state_dict`.

        The shape of ``torch.Generator.get_state()``: code that saves, clones, broadcasts
        (``torch.distributed.broadcast``) and restores a generator's state works unchanged.
        """
        raw = self._key + self._counter.to_bytes(_COUNTER_BYTES, "little")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    def set_state(self, state: torch.Tensor) -> None:
        """Restore a `get_state` tensor (same as `load_state_dict`; see it on replaying).

        Raises:
            ValueError: not a (48,) uint8 tensor, or a counter above 2^64.
        """
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.shape != (
                KEY_BYTES + _COUNTER_BYTES,):
            raise ValueError(f"state must be a ({KEY_BYTES + _COUNTER_BYTES},) uint8 tensor from "
                             f"ChaCha20Generator.get_state(); got {_describe(state)}")
        raw = bytes(state.cpu().tolist())
        self.load_state_dict({"key": raw[:KEY_BYTES],
                              "counter": int.from_bytes(raw[KEY_BYTES:], "little")})

    def __reduce__(self):
        raise TypeError(f"{type(self).__name__} cannot be copied or pickled: a copy would replay "
                        "the same keystream; checkpoint it with state_dict() (secret) instead")

    # -- keystream ---------------------------------------------------------------------------
    def _reserve(self, num_blocks: int) -> int:
        """Take ``num_blocks`` blocks; the counter moves first, so a failed draw never reuses."""
        start = self._counter
        if start + num_blocks > _MAX_COUNTER:
            raise RuntimeError("ChaCha20Generator exhausted its 2^64 keystream blocks; "
                               "create a new generator (fresh key)")
        self._counter = start + num_blocks
        return start

    def _blocks(self, start: int, num_blocks: int, device: torch.device) -> torch.Tensor:
        """(num_blocks, 16) int64 keystream words of blocks start .. start+num_blocks-1."""
        if device.type == "cpu" and self.impl in ("auto", "cryptography") and HAS_CRYPTOGRAPHY:
            return _openssl_blocks(self._key, start, num_blocks)
        if self.impl == "cryptography":
            raise ValueError(f"impl='cryptography' runs on the CPU only; got device {device}")
        impl = "auto" if self.impl == "auto" else self.impl
        return chacha20_blocks(self._key_nonce_on(device), counter=start, num_blocks=num_blocks,
                               impl=impl)

    def _key_nonce_on(self, device: torch.device) -> torch.Tensor:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._key_nonce:
            self._key_nonce[device] = key_nonce_words(self._key, device=device)
        return self._key_nonce[device]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _openssl_blocks(key: bytes, start: int, num_blocks: int) -> torch.Tensor:
    """The same blocks as `chacha20_blocks`, by OpenSSL: the keystream is ChaCha20 of zeros.

    ``cryptography``'s 16-byte nonce is words 12–15: the 64-bit counter, then the zero nonce.
    cryptography >= 49 refuses to carry the low counter word into word 13, so a request is cut at
    every multiple of 2^32 blocks and each part starts with its own high word.
    """
    stream = bytearray(num_blocks * BYTES_PER_BLOCK)
    done = 0
    while done < num_blocks:
        counter = start + done
        part = min(num_blocks - done, 2**32 - counter % 2**32)
        nonce = counter.to_bytes(8, "little") + bytes(8)
        encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        view = memoryview(stream)[done * BYTES_PER_BLOCK:(done + part) * BYTES_PER_BLOCK]
        encryptor.update_into(bytes(len(view)), view)
        done += part
    words = np.frombuffer(stream, dtype="<i4")
    return torch.from_numpy(words.copy()).view(num_blocks, WORDS_PER_BLOCK)


def _uniform53(words: torch.Tensor) -> torch.Tensor:
    """Float64 uniforms k / 2^53, k the top 53 bits of each 64-bit little-endian keystream word."""
    top53 = (words.view(torch.int64) >> 11).bitwise_and_((1 << 53) - 1)  # drops the sign fill
    return top53.to(torch.float64).mul_(2.0 ** -53)


def _check_key(key) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes (None draws them from os.urandom); got "
                         f"{_describe(key)}")
    return bytes(key)


def _check_shape(size) -> tuple[int, ...]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (size,)
    if not isinstance(size, (Sequence, torch.Size)) or isinstance(size, (str, bytes)):
        raise ValueError(f"size must be an int or a sequence of ints; got {size!r}")
    return tuple(check_integer("size", s, at_least=0) for s in size)


def _describe(value) -> str:
    """A value's type and size, never its content (keys are secret)."""
    if isinstance(value, (bytes, bytearray)):
        return f"{type(value).__name__} of length {len(value)}"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {sorted(map(str, value))}"
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__
