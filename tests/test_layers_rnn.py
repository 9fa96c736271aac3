"""dpfused.layers' DPLSTM, DPGRU, DPRNN against nn.LSTM, nn.GRU, nn.RNN in float64.

Forward: same outputs and final states as the nn module with the same weights, for every layout
(batch_first, unbatched, packed sorted or not, initial states given). Gradients: dpfused's clipped
sums equal the oracle's, from per-example gradients of the equivalent nn model computed one example
at a time with torch.func (a loop, not vmap: packed lengths differ between examples), clipped per
group and summed (tests/oracle.py). Opacus' own DPLSTM is checked the same way.
"""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import dpfused
from dpfused.instrument import detach, instrument
from dpfused.layers import DPGRU, DPLSTM, DPRNN, dp_equivalent
from dpfused.opacus import ModuleValidator
from tests.oracle import assert_sums_close, expected_for

BATCH, STEPS, INPUT, HIDDEN = 3, 4, 3, 4
PAIRS = {"lstm": (nn.LSTM, DPLSTM, {}), "gru": (nn.GRU, DPGRU, {}),
         "rnn_tanh": (nn.RNN, DPRNN, {}), "rnn_relu": (nn.RNN, DPRNN, {"nonlinearity": "relu"})}


def _pair(kind, seed=0, hidden=HIDDEN, **config):
    """(nn module, DP module) with the same configuration and weights, float64."""
    nn_cls, dp_cls, extra = PAIRS[kind]
    torch.manual_seed(seed)
    reference = nn_cls(INPUT, hidden, **extra, **config).double()
    ours = dp_cls(INPUT, hidden, **extra, **config).double()
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def _inputs(seed=1, lengths=(4, 2, 3)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), INPUT, dtype=torch.float64, generator=gen)
    return x, torch.tensor(lengths)


def _assert_same(a, b):
    if isinstance(a, PackedSequence):
        assert isinstance(b, PackedSequence)
        for name in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), name
        a, b = a.data, b.data
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
        return
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


# ---- forward -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_forward_equals_nn(kind, batch_first):
    reference, ours = _pair(kind, num_layers=2, bidirectional=True, batch_first=batch_first)
    x, _ = _inputs()
    x = x if batch_first else x.transpose(0, 1)
    _assert_same(ours(x), reference(x))


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_forward_equals_nn(kind, enforce_sorted):
    reference, ours = _pair(kind, num_layers=2, bidirectional=True)
    x, lengths = _inputs(lengths=(4, 3, 2) if enforce_sorted else (2, 4, 3))
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    _assert_same(ours(packed), reference(packed))


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_initial_state_and_unbatched_input_equal_nn(kind):
    reference, ours = _pair(kind, num_layers=2, bidirectional=True, bias=False)
    x, lengths = _inputs()
    h0 = torch.randn(4, BATCH, HIDDEN, dtype=torch.float64)
    hx = (h0, torch.randn_like(h0)) if kind == "lstm" else h0
    _assert_same(ours(x.transpose(0, 1), hx), reference(x.transpose(0, 1), hx))
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    _assert_same(ours(packed, hx), reference(packed, hx))
    single = tuple(h[:, 0] for h in hx) if kind == "lstm" else h0[:, 0]
    _assert_same(ours(x[0], single), reference(x[0], single))


def test_dropout_between_layers_only_in_training():
    reference, ours = _pair("lstm", num_layers=2, dropout=0.5)
    x, _ = _inputs()
    _assert_same(ours.eval()(x), reference.eval()(x))
    train_out, _ = ours.train()(x)
    assert not torch.allclose(train_out, reference(x)[0])
    with pytest.warns(UserWarning, match="dropout"):  # nn's warning; one layer: no dropout
        reference, ours = _pair("gru", dropout=0.5)
    _assert_same(ours.train()(x), reference.train()(x))


def test_state_dict_keys_and_parameter_order_equal_nn():
    reference, ours = _pair("lstm", num_layers=2, bidirectional=True)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in reference.named_parameters()]
    reference.load_state_dict(ours.state_dict())  # and back
    assert repr(ours).replace("DPLSTM", "LSTM") == repr(reference)


def test_bad_arguments_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="proj_size=2 is not supported"):
        DPLSTM(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="nonlinearity 'gelu'"):
        DPRNN(3, 4, nonlinearity="gelu")
    with pytest.raises(ValueError, match="dropout must be a number in"):
        DPGRU(3, 4, dropout=1.5)
    with pytest.raises(ValueError, match=r"hx must have shape \(1, 3, 4\)"):
        DPGRU(3, 4)(torch.randn(5, 3, 3), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="input must be a 3-D tensor"):
        DPRNN(3, 4)(torch.randn(2, 5, 3, 3))


# ---- clipped sums against the oracle -------------------------------------------------------------
class Tagger(nn.Module):
    """A recurrent layer, a linear head on every real step and a probe of the final states.

    ``forward(x (B, T, in) batch-first, lengths (B,))`` returns one loss per example that depends on
    that example's steps only (padded steps are masked), so a batch of 1 gives the same loss.
    """

    def __init__(self, rnn, packed):
        super().__init__()
        self.rnn, self.packed = rnn, packed
        directions = 2 if rnn.bidirectional else 1
        hidden = rnn.hidden_size
        self.head = nn.Linear(directions * hidden, 2).double()
        self.register_buffer("probe", torch.linspace(-1, 1, rnn.num_layers * directions * hidden,
                                                     dtype=torch.float64).view(-1, 1, hidden))

    def forward(self, x, lengths):
        inputs = x if self.rnn.batch_first else x.transpose(0, 1)
        if self.packed:
            inputs = pack_padded_sequence(inputs, lengths, batch_first=self.rnn.batch_first,
                                          enforce_sorted=False)
        out, state = self.rnn(inputs)
        if self.packed:
            out, _ = pad_packed_sequence(out, batch_first=True)  # (B, max length, D*H)
        elif not self.rnn.batch_first:
            out = out.transpose(0, 1)
        steps = torch.arange(out.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        per_step = torch.tanh(self.head(out)).pow(2).sum(-1) * steps  # (B, T)
        states = state if isinstance(state, tuple) else (state,)
        probed = sum((torch.tanh(s) * self.probe).sum(dim=(0, 2)) for s in states)  # (B,)
        return per_step.sum(1) + probed


def _oracle_grads(model, x, lengths):
    """{name: (B, *shape)}: torch.func per-example gradients, one example at a time.

    Example i is run alone on its own steps ``x[i, :lengths[i]]``, unpacked (torch.func cannot
    differentiate nn's packed kernels; a sequence alone needs no packing).
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(params, x_i, length_i):
        return functional_call(model, {**params, **buffers}, (x_i, length_i)).sum()

    per_example = [grad(loss)(params, x[i:i + 1, :int(lengths[i])], lengths[i:i + 1])
                   for i in range(x.shape[0])]
    return {n: torch.stack([g[n] for g in per_example]) for n in params}


def _clipped_sums(model, reference, x, lengths, clipping):
    """dpfused's clipped sums and the oracle's (names of ``model``), C at the median norm."""
    grads = _oracle_grads(reference, x, lengths)
    norms = torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], 1).norm(dim=1)
    inst = instrument(model, clipping=clipping, max_grad_norm=float(norms.median()),
                      thresholds=None, loss_reduction="mean", batch_first=True)
    try:
        model(x, lengths).mean().backward()
        step = inst.book.close()
        expected, names = expected_for(model, inst, grads)
        return expected, {names[key]: value for key, value in step.sums.items()}
    finally:
        detach(model)


def _models(kind, packed, **config):
    reference, ours = _pair(kind, **config)
    model = Tagger(ours, packed)
    oracle = Tagger(reference, packed=False)  # see _oracle_grads
    oracle.load_state_dict(model.state_dict())
    return model, oracle


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_clipped_sums_match_oracle(kind, batch_first, packed, clipping):
    model, oracle = _models(kind, packed, num_layers=2, bidirectional=True, batch_first=batch_first)
    x, lengths = _inputs(lengths=(2, 4, 3) if packed else (STEPS,) * BATCH)
    assert_sums_close(*_clipped_sums(model, oracle, x, lengths, clipping))


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_single_layer_without_bias_matches_oracle(kind):
    model, oracle = _models(kind, True, bias=False)
    x, lengths = _inputs(lengths=(1, 4, 2))
    assert_sums_close(*_clipped_sums(model, oracle, x, lengths, "per_layer"))


@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(sorted(PAIRS)), num_layers=st.integers(1, 2),
       bidirectional=st.booleans(), bias=st.booleans(), batch_first=st.booleans(),
       hidden=st.integers(1, 5), lengths=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       packed=st.booleans(), clipping=st.sampled_from(["flat", "per_layer"]))
def test_generated_configurations_match_oracle(kind, num_layers, bidirectional, bias, batch_first,
                                               hidden, lengths, packed, clipping):
    model, oracle = _models(kind, packed, hidden=hidden, num_layers=num_layers,
                            bidirectional=bidirectional, bias=bias, batch_first=batch_first)
    lengths = lengths if packed else [max(lengths)] * len(lengths)
    x, lengths = _inputs(lengths=tuple(lengths))
    assert_sums_close(*_clipped_sums(model, oracle, x, lengths, clipping))


def test_loss_on_some_steps_and_frozen_parameters_match_oracle():
    """The loss reads the last step only (the reverse direction's later steps get no gradient) and
    the first layer's hidden weights are frozen: they get no piece and no sum."""

    class LastStep(Tagger):
        def forward(self, x, lengths):
            out, _ = self.rnn(x)
            return torch.tanh(self.head(out[:, -1])).pow(2).sum(-1)

    model, oracle = _models("lstm", False, num_layers=2, bidirectional=True, batch_first=True)
    model, oracle = LastStep(model.rnn, False), LastStep(oracle.rnn, False)
    oracle.load_state_dict(model.state_dict())
    for m in (model, oracle):
        m.rnn.weight_hh_l0.requires_grad_(False)
    x, lengths = _inputs(lengths=(STEPS,) * BATCH)
    expected, ours = _clipped_sums(model, oracle, x, lengths, "flat")
    assert "rnn.weight_hh_l0" not in ours
    assert_sums_close(expected, ours)


class Seq2Seq(nn.Module):
    """An encoder's final states start a decoder: gradients flow through the initial states."""

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x, lengths):
        _, state = self.encoder(x)
        out, _ = self.decoder(x.flip(1), state)
        return torch.tanh(out).pow(2).sum(dim=(1, 2))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gradients_through_initial_states_match_oracle(kind):
    encoder_ref, encoder = _pair(kind, seed=0, num_layers=2, batch_first=True)
    decoder_ref, decoder = _pair(kind, seed=1, num_layers=2, batch_first=True)
    model, oracle = Seq2Seq(encoder, decoder), Seq2Seq(encoder_ref, decoder_ref)
    x, lengths = _inputs(lengths=(STEPS,) * BATCH)
    for clipping in ("flat", "per_layer"):
        assert_sums_close(*_clipped_sums(model, oracle, x, lengths, clipping))


def test_each_projection_hands_over_one_piece_with_every_step(monkeypatch):
    """One factor piece per weight per forward, its T axis the time steps: no per-step pieces, so
    no cross terms between steps in the group norms."""
    from dpfused import bookkeeper

    delivered = []
    original = bookkeeper.Bookkeeper.deliver
    monkeypatch.setattr(bookkeeper.Bookkeeper, "deliver",
                        lambda self, layer, pieces: (delivered.extend(pieces),
                                                     original(self, layer, pieces))[1])
    model, oracle = _models("gru", False, num_layers=2, bidirectional=True, batch_first=True)
    x, lengths = _inputs(lengths=(STEPS,) * BATCH)
    _clipped_sums(model, oracle, x, lengths, "flat")
    params = [id(p) for p in model.parameters()]
    assert sorted(id(p.param) for p in delivered) == sorted(params)
    weights = [p for p in delivered if p.param.dim() == 2 and p.param is not model.head.weight]
    assert len(weights) == 8 and all(p.left.shape[:2] == (BATCH, STEPS) for p in weights)


def test_make_private_step_with_zero_noise_equals_oracle():
    model, oracle = _models("lstm", True, num_layers=2, bidirectional=True)
    x, lengths = _inputs(lengths=(2, 4, 3))
    grads = _oracle_grads(oracle, x, lengths)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, clip = 0.5, 0.05
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, lengths),
                                         batch_size=BATCH)
    _, optimizer, loader = dpfused.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=clip, sampling="cyclic")
    try:
        for batch_x, batch_lengths in loader:
            optimizer.zero_grad()
            model(batch_x, batch_lengths).mean().backward()
            optimizer.step()
            break
    finally:
        detach(model)
    names = list(grads)
    flat = torch.cat([grads[n].reshape(BATCH, -1) for n in names], 1)
    factors = (clip / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    for name, param in model.named_parameters():
        expected = before[name] - lr * torch.einsum("b,b...->...", factors, grads[name]) / BATCH
        torch.testing.assert_close(param.detach(), expected, rtol=1e-9, atol=1e-12)


# ---- ModuleValidator.fix and Opacus' layers ------------------------------------------------------
def test_fix_swaps_nn_recurrent_layers_with_identical_outputs():
    torch.manual_seed(0)
    model = nn.ModuleDict({"lstm": nn.LSTM(3, 4, num_layers=2, bidirectional=True),
                           "gru": nn.GRU(8, 4, batch_first=True),
                           "rnn": nn.RNN(4, 4, nonlinearity="relu", bias=False)}).double()
    model["gru"].weight_hh_l0.requires_grad_(False)
    x, lengths = _inputs()

    def run(m):
        out, _ = m["lstm"](x.transpose(0, 1))
        out, h = m["gru"](out.transpose(0, 1))
        return m["rnn"](out.transpose(0, 1), h)

    before = run(model)
    assert ModuleValidator.validate(model) == []  # clipped as they are (issue 21)
    fixed = ModuleValidator.fix(model)
    assert [type(fixed[k]) for k in ("lstm", "gru", "rnn")] == [DPLSTM, DPGRU, DPRNN]
    assert fixed["rnn"].nonlinearity == "relu" and not fixed["gru"].weight_hh_l0.requires_grad
    assert ModuleValidator.is_valid(fixed)
    _assert_same(run(fixed), before)
    assert isinstance(dpfused.fix(nn.GRU(3, 4)), DPGRU)


def test_fix_leaves_an_lstm_with_projections_and_says_why():
    model = nn.Sequential(nn.LSTM(3, 4, proj_size=2))
    assert isinstance(dpfused.fix(model)[0], nn.LSTM)
    (problem,) = ModuleValidator.validate(model)
    assert "proj_size=2" in str(problem)
    with pytest.raises(TypeError, match="nn.LSTM, nn.GRU or nn.RNN"):
        dp_equivalent(nn.Linear(2, 2))


def test_opacus_dplstm_is_accepted_and_matches_oracle():
    from opacus.layers import DPLSTM as OpacusDPLSTM

    torch.manual_seed(0)
    rnn = OpacusDPLSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, batch_first=True).double()
    model = Tagger(rnn, packed=False)
    oracle = copy.deepcopy(model)
    x, lengths = _inputs(lengths=(STEPS,) * BATCH)
    for clipping in ("flat", "per_layer"):
        assert_sums_close(*_clipped_sums(model, oracle, x, lengths, clipping))


# ---- torch's own nn.LSTM / nn.GRU / nn.RNN, unchanged (issue 21 item 9) ---------------------------
def _torch_models(kind, packed, **config):
    """(model, oracle): Taggers over the SAME nn module class, weights equal; the model's module
    stays an nn.LSTM/GRU/RNN (the recurrent rule runs its parameters)."""
    reference, _ = _pair(kind, **config)
    model = Tagger(reference, packed)
    oracle = Tagger(copy.deepcopy(reference), packed=False)  # see _oracle_grads
    oracle.load_state_dict(model.state_dict())
    return model, oracle


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_torch_layers_clipped_sums_match_oracle(kind, batch_first, packed, clipping):
    model, oracle = _torch_models(kind, packed, num_layers=2, bidirectional=True,
                                  batch_first=batch_first)
    x, lengths = _inputs(lengths=(2, 4, 3) if packed else (STEPS,) * BATCH)
    assert_sums_close(*_clipped_sums(model, oracle, x, lengths, clipping))


@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(sorted(PAIRS)), num_layers=st.integers(1, 3),
       bidirectional=st.booleans(), bias=st.booleans(), batch_first=st.booleans(),
       hidden=st.integers(1, 5), lengths=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       packed=st.booleans(), clipping=st.sampled_from(["flat", "per_layer"]))
def test_torch_layers_generated_configurations_match_oracle(kind, num_layers, bidirectional, bias,
                                                            batch_first, hidden, lengths, packed,
                                                            clipping):
    model, oracle = _torch_models(kind, packed, hidden=hidden, num_layers=num_layers,
                                  bidirectional=bidirectional, bias=bias, batch_first=batch_first)
    lengths = lengths if packed else [max(lengths)] * len(lengths)
    x, lengths = _inputs(lengths=tuple(lengths))
    assert_sums_close(*_clipped_sums(model, oracle, x, lengths, clipping))


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_instrumented_torch_layer_keeps_its_class_state_dict_and_outputs(kind):
    """With grad the rule runs (unrolled), without grad torch's kernel: both give nn's outputs,
    for every layout; the module, its parameters and state_dict are the user's."""
    module, _ = _pair(kind, num_layers=2, bidirectional=True)
    expected_module = copy.deepcopy(module)
    params, keys = list(module.parameters()), list(module.state_dict())
    inst = instrument(module, clipping="flat", max_grad_norm=1.0, thresholds=None,
                      loss_reduction="mean", batch_first=True)
    try:
        assert type(module) is PAIRS[kind][0] and list(module.parameters()) == params
        assert list(module.state_dict()) == keys and inst.layers[0].rule.name == "recurrent"
        x, lengths = _inputs(lengths=(2, 4, 3))
        h0 = torch.randn(4, BATCH, HIDDEN, dtype=torch.float64)
        hx = (h0, torch.randn_like(h0)) if kind == "lstm" else h0
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        for args in [(x.transpose(0, 1),), (x.transpose(0, 1), hx), (packed, hx),
                     (x[0], tuple(h[:, 0] for h in hx) if kind == "lstm" else h0[:, 0])]:
            ours = module(*args)  # grad enabled: the rule
            _assert_same(ours, expected_module(*args))
            with torch.no_grad():
                _assert_same(module(*args), expected_module(*args))
    finally:
        detach(module)


def test_torch_lstm_dropout_between_layers_matches_oracle_on_the_same_masks(monkeypatch):
    """nn.LSTM(dropout>0) trains: F.dropout between layers (the masks come from torch's RNG; here a
    mask that is a function of each value, so the one-example-at-a-time oracle draws the same).
    The oracle is DPLSTM's plain autograd forward, nn.LSTM's function (checked above)."""

    def dropout(x, p=0.5, training=True, inplace=False):
        keep = (torch.frac(x.detach() * 997.0).abs() >= p).to(x.dtype)
        return x * keep / (1 - p)

    monkeypatch.setattr(torch.nn.functional, "dropout", dropout)
    reference, _ = _pair("lstm", num_layers=3, bidirectional=True, batch_first=True, dropout=0.5)
    model = Tagger(reference.train(), packed=False)
    oracle = Tagger(dp_equivalent(reference).train(), packed=False)
    oracle.load_state_dict(model.state_dict())
    x, lengths = _inputs(lengths=(STEPS,) * BATCH)
    for clipping in ("flat", "per_layer"):
        assert_sums_close(*_clipped_sums(model, oracle, x, lengths, clipping))


def test_torch_lstm_dropout_in_training_draws_masks_like_nn():
    """The real F.dropout: training outputs differ from eval's, as nn's do; eval ones equal nn's."""
    module, _ = _pair("gru", num_layers=2, dropout=0.5)
    x, _ = _inputs()
    inst = instrument(module, clipping="flat", max_grad_norm=1.0, thresholds=None,
                      loss_reduction="mean", batch_first=True)
    try:
        train_out, _ = module.train()(x)
        with torch.no_grad():
            eval_out, _ = module.eval()(x)
        assert not torch.allclose(train_out, eval_out)
        _assert_same(module.eval()(x)[0], eval_out)  # grad, eval mode: the rule, no dropout
    finally:
        detach(module)


def test_make_private_trains_an_unchanged_nn_lstm_like_the_oracle():
    reference, _ = _pair("lstm", num_layers=2, bidirectional=True)
    model = Tagger(reference, packed=True)
    oracle = Tagger(copy.deepcopy(reference), packed=False)
    oracle.load_state_dict(model.state_dict())
    x, lengths = _inputs(lengths=(2, 4, 3))
    grads = _oracle_grads(oracle, x, lengths)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, clip = 0.5, 0.05
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, lengths),
                                         batch_size=BATCH)
    private, optimizer, loader = dpfused.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=clip, sampling="cyclic")
    try:
        assert private is model and type(model.rnn) is nn.LSTM
        batch_x, batch_lengths = next(iter(loader))
        optimizer.zero_grad()
        model(batch_x, batch_lengths).mean().backward()
        optimizer.step()
    finally:
        detach(model)
    flat = torch.cat([grads[n].reshape(BATCH, -1) for n in grads], 1)
    factors = (clip / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    for name, param in model.named_parameters():
        expected = before[name] - lr * torch.einsum("b,b...->...", factors, grads[name]) / BATCH
        torch.testing.assert_close(param.detach(), expected, rtol=1e-9, atol=1e-12)


def test_torch_layers_the_rule_cannot_run_are_refused_naming_the_module():
    class Doubled(nn.GRU):
        def forward(self, input, hx=None):
            out, h = super().forward(input, hx)
            return 2 * out, h

    def make(rnn):
        model = nn.ModuleDict({"rnn": rnn})
        data = torch.utils.data.TensorDataset(torch.randn(4, 3, 3))
        dpfused.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=torch.utils.data.DataLoader(data, batch_size=2), noise_multiplier=1.0,
            max_grad_norm=1.0)

    with pytest.raises(ValueError, match=r"module 'rnn' \(LSTM\) has proj_size=2.*weight_hr"):
        make(nn.LSTM(3, 4, proj_size=2))
    with pytest.raises(ValueError, match=r"module 'rnn' \(Doubled\) subclasses nn\.GRU and "
                                         r"overrides forward"):
        make(Doubled(3, 4))
    with pytest.raises(ValueError, match=r"module 'rnn' \(LSTMCell\).*no per-example gradient"):
        make(nn.LSTMCell(3, 4))
