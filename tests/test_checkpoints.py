"""Checkpoints as an attacker sees them (docs/design.md §7.6): a resume must not replay noise, a
checkpoint must not run code, an edited ledger must not lower epsilon."""

import pathlib
import pickle
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from dpfused.opacus import schedulers
from tests import models

WIDTH, N, BATCH = 40, 24, 6


def _zero_gradient_run(*, noise_generator=None, secure=False, sampling="cyclic"):
    """A model whose gradient is 0: each released update is the noise alone (SGD, lr 1)."""
    model = models.zero_gradient_model(WIDTH)
    data = TensorDataset(torch.randn(N, WIDTH, dtype=torch.float64))
    engine = dpfused.PrivacyEngine(secure_mode=secure)
    seeded = {} if noise_generator is None else {"noise_generator": noise_generator}
    if not secure:
        seeded["sampling_generator"] = torch.Generator().manual_seed(0)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(data, batch_size=BATCH), noise_multiplier=1.0, max_grad_norm=1.0,
        sampling=sampling, **seeded)
    return engine, model, optimizer, loader


def _noise_of_steps(model, optimizer, loader, steps):
    """The noise each of ``steps`` logical steps released (the gradient is 0)."""
    released = []
    while len(released) < steps:
        for (x,) in loader:
            optimizer.zero_grad()
            model(x).sum().backward()
            optimizer.step()
            released.append(model.lin.weight.grad.detach().clone())
            if len(released) == steps:
                break
    return released


# ---- issue 19.3: a resume must continue the noise stream, never replay it ---------------------


def test_resume_with_the_same_seeded_generator_continues_the_noise(tmp_path):
    """The attack: stop after 2 steps, resume with the script's own seeded noise_generator. Were
    the stream not saved, step 3 would add step 1's noise again, and update 3 - update 1 would be
    a noise-free function of the data."""
    _, model, optimizer, loader = _zero_gradient_run(
        noise_generator=torch.Generator().manual_seed(11))
    straight = _noise_of_steps(model, optimizer, loader, 4)

    engine, model, optimizer, loader = _zero_gradient_run(
        noise_generator=torch.Generator().manual_seed(11))
    first = _noise_of_steps(model, optimizer, loader, 2)
    engine.save_checkpoint(path=tmp_path / "c.pt", module=model, optimizer=optimizer)
    engine_b, model_b, optimizer_b, loader_b = _zero_gradient_run(
        noise_generator=torch.Generator().manual_seed(11))  # the same script, run again
    engine_b.load_checkpoint(path=tmp_path / "c.pt", module=model_b, optimizer=optimizer_b)
    resumed = _noise_of_steps(model_b, optimizer_b, loader_b, 2)

    assert all(torch.equal(a, b) for a, b in zip(first, straight[:2]))
    for released in resumed:
        assert not any(torch.equal(released, earlier) for earlier in first), "noise replayed"
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight[2:]))  # the stream went on


def test_the_default_noise_generator_ignores_torch_manual_seed():
    """No noise_generator given: make_private seeds its own from the operating system, so a run
    restarted after torch.manual_seed(0) does not draw the noise an earlier run released."""
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        _, model, optimizer, loader = _zero_gradient_run()
        draws.append(_noise_of_steps(model, optimizer, loader, 1)[0])
        assert isinstance(optimizer.generator, torch.Generator)
    assert not torch.equal(draws[0], draws[1])


def test_the_default_generator_is_saved_and_restored():
    engine, model, optimizer, loader = _zero_gradient_run()
    _noise_of_steps(model, optimizer, loader, 2)
    state = engine.state_dict()
    straight = _noise_of_steps(model, optimizer, loader, 2)
    engine_b, model_b, optimizer_b, loader_b = _zero_gradient_run()
    engine_b.load_state_dict(state)
    resumed = _noise_of_steps(model_b, optimizer_b, loader_b, 2)
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight))


def test_the_state_holds_the_generator_the_optimizer_draws_from():
    mine = torch.Generator().manual_seed(3)
    engine, model, optimizer, loader = _zero_gradient_run(noise_generator=mine)
    _noise_of_steps(model, optimizer, loader, 1)
    saved = engine.state_dict()["noise"]
    assert saved["kind"] == "torch" and saved["layout"] == "one"
    assert torch.equal(saved["generators"][0]["state"], optimizer.generator.get_state())


def test_a_secure_resume_draws_fresh_noise_and_says_so():
    engine, model, optimizer, loader = _zero_gradient_run(secure=True)
    _noise_of_steps(model, optimizer, loader, 1)
    state = engine.state_dict()
    assert state["noise"] == {"kind": "secure", "layout": "one"}  # no key saved
    engine_b, _, optimizer_b, _ = _zero_gradient_run(secure=True)
    with pytest.warns(UserWarning, match="not restored .*secure mode never saves its ChaCha20 key"):
        engine_b.load_state_dict(state)
    with pytest.raises(ValueError, match="secure_mode=True.*secure_mode=False"):
        _zero_gradient_run()[0].load_state_dict(state)


def test_a_stream_that_cannot_be_restored_is_reseeded_from_the_os():
    engine, model, optimizer, loader = _zero_gradient_run(
        noise_generator=torch.Generator().manual_seed(5))
    _noise_of_steps(model, optimizer, loader, 1)
    state = engine.state_dict()
    # Another rank's own stream (FSDP2), and a checkpoint written before streams were saved.
    other_rank = {**state, "noise": {**state["noise"], "layout": "per_rank", "rank": 1,
                                     "world_size": 2}}
    legacy = {k: v for k, v in state.items() if k != "noise"}
    for saved, reason in ((other_rank, "laid out 'per_rank'"), (legacy, "holds no noise stream")):
        engine_b, model_b, optimizer_b, loader_b = _zero_gradient_run(
            noise_generator=torch.Generator().manual_seed(5))
        replay = torch.Generator().manual_seed(5).get_state()
        with pytest.warns(UserWarning, match=f"not restored .*{reason}.*seeded by the operating"):
            engine_b.load_state_dict(saved)
        assert not torch.equal(optimizer_b.generator.get_state(), replay)
    from dpfused import checkpoints

    generator = torch.Generator().manual_seed(5)
    per_rank = checkpoints.noise_state(generator, layout="per_rank", rank=1, world_size=2)
    assert "rank 1 of 2's own" in checkpoints.restore_noise(generator, per_rank,
                                                            layout="per_rank", rank=0,
                                                            world_size=2)


# ---- issue 25.3: a checkpoint must not run code -------------------------------------------------


class _Payload:
    """What an attacker puts in a checkpoint: unpickling it touches a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_tampered_checkpoint_does_not_run_code_on_load(tmp_path):
    engine, model, optimizer, loader = _zero_gradient_run()
    _noise_of_steps(model, optimizer, loader, 1)
    engine.save_checkpoint(path=tmp_path / "c.pt", module=model, optimizer=optimizer)
    checkpoint = torch.load(tmp_path / "c.pt", weights_only=True)
    marker = tmp_path / "code-ran"
    checkpoint["privacy_engine_state_dict"]["extra"] = _Payload(marker)
    torch.save(checkpoint, tmp_path / "tampered.pt")
    engine_b, model_b, optimizer_b, _ = _zero_gradient_run()
    with pytest.raises(ValueError, match="refused to load.*more than plain data.*never runs code"):
        engine_b.load_checkpoint(path=tmp_path / "tampered.pt", module=model_b,
                                 optimizer=optimizer_b)
    assert not marker.exists()
    assert engine_b.accountant.steps == 0  # nothing was applied


def test_checkpoints_hold_plain_data_and_refuse_anything_else(tmp_path):
    engine, model, optimizer, loader = _zero_gradient_run()
    noise = schedulers.LambdaNoise(optimizer, noise_lambda=lambda epoch: 0.5 ** epoch)
    _noise_of_steps(model, optimizer, loader, 1)
    noise.step()
    engine.save_checkpoint(path=tmp_path / "c.pt", module=model, optimizer=optimizer,
                           noise_scheduler=noise, checkpoint_dict={"epoch": 1})
    saved = torch.load(tmp_path / "c.pt", weights_only=True)  # plain data throughout
    assert saved["noise_scheduler_state_dict"]["noise_lambda"] is None  # never a function
    engine_b, model_b, optimizer_b, _ = _zero_gradient_run()
    noise_b = schedulers.LambdaNoise(optimizer_b, noise_lambda=lambda epoch: 0.5 ** epoch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the restored sigma differs: a UserWarning says so
        engine_b.load_checkpoint(path=tmp_path / "c.pt", module=model_b, optimizer=optimizer_b,
                                 noise_scheduler=noise_b)
    assert noise_b.last_epoch == 1 and callable(noise_b.noise_lambda)
    noise_b.step()
    assert optimizer_b.noise_multiplier == 0.25
    with pytest.raises(TypeError, match=r"checkpoint_dict\['hook'\] is a builtins.function.*plain"):
        engine.save_checkpoint(path=tmp_path / "x.pt", module=model,
                               checkpoint_dict={"hook": lambda: 0})
    assert not (tmp_path / "x.pt").exists()


def test_a_tampered_distributed_checkpoint_does_not_run_code(tmp_path):
    engine, model, optimizer, loader = _zero_gradient_run()
    _noise_of_steps(model, optimizer, loader, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "assuming the intent is to save in one process"
        engine.save_distributed_checkpoint(path=tmp_path / "dcp", module=model,
                                           optimizer=optimizer)
    metadata_file = tmp_path / "dcp" / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())
    marker = tmp_path / "code-ran"
    metadata.planner_data = _Payload(marker)
    metadata_file.write_bytes(pickle.dumps(metadata))
    engine_b, model_b, optimizer_b, _ = _zero_gradient_run()
    with pytest.raises(ValueError, match="refused to load.*names pathlib.Path.touch"):
        engine_b.load_distributed_checkpoint(path=tmp_path / "dcp", module=model_b,
                                             optimizer=optimizer_b)
    assert not marker.exists()


def test_the_distributed_checkpoint_stores_no_pickle_of_dpfused(tmp_path):
    engine, model, optimizer, loader = _zero_gradient_run()
    _noise_of_steps(model, optimizer, loader, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.save_distributed_checkpoint(path=tmp_path / "dcp", module=model,
                                           optimizer=optimizer)
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = pickle.loads((tmp_path / "dcp" / ".metadata").read_bytes())
    ours = {k: v for k, v in metadata.state_dict_metadata.items() if k.startswith("dpfused.")}
    assert set(ours) == {"dpfused.engine", "dpfused.noise_rank0"}
    assert all(isinstance(v, TensorStorageMetadata) for v in ours.values())  # JSON in uint8


# ---- issue 25.4: an edited ledger must not lower epsilon ----------------------------------------


def _trained_state(steps=4):
    engine, model, optimizer, loader = _zero_gradient_run(sampling="poisson")
    _noise_of_steps(model, optimizer, loader, steps)
    return engine, engine.state_dict()


def _edited(state, **accountant):
    return {**state, "accountant": {**state["accountant"], **accountant}}


@pytest.mark.parametrize("edit, complaint", [
    (lambda s: _edited(s, entries=[]), "took 4 steps but the ledger records 0"),
    (lambda s: _edited(s, entries=s["accountant"]["entries"][:2]),
     "took 4 steps but the ledger records 2"),
    (lambda s: {**_edited(s, entries=s["accountant"]["entries"][:2]), "steps_taken": 2},
     "drew 4 logical batches and the optimizer took 2 steps"),
    (lambda s: _edited(s, entries=[s["accountant"]["entries"][0]] * 4), "entry 1 sits at batch 0"),
    (lambda s: _edited(s, entries=[{**e, "sampled": {**e["sampled"], "sample_rate": 0.01}}
                                   for e in s["accountant"]["entries"]]),
     "entry 0 was drawn with .*0.01"),
    (lambda s: {**s, "ledger_start": 3}, "took 4 steps but the ledger records 1"),
], ids=["emptied", "cut", "cut-with-steps", "duplicated", "lower-rate", "moved-start"])
def test_a_ledger_that_disagrees_with_the_run_is_refused(edit, complaint):
    engine, state = _trained_state()
    epsilon = engine.get_epsilon(1e-5)
    fresh, _, optimizer, loader = _zero_gradient_run(sampling="poisson")
    with pytest.raises(ValueError, match=f"ledger disagrees with the saved run: .*{complaint}"):
        fresh.load_state_dict(edit(state))
    assert fresh.accountant.steps == 0 and optimizer.steps_taken == 0  # nothing applied
    assert loader.state_dict()["step"] == 0
    fresh.load_state_dict(state)  # the state as written resumes
    assert fresh.get_epsilon(1e-5) == epsilon > 0


def test_a_checkpoint_between_a_draw_and_its_step_resumes():
    engine, model, optimizer, loader = _zero_gradient_run(sampling="poisson")
    _noise_of_steps(model, optimizer, loader, 2)
    next(iter(loader))  # drawn, not stepped (a budget refusal leaves the same)
    fresh = _zero_gradient_run(sampling="poisson")[0]
    fresh.load_state_dict(engine.state_dict())
    assert fresh.accountant.steps == 2


def test_a_second_make_private_keeps_its_ledger_start():
    engine, model, optimizer, loader = _zero_gradient_run(sampling="poisson")
    _noise_of_steps(model, optimizer, loader, 2)
    data = DataLoader(TensorDataset(torch.randn(N, WIDTH, dtype=torch.float64)), batch_size=BATCH)
    model2 = models.zero_gradient_model(WIDTH)
    _, optimizer2, loader2 = engine.make_private(
        module=model2, optimizer=torch.optim.SGD(model2.parameters(), lr=1.0), data_loader=data,
        noise_multiplier=1.0, max_grad_norm=1.0, sampling="poisson")
    _noise_of_steps(model2, optimizer2, loader2, 1)
    state = engine.state_dict()
    assert state["ledger_start"] == 2 and state["steps_taken"] == 1
    fresh = _zero_gradient_run(sampling="poisson")[0]
    fresh.load_state_dict(state)
    assert fresh.accountant.steps == 3
