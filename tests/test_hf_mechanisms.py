"""DPTrainer with the mechanisms of issue 22 (BandMF, truncated Poisson, automatic clipping) equals
the hand-written make_private loop with the same arguments."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import dpfused  # noqa: E402
from dpfused.hf import PrivacyArguments  # noqa: E402
from tests.test_hf import (  # noqa: E402
    ACCUMULATION,
    PER_DEVICE,
    TokenBlocks,
    assert_same_parameters,
    dp_trainer,
    llama_lora,
    sgd,
)

MECHANISMS = {
    "bandmf": dict(noise=dpfused.BandMF(bands=2), sampling="cyclic_poisson"),
    "truncated": dict(max_batch_size=7),
    "automatic": dict(clipping_function="automatic", stability=0.05),
}


def _loop(model, dataset, *, steps, seed=7, **mechanism):
    engine = dpfused.PrivacyEngine()
    model.train()
    loader = torch.utils.data.DataLoader(dataset, batch_size=PER_DEVICE * ACCUMULATION)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=sgd(model), data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=0.1, max_physical_batch_size=PER_DEVICE,
        sampling_generator=torch.Generator().manual_seed(seed),
        noise_generator=torch.Generator().manual_seed(seed + 1), **mechanism)
    taken = 0
    while taken < steps:
        for batch in loader:
            optimizer.zero_grad()
            if batch["input_ids"].shape[0] > 0:
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
                dpfused.per_example_lm_loss(logits, batch["labels"]).backward()
            optimizer.step()
            if loader.current.is_last_physical:
                taken += 1
                if taken == steps:
                    break
    return model, engine


@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_dp_trainer_runs_each_mechanism_like_make_private(tmp_path, name):
    dataset = TokenBlocks()
    model = llama_lora()
    reference, engine = _loop(copy.deepcopy(model), dataset, steps=4, **MECHANISMS[name])
    privacy = PrivacyArguments(noise_multiplier=1.0, per_sample_max_grad_norm=0.1, privacy_seed=7,
                               **MECHANISMS[name])
    trainer = dp_trainer(model, tmp_path, dataset=dataset, privacy=privacy, max_steps=4)
    trainer.train()
    assert_same_parameters(trainer.model, reference)
    assert trainer.privacy_engine.get_epsilon(1e-5) == pytest.approx(engine.get_epsilon(1e-5))
    if name == "bandmf":
        assert "BandMF" in trainer.privacy_report().noise


def test_dp_trainer_resumes_bandmf_with_its_history(tmp_path):
    privacy = dict(noise_multiplier=1.0, per_sample_max_grad_norm=0.1, privacy_seed=7,
                   **MECHANISMS["bandmf"])
    model = llama_lora()
    resumed_model = copy.deepcopy(model)
    full = dp_trainer(model, tmp_path / "full", privacy=PrivacyArguments(**privacy), max_steps=4,
                      save_strategy="steps", save_steps=2)
    full.train()
    resumed = dp_trainer(resumed_model, tmp_path / "resumed", privacy=PrivacyArguments(**privacy),
                         max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert_same_parameters(resumed.model, full.model)
    assert resumed.get_epsilon() == full.get_epsilon()
