"""Crafted examples against the clip (issues 19.1, 25.1, 26.1-26.4; docs/design.md §3 "Floating point").

Each test builds a batch D of ordinary examples plus one crafted example, and D' without it (the
zero-out neighbour: the others keep their slots). With sigma = 0 and a summed loss the released
update is the clipped sum S, so privacy demands ||S(D) - S(D')|| <= C for every input, up to the
rounding of the others' sum (stated in docs/design.md §3: a relative 2^-53 per float64 addition of
examples and one float32 rounding of the total). Every test here failed on 0c36fdd.

The probe models make any per-example factor pair reachable: a bias-free linear applied per token
with per-token output-gradient targets c_t (loss sum_t <W a_t, c_t>) gives example i the weight
gradient G_i = sum_t c_t a_t^T exactly, whatever (c_t, a_t) the attacker picks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpfused.instrument import detach, instrument

C = 1.0
MODES = ["flat", "per_layer"]


class Probe(nn.Module):
    """out_t = W a_t; the batch loss sum_{i,t} <out_{i,t}, c_{i,t}> (targets c given per token)."""

    def __init__(self, d_in, d_out, dtype=torch.float32):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=False, dtype=dtype)

    def forward(self, a, c):  # (B, T, n), (B, T, m)
        return (self.linear(a) * c).sum()


class TwiceProbe(nn.Module):
    """One weight used twice (two calls of one Linear), T = 1 per call: the cross-term path."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=False)

    def forward(self, a1, c1, a2, c2):  # (B, n), (B, m), (B, n), (B, m)
        return (self.linear(a1) * c1).sum() + (self.linear(a2) * c2).sum()


class WeightedEmbedding(nn.Module):
    """Embedding x per-token weight -> Linear (the crafted-id attack of issue 26.1)."""

    def __init__(self, vocab=5, dim=16):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, 1)

    def forward(self, ids, weights):  # (B, T), (B, T)
        return self.head(self.embedding(ids) * weights.unsqueeze(-1)).sum()


class TiedProbe(nn.Module):
    """An embedding tied to a linear head; loss sum_t w_t <E[ids_t], q> + sum_s <W x_s, c_s>."""

    def __init__(self, vocab=6, dim=8):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embedding.weight
        self.query = torch.randn(dim)

    def forward(self, ids, w, x, c):  # (B, T), (B, T), (B, S, D), (B, S, V)
        looked_up = (self.embedding(ids) * self.query).sum(-1)  # (B, T)
        return (looked_up * w).sum() + (self.head(x) * c).sum()


def released_sum(model, inputs, *, clipping, threshold=C) -> torch.Tensor:
    """The clipped sum S of one backward over ``inputs`` (loss summed over examples), flat float64."""
    inst = instrument(model, clipping=clipping, max_grad_norm=threshold, thresholds=None,
                      loss_reduction="sum", batch_first=True)
    try:
        model(*inputs).backward()
        step = inst.book.close()
    finally:
        detach(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([step.sums.get(id(p), torch.zeros_like(p)).double().flatten()
                      for p in params])


def shift(model, honest, crafted, *, clipping) -> float:
    """||S(D) - S(D')||: D = honest examples then the crafted one, D' = the honest ones."""
    together = tuple(torch.cat([h, c]) for h, c in zip(honest, crafted))
    with_it = released_sum(model, together, clipping=clipping)
    without = released_sum(model, honest, clipping=clipping)
    return float((with_it - without).norm()), float(without.norm())


def assert_within_clip(model, honest, crafted, *, clipping):
    moved, size = shift(model, honest, crafted, clipping=clipping)
    assert moved <= C * (1 + 1e-6) + 1e-6 * size, (
        f"one example moved the clipped sum by {moved:.4g} > C = {C} ({clipping})")


# ---- issue 19.1: catastrophic cancellation in the ghost norm -----------------------------------
@pytest.mark.parametrize("clipping", MODES)
@pytest.mark.parametrize("dtype,scale,delta", [(torch.float32, 1e6, 2.0 ** -12),
                                               (torch.float64, 1e11, 2.0 ** -27)],
                         ids=["float32", "float64"])
def test_cancelling_tokens_cannot_escape_the_ghost_norm(clipping, dtype, scale, delta):
    """Tokens x and -(1-delta) x with the same output gradient: G_i = delta g x^T is large (norm
    ~1e3 for C = 1) while its ghost terms cancel to ~0; then clip factor 1 released all of it."""
    torch.manual_seed(0)
    m, n = 8, 8
    model = Probe(n, m, dtype=dtype)
    honest = (torch.randn(4, 2, n, dtype=dtype), torch.randn(4, 2, m, dtype=dtype))
    for _ in range(10):
        x = torch.randn(1, 1, n, dtype=torch.float64) * scale
        a = torch.cat([x, -(1 - delta) * x], dim=1).to(dtype)
        c = torch.randn(1, 1, m, dtype=dtype).expand(1, 2, m).contiguous()
        assert_within_clip(model, honest, (a, c), clipping=clipping)


@pytest.mark.parametrize("clipping", MODES)
def test_cancelling_uses_of_one_weight_cannot_escape_the_cross_term(clipping):
    """The same through one weight used twice (T = 1 each): the 2<G^1, G^2> cross term cancels."""
    torch.manual_seed(1)
    m, n = 8, 8
    model = TwiceProbe(n, m)
    honest = tuple(torch.randn(4, d) for d in (n, m, n, m))
    for _ in range(10):
        x = torch.randn(1, n, dtype=torch.float64) * 1e6
        g = torch.randn(1, m)
        crafted = (x.float(), g, (-(1 - 2.0 ** -12) * x).float(), g)
        assert_within_clip(model, honest, crafted, clipping=clipping)


# ---- issue 25.1: one example absorbs the others in the clipped sum --------------------------------
@pytest.mark.parametrize("clipping", MODES)
@pytest.mark.parametrize("batch", [8, 64])
@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e12), (torch.float64, 1e24)],
                         ids=["float32", "float64"])
def test_one_example_cannot_wipe_out_the_others(clipping, batch, dtype, big):
    """Tokens +M u v^T and -M u v^T: G_i = 0, clip factor 1, and in one GEMM over all B*T rows
    the rows summed before the pair were lost to rounding against M: a shift of (B-1) C."""
    torch.manual_seed(2)
    m, n = 4, 4
    model = Probe(n, m, dtype=dtype)
    honest = (torch.randn(batch, 2, n, dtype=dtype), torch.randn(batch, 2, m, dtype=dtype))
    v, u = torch.randn(n, dtype=dtype), torch.randn(m, dtype=dtype)
    crafted = (torch.stack([big * v, -big * v])[None], torch.stack([u, u])[None])
    assert_within_clip(model, honest, crafted, clipping=clipping)


@pytest.mark.parametrize("clipping", MODES)
def test_conv_patches_cannot_wipe_out_the_others(clipping):
    """Issue 26: the same absorption through a convolution's unfolded patches (per_layer)."""
    torch.manual_seed(3)

    class ConvProbe(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, kernel_size=1, bias=False)

        def forward(self, x, c):  # (B, 4, L), (B, 4, L)
            return (self.conv(x) * c).sum()

    honest = (torch.randn(16, 4, 2), torch.randn(16, 4, 2))
    v, u = torch.randn(4), torch.randn(4)
    crafted = (torch.stack([1e12 * v, -1e12 * v], dim=1)[None], torch.stack([u, u], dim=1)[None])
    assert_within_clip(ConvProbe(), honest, crafted, clipping=clipping)


# ---- issue 26.1 and 26.2: embeddings ---------------------------------------------------------------
@pytest.mark.parametrize("clipping", MODES)
def test_a_cancelling_embedding_example_cannot_absorb_the_others(clipping):
    """ids [3, 3, 0, 0] with weights [M, -M, 0, 0]: gradient exactly 0, but added position by
    position into the shared row, +M wiped out what the others had added (shift 5.4 flat)."""
    torch.manual_seed(4)
    model = WeightedEmbedding()
    honest = (torch.full((16, 4), 3), torch.randn(16, 4))
    crafted = (torch.tensor([[3, 3, 0, 0]]), torch.tensor([[1e10, -1e10, 0.0, 0.0]]))
    assert_within_clip(model, honest, crafted, clipping=clipping)


@pytest.mark.parametrize("clipping", MODES)
def test_a_nearly_cancelling_id_is_clipped_on_its_true_norm(clipping):
    """g and -(1-delta) g on one id: the Gram form gave 0 where the norm is delta ||g||."""
    torch.manual_seed(5)
    model = WeightedEmbedding()
    honest = (torch.randint(0, 5, (4, 4)), torch.randn(4, 4))
    for big in (1e4, 1e6, 1e8):
        crafted = (torch.tensor([[3, 3, 1, 1]]), torch.tensor([[big, -(1 - 1e-4) * big, 0, 0]]))
        assert_within_clip(model, honest, crafted, clipping=clipping)


@pytest.mark.parametrize("clipping", MODES)
def test_tied_embedding_and_head_cancelling_each_other(clipping):
    """An embedding row and the tied head's row cancel (G_e = -G_h, both ~M): the parameter's
    per-example gradient is 0; summing the two uses' clipped sums separately let +-M absorb the
    others. Each example's uses are added before the examples."""
    torch.manual_seed(6)
    vocab, dim, big = 6, 8, 1e10
    model = TiedProbe(vocab, dim)
    q = model.query
    honest = (torch.randint(0, vocab, (8, 3)), torch.randn(8, 3), torch.randn(8, 2, dim),
              torch.randn(8, 2, vocab))
    c = torch.zeros(1, 2, vocab)
    c[0, 0, 3] = big
    crafted = (torch.tensor([[3, 0, 0]]), torch.tensor([[-big, 0.0, 0.0]]),
               torch.stack([q, torch.zeros(dim)])[None], c)
    assert_within_clip(model, honest, crafted, clipping=clipping)


# ---- issue 26.3: the direct norm ------------------------------------------------------------------
@pytest.mark.parametrize("clipping", MODES)
def test_a_middle_token_lost_in_the_direct_norm_is_still_clipped(clipping):
    """Tokens +M a(x)b, u(x)v, -M a(x)b through a direct-norm layer (T (m+n) >= m n): float32 lost
    u(x)v (norm 0.0 where the true norm is ~1e3)."""
    torch.manual_seed(7)
    m, n = 4, 4  # T = 3: 3 * 8 >= 16, the direct form
    model = Probe(n, m)
    honest = (torch.randn(4, 3, n), torch.randn(4, 3, m))
    for _ in range(5):
        a, b = torch.randn(m), torch.randn(n)
        u, v = torch.randn(m) * 1e3, torch.randn(n)
        crafted = (torch.stack([1e14 * b, v, -1e14 * b])[None], torch.stack([a, u, a])[None])
        assert_within_clip(model, honest, crafted, clipping=clipping)


# ---- issue 26.4: a finite gradient is not "non-finite" ------------------------------------------------
CONVS = {
    "conv1d": (lambda: nn.Conv1d(3, 4, kernel_size=3), (3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 4, kernel_size=3), (3, 6, 6)),
}


@pytest.mark.parametrize("clipping", MODES)
@pytest.mark.parametrize("name", list(CONVS) + ["mha"])
def test_huge_finite_inputs_are_clipped_not_refused(name, clipping):
    """Entries ~1e20 (finite in float32) overflowed the float32 squared norms, and the default
    nonfinite_gradients="raise" stopped everyone's step for one example. Now it is clipped."""
    torch.manual_seed(8)
    if name == "mha":  # huge values (the attention weights stay finite): the forward is finite
        layer = nn.MultiheadAttention(8, 2, batch_first=True)

        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = layer

            def forward(self, x, v):
                return self.layer(x, x, v, need_weights=False)[0].sum()

        x, v = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
        crafted = (x[:1], v[:1] * 1e19)
        assert_within_clip(Model(), (x, v), crafted, clipping=clipping)
        return
    else:
        make, shape = CONVS[name]
        conv = make()

        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = conv

            def forward(self, x):
                return self.layer(x).sum()

        honest = torch.randn(4, *shape)
    crafted = honest[:1] * 1e20
    assert torch.isfinite(crafted).all()
    assert_within_clip(Model(), (honest,), (crafted,), clipping=clipping)


def test_a_real_nan_still_raises():
    """A NaN gradient is still refused by default (nonfinite_gradients="raise")."""
    model = Probe(4, 4)
    a, c = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    a[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite per-example gradient"):
        released_sum(model, (a, c), clipping="flat")


# ---- bf16 autocast: the pieces arrive in bf16 --------------------------------------------------------
@pytest.mark.parametrize("clipping", MODES)
def test_cancellation_under_bf16_autocast(clipping):
    torch.manual_seed(9)
    m, n = 8, 8

    class Autocast(Probe):
        def forward(self, a, c):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = self.linear(a)
            return (out.float() * c).sum()

    model = Autocast(n, m)
    honest = (torch.randn(4, 2, n), torch.randn(4, 2, m))
    x = torch.randn(1, 1, n) * 1e4
    crafted = (torch.cat([x, -(1 - 2.0 ** -6) * x], dim=1), torch.ones(1, 2, m))
    assert_within_clip(model, honest, crafted, clipping=clipping)


# ---- issue 25, "not yet tried": every other rule, with one example's inputs huge -------------------
class Scaled(nn.Module):
    """A per-example parameter that no rule covers (the torch.func fallback)."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return torch.tanh(x) * self.scale ** 2


class WithExtraParam(nn.Module):
    """A parameter next to a trainable child (the container rule)."""

    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.extra = nn.Parameter(torch.randn(dim, dim) / dim)

    def forward(self, x):
        return self.fc(x).matmul(self.extra)


def _rule_models():
    from dpfused.layers import DPGRU, DPLSTM

    dim = 6
    return {
        "layernorm": nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim)),
        "rmsnorm": nn.Sequential(nn.Linear(dim, dim), nn.RMSNorm(dim)),
        "groupnorm": nn.Sequential(nn.Conv1d(5, dim, 1), nn.GroupNorm(2, dim)),
        "functorch": nn.Sequential(nn.Linear(dim, dim), Scaled(dim)),
        "container": WithExtraParam(dim),
        "dplstm": DPLSTM(dim, dim, batch_first=True),
        "dpgru": DPGRU(dim, dim, batch_first=True),
    }


class SumOut(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return (out[0] if isinstance(out, tuple) else out).sum()


@pytest.mark.parametrize("clipping", MODES)
@pytest.mark.parametrize("name", list(_rule_models()))
@pytest.mark.parametrize("big", [1e15, 1e30])
def test_every_rule_bounds_a_huge_example(name, clipping, big):
    """One example's inputs multiplied by 1e15 or 1e30 (finite in float32): either its gradient
    overflows in the model's own forward/backward (a NaN/inf gradient: refused, nothing released)
    or it moves the clipped sum by at most C."""
    torch.manual_seed(10)
    model = SumOut(_rule_models()[name])
    honest = torch.randn(4, 5, 6)
    crafted = honest[:1] * big
    try:
        assert_within_clip(model, (honest,), (crafted,), clipping=clipping)
    except ValueError as refused:
        assert "non-finite per-example gradient" in str(refused)
