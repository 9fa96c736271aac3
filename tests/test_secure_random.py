"""ChaCha20Generator: the keystream it reads, and the distributions it draws (scipy tests).

Every statistical test uses a fixed key, so it draws the same numbers on every run: a test that
passes once passes always (each threshold is a p-value of 1e-4 or lower, i.e. a correct generator
under a random key would fail it about once in 10^4 keys).
"""

import copy
import itertools
import math
import pickle

import numpy as np
import pytest
import torch

from dpfused.kernels import chacha20 as chacha
from dpfused.secure_random import NORMAL_DRAWS, ChaCha20Generator

stats = pytest.importorskip("scipy.stats")
algorithms = pytest.importorskip("cryptography.hazmat.primitives.ciphers.algorithms")
from cryptography.hazmat.primitives.ciphers import Cipher  # noqa: E402

P_MIN = 1e-4
KEY = bytes(range(100, 132))
# impl="triton" runs on CUDA, or on the CPU under the interpreter (tests/conftest.py sets it).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gen(impl="auto", key=KEY):
    return ChaCha20Generator(key=key, impl=impl)


def openssl_words(key: bytes, counter: int, num_words: int) -> np.ndarray:
    """The generator's stream: ChaCha20 with 64-bit counter `counter` (words 12-13), zero nonce."""
    num_blocks = -(-num_words // 16)
    stream = b""
    while num_blocks > 0:  # cryptography >= 49 will not carry past 2^32 blocks in one call
        part = min(num_blocks, 2**32 - counter % 2**32)
        iv = counter.to_bytes(8, "little") + bytes(8)
        stream += Cipher(algorithms.ChaCha20(key, iv), mode=None).encryptor().update(
            bytes(64 * part))
        counter, num_blocks = counter + part, num_blocks - part
    return np.frombuffer(stream, dtype="<u4")[:num_words]


# ---------------------------------------------------------------------------------------------
# The keystream
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["auto", "torch", "cryptography", "triton"])
def test_words_are_the_chacha20_keystream_and_blocks_are_never_reused(impl):
    g = gen(impl)
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    first = g.random_words(20, device=device).cpu()  # 2 blocks; block 1's last 12 words dropped
    assert g.counter == 2
    second = g.random_words(16, device=device).cpu()
    assert g.counter == 3
    assert first.dtype == torch.int32
    assert np.array_equal(first.numpy().view(np.uint32), openssl_words(KEY, 0, 20))
    assert np.array_equal(second.numpy().view(np.uint32), openssl_words(KEY, 2, 16))


def test_every_impl_draws_the_same_values():
    # Triton's blocks equal the others' (test above, tests/kernels/test_kernels_chacha20.py);
    # here the draws built on the blocks, on the two fast-to-run impls.
    draws = []
    for impl in ("cryptography", "torch"):
        g, device = gen(impl), (TRITON_DEVICE if impl == "triton" else "cpu")
        draw = (g.rand(37, device=device), g.rand(5, dtype=torch.float32, device=device),
                g.randperm(9, device=device),
                g.normal((3, 4), std=2.5, dtype=torch.float64, device=device))
        draws.append(tuple(x.cpu() for x in draw) + (g.counter,))
    for other in draws[1:]:
        for a, b in zip(draws[0][:4], other[:4]):
            assert torch.equal(a, b)
        assert draws[0][4] == other[4]


def test_without_cryptography_auto_uses_the_torch_twin(monkeypatch):
    from dpfused import secure_random
    expected = gen().random_words(40)
    monkeypatch.setattr(secure_random, "HAS_CRYPTOGRAPHY", False)
    assert torch.equal(gen().random_words(40), expected)
    with pytest.raises(ValueError, match="cryptography"):
        gen("cryptography")


def test_default_keys_come_from_the_os_and_differ():
    a, b = ChaCha20Generator(), ChaCha20Generator()
    assert not torch.equal(a.random_words(8), b.random_words(8))
    assert len(a.state_dict()["key"]) == 32


def test_counter_past_2_to_32_carries_like_openssl():
    g = gen()
    g.load_state_dict({"key": KEY, "counter": 2**32 - 1})
    words = g.random_words(48)
    assert np.array_equal(words.numpy().view(np.uint32), openssl_words(KEY, 2**32 - 1, 48))
    t = gen("torch")
    t.load_state_dict({"key": KEY, "counter": 2**32 - 1})
    assert torch.equal(t.random_words(48), words)


def test_exhausted_stream_refuses_instead_of_wrapping():
    g = gen()
    g.load_state_dict({"key": KEY, "counter": 2**64 - 1})
    g.random_words(16)
    with pytest.raises(RuntimeError, match="fresh key"):
        g.random_words(1)


def test_bits_are_balanced():
    words = gen().random_words(1 << 16).numpy().view(np.uint32)
    bits = (words[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    ones = bits.sum(axis=0)
    p = np.array([stats.binomtest(int(k), len(words), 0.5).pvalue for k in ones])
    assert p.min() > P_MIN / 32, ones


# ---------------------------------------------------------------------------------------------
# Uniforms, masks, permutations
# ---------------------------------------------------------------------------------------------
def test_rand_float64_has_53_random_bits_and_float32_24():
    g = gen()
    u = g.rand((4, 1000))
    assert u.shape == (4, 1000) and u.dtype == torch.float64
    k = u * 2.0**53
    assert torch.equal(k, k.floor()) and u.min() >= 0 and u.max() < 1
    # The lowest of the 53 bits is random too (not always 0, as from a 32-bit source).
    assert 1500 < int((k.long() & 1).sum()) < 2500
    f = g.rand(4000, dtype=torch.float32)
    assert f.dtype == torch.float32 and f.max() < 1
    k32 = f.double() * 2.0**24
    assert torch.equal(k32, k32.floor()) and 1500 < int((k32.long() & 1).sum()) < 2500


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rand_is_uniform_kolmogorov_smirnov(dtype):
    u = gen().rand(200_000, dtype=dtype).double().numpy()
    assert stats.kstest(u, "uniform").pvalue > P_MIN


@pytest.mark.parametrize("q", [0.5, 0.01, 1e-4])
def test_poisson_mask_rate(q):
    n = 1_000_000
    joined = int((gen().rand(n) < q).sum())
    assert stats.binomtest(joined, n, q).pvalue > P_MIN


def test_randperm_is_a_permutation_and_uniform_over_small_n():
    g = gen()
    for n in (0, 1, 2, 1000):
        assert torch.equal(torch.sort(g.randperm(n)).values, torch.arange(n))
    n, draws = 4, 4_800  # 200 expected per permutation
    index = {p: i for i, p in enumerate(itertools.permutations(range(n)))}
    counts = np.zeros(len(index))
    for _ in range(draws):
        counts[index[tuple(g.randperm(n).tolist())]] += 1
    assert stats.chisquare(counts).pvalue > P_MIN


def test_randperm_redraws_on_tied_keys(monkeypatch):
    g = gen()
    calls = []
    real = g.random_words

    def tie_first(num_words, *, device="cpu"):
        words = real(num_words, device=device)
        if not calls:
            words[2:4] = words[0:2]  # keys 0 and 1 equal: the permutation would be biased
        calls.append(num_words)
        return words

    monkeypatch.setattr(g, "random_words", tie_first)
    perm = g.randperm(5)
    assert len(calls) == 2 and sorted(perm.tolist()) == list(range(5))


# ---------------------------------------------------------------------------------------------
# Gaussian noise
# ---------------------------------------------------------------------------------------------
def test_normal_is_the_documented_sum_of_four_box_muller_draws():
    # White box: std/2 times the sum of 4 Box-Muller draws from 53-bit uniforms, per docstring.
    noise = gen().normal(5, std=3.0, dtype=torch.float64)
    u = gen().rand((NORMAL_DRAWS, 2, 3))  # 3 pairs give 6 >= 5 values per draw
    radius = torch.sqrt(-2.0 * torch.log1p(-u[:, 0]))
    angle = 2.0 * math.pi * u[:, 1]
    draws = torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)), dim=1)  # (4, 6)
    assert torch.allclose(noise, 1.5 * draws.sum(0)[:5], rtol=1e-14, atol=0)
    assert NORMAL_DRAWS == 4


def anderson_normal_passes(z) -> bool:
    """Anderson-Darling (weighted toward the tails) normality test at the 1% level."""
    try:
        return stats.anderson(z, dist="norm", method="interpolate").pvalue > 0.01
    except TypeError:  # scipy < 1.17: no `method`, critical values instead
        ad = stats.anderson(z, dist="norm")
        return ad.statistic < ad.critical_values[-1]


@pytest.fixture(scope="module")
def noise():
    """2^19 float64 draws of N(0, 3^2) under a fixed key."""
    return gen().normal(1 << 19, std=3.0, dtype=torch.float64).numpy()


def test_normal_moments(noise):
    n, std = len(noise), 3.0
    z = noise / std
    # mean ~ N(0, 1/n); variance: (n-1) s^2 ~ chi2(n-1); kurtosis via scipy's normality test.
    assert abs(z.mean()) * math.sqrt(n) < stats.norm.isf(P_MIN / 2)
    chi2 = (n - 1) * z.var(ddof=1)
    assert min(stats.chi2.cdf(chi2, n - 1), stats.chi2.sf(chi2, n - 1)) > P_MIN / 2
    assert stats.kurtosistest(z).pvalue > P_MIN
    assert stats.skewtest(z).pvalue > P_MIN


def test_normal_distribution_and_tails(noise):
    z = noise / 3.0
    assert stats.kstest(z, "norm").pvalue > P_MIN
    assert anderson_normal_passes(z)
    for t in (3.0, 4.0):  # two-sided tail counts against the Gaussian's
        observed = int((np.abs(z) > t).sum())
        expected = len(z) * 2 * stats.norm.sf(t)
        p = stats.poisson.cdf(observed, expected), stats.poisson.sf(observed - 1, expected)
        assert min(p) > P_MIN / 2, (t, observed, expected)


def test_normal_dtypes_shapes_and_zero_std():
    g = gen()
    x = g.normal((2, 3, 4), std=1.0)
    assert x.shape == (2, 3, 4) and x.dtype == torch.float32
    assert g.normal(torch.Size([7]), std=1.0, dtype=torch.bfloat16).dtype == torch.bfloat16
    counter = g.counter
    assert torch.equal(g.normal(6, std=0.0), torch.zeros(6))
    assert g.counter == counter  # nothing drawn
    assert g.normal(0, std=1.0).shape == (0,)


def test_normal_in_chunks_is_consecutive_draws(monkeypatch):
    from dpfused import secure_random
    monkeypatch.setattr(secure_random, "_CHUNK_VALUES", 4)
    chunked = gen().normal((2, 5), std=2.0, dtype=torch.float64)
    g = gen()
    parts = [g.normal(k, std=2.0, dtype=torch.float64) for k in (4, 4, 2)]
    assert torch.equal(chunked.reshape(-1), torch.cat(parts))


# ---------------------------------------------------------------------------------------------
# State, secrecy, bad input
# ---------------------------------------------------------------------------------------------
def test_state_dict_resumes_the_stream():
    g = gen()
    g.normal(100, std=1.0)
    state = g.state_dict()
    expected = g.rand(50), g.randperm(10)
    h = ChaCha20Generator()
    h.load_state_dict(state)
    assert torch.equal(h.rand(50), expected[0]) and torch.equal(h.randperm(10), expected[1])
    assert h.counter == g.counter


def test_get_state_set_state_like_torch_generator():
    # The sampler clones an epoch's start state, restores it to replay the epoch, and engine
    # broadcasts it to every rank: all through get_state/set_state, as with torch.Generator.
    g = gen()
    g.rand(10)
    state = g.get_state()
    assert state.dtype == torch.uint8 and state.shape == (48,)
    expected = g.randperm(20)
    saved = state.clone()
    g.rand(3)
    g.set_state(saved)
    assert torch.equal(g.randperm(20), expected)
    h = ChaCha20Generator()
    h.set_state(saved)
    assert torch.equal(h.randperm(20), expected) and h.state_dict() == g.state_dict()
    g.load_state_dict({"key": KEY, "counter": 2**64})  # used up: still representable
    assert int.from_bytes(bytes(g.get_state()[32:].tolist()), "little") == 2**64
    with pytest.raises(ValueError, match="uint8"):
        g.set_state(saved.to(torch.int64))
    with pytest.raises(ValueError, match="counter"):
        g.set_state(torch.full((48,), 255, dtype=torch.uint8))


def test_copies_and_pickles_are_refused_and_repr_hides_the_key():
    g = gen()
    for clone in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="state_dict"):
            clone(g)
    assert KEY.hex() not in repr(g) and "key" not in repr(g)


def test_bad_input_is_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="key must be 32 bytes"):
        ChaCha20Generator(key=bytes(16))
    with pytest.raises(ValueError, match="impl"):
        ChaCha20Generator(impl="aes")
    g = gen()
    for std in (-1.0, math.nan, math.inf, "1", True):
        with pytest.raises(ValueError, match="std"):
            g.normal(3, std=std)
    with pytest.raises(TypeError, match="dtype"):
        g.normal(3, std=1.0, dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype"):
        g.rand(3, dtype=torch.float16)
    for size in (-1, 2.5, "3", (2, -1)):
        with pytest.raises(ValueError, match="size"):
            g.rand(size)
    with pytest.raises(ValueError, match="n must be"):
        g.randperm(-3)
    with pytest.raises(ValueError, match="num_words"):
        g.random_words(1.5)
    with pytest.raises(ValueError, match="'key' and 'counter'"):
        g.load_state_dict({"key": KEY})
    with pytest.raises(ValueError, match="counter"):
        g.load_state_dict({"key": KEY, "counter": -1})
    with pytest.raises(ValueError, match="key must be 32 bytes"):
        g.load_state_dict({"key": "00" * 32, "counter": 0})
    with pytest.raises(ValueError, match="CPU only"):
        ChaCha20Generator(key=KEY, impl="cryptography").random_words(1, device="meta")
