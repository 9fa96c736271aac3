"""chacha20_blocks against RFC 8439's test vectors and the `cryptography` package (OpenSSL).

The Triton kernel runs on CUDA or, without one, on the interpreter (conftest.py); the torch twin
runs on the test device. Both must give the keystream bit for bit.
"""

import os
import random

import pytest
import torch
from kernel_oracles import DEVICE

from dpfused.kernels import chacha20_blocks
from dpfused.kernels import chacha20 as mod

algorithms = pytest.importorskip("cryptography.hazmat.primitives.ciphers.algorithms")
from cryptography.hazmat.primitives.ciphers import Cipher  # noqa: E402

IMPLS = ["triton", "torch"]
RFC_KEY = bytes(range(32))

# RFC 8439 §2.3.2: the serialized block for counter 1.
RFC_232_NONCE = bytes.fromhex("000000090000004a00000000")
RFC_232_BLOCK = bytes.fromhex(
    "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
    "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e")
# RFC 8439 §2.4.2: encryption from counter 1 (two blocks, the second partly used).
RFC_242_NONCE = bytes.fromhex("000000000000004a00000000")
RFC_242_PLAINTEXT = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one "
                     b"tip for the future, sunscreen would be it.")
RFC_242_CIPHERTEXT = bytes.fromhex(
    "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
    "f91b65c5524733ab8f593dabcd62b3571639d624e65152ab8f530c359f0861d8"
    "07ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
    "5af90bbf74a35be6b40b8eedf2785e42874d")


def openssl_keystream(key: bytes, nonce: bytes, counter: int, num_blocks: int) -> bytes:
    """`cryptography`'s ChaCha20 of zeros; its 16-byte nonce is the LE counter then the nonce.

    Past 2^32 blocks the low counter word carries into nonce word 0 (OpenSSL's 64-bit counter).
    cryptography >= 49 refuses to cross that boundary in one call, so each side is its own call.
    """
    out = b""
    while num_blocks > 0:
        part = min(num_blocks, 2**32 - counter)
        iv = counter.to_bytes(4, "little") + nonce
        out += Cipher(algorithms.ChaCha20(key, iv), mode=None).encryptor().update(bytes(64 * part))
        word0 = (int.from_bytes(nonce[:4], "little") + 1) % 2**32
        nonce, counter, num_blocks = word0.to_bytes(4, "little") + nonce[4:], 0, num_blocks - part
    return out


def blocks(key, nonce, counter, num_blocks, impl):
    key_nonce = mod.key_nonce_words(key, nonce, device=DEVICE)
    out = chacha20_blocks(key_nonce, counter=counter, num_blocks=num_blocks, impl=impl)
    assert out.shape == (num_blocks, 16) and out.dtype == torch.int32 and out.is_contiguous()
    return mod.keystream_bytes(out)


@pytest.mark.parametrize("impl", IMPLS)
def test_rfc8439_block_function_vector(impl):
    assert blocks(RFC_KEY, RFC_232_NONCE, 1, 1, impl) == RFC_232_BLOCK


@pytest.mark.parametrize("impl", IMPLS)
def test_rfc8439_encryption_vector(impl):
    stream = blocks(RFC_KEY, RFC_242_NONCE, 1, 2, impl)
    ciphertext = bytes(p ^ k for p, k in zip(RFC_242_PLAINTEXT, stream))
    assert ciphertext == RFC_242_CIPHERTEXT


# One block; one past the interpreter's 256-block tile (a second, masked program).
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_blocks", [1, 257])
def test_matches_cryptography_on_random_keys(impl, num_blocks):
    rng = random.Random(num_blocks)
    key, nonce = rng.randbytes(32), rng.randbytes(12)
    counter = rng.randrange(2**32 - num_blocks)
    assert (blocks(key, nonce, counter, num_blocks, impl)
            == openssl_keystream(key, nonce, counter, num_blocks))


@pytest.mark.parametrize("impl", IMPLS)
def test_counter_carries_into_word_13_like_openssl(impl):
    # Blocks 2^32 - 3 .. 2^32 + 3: the low word wraps and carries into nonce word 0, as OpenSSL
    # does (a 64-bit counter over words 12-13), here on top of a nonzero nonce word 0.
    key, nonce = os.urandom(32), (7).to_bytes(4, "little") + os.urandom(8)
    assert blocks(key, nonce, 2**32 - 3, 6, impl) == openssl_keystream(key, nonce, 2**32 - 3, 6)
    # A counter above 2^32 is the same as its low word with the high word added to the nonce.
    high_nonce = (7 + 5).to_bytes(4, "little") + nonce[4:]
    assert blocks(key, nonce, 5 * 2**32 + 9, 3, impl) == openssl_keystream(key, high_nonce, 9, 3)


def test_triton_and_torch_agree_and_other_tiles():
    key_nonce = mod.key_nonce_words(os.urandom(32), os.urandom(12), device=DEVICE)
    expected = chacha20_blocks(key_nonce, counter=2**32 - 40, num_blocks=77, impl="torch")
    out = mod._launch(key_nonce, 2**32 - 40, 77, config={"BLOCK_B": 64})  # carry in tile 0
    assert torch.equal(out, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_blocks(impl):
    key_nonce = mod.key_nonce_words(bytes(32), device=DEVICE)
    assert chacha20_blocks(key_nonce, counter=0, num_blocks=0, impl=impl).shape == (0, 16)


def test_chacha20_validates_inputs():
    key_nonce = mod.key_nonce_words(bytes(32))
    with pytest.raises(ValueError, match="key_nonce"):
        chacha20_blocks(key_nonce.to(torch.int32), counter=0, num_blocks=1)
    with pytest.raises(ValueError, match="key_nonce"):
        chacha20_blocks(key_nonce[:8], counter=0, num_blocks=1)
    with pytest.raises(ValueError, match="counter"):
        chacha20_blocks(key_nonce, counter=-1, num_blocks=1)
    with pytest.raises(ValueError, match="num_blocks"):
        chacha20_blocks(key_nonce, counter=0, num_blocks=1.0)
    with pytest.raises(ValueError, match="2\\^64"):
        chacha20_blocks(key_nonce, counter=2**64 - 1, num_blocks=2)
    with pytest.raises(ValueError, match="impl"):
        chacha20_blocks(key_nonce, counter=0, num_blocks=1, impl="cuda")
    with pytest.raises(ValueError, match="key must be 32 bytes"):
        mod.key_nonce_words(bytes(16))
    with pytest.raises(ValueError, match="nonce must be 12 bytes"):
        mod.key_nonce_words(bytes(32), bytes(8))
