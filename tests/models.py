"""Small float64 models and batches for the oracle tests: one factory per model family.

Each factory returns ``Case(model, inputs, example_loss, batch_loss)`` where ``example_loss(call,
inputs)`` is one example's loss through a functional ``call`` (oracle), and ``batch_loss(model,
inputs, reduction)`` is the loss a user would backpropagate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpfused.losses import per_example_lm_loss


@dataclass
class Case:
    model: nn.Module
    inputs: tuple
    example_loss: Callable
    batch_loss: Callable


def _classification(model, inputs, labels):
    def example_loss(call, batched):
        *xs, y = batched
        return F.cross_entropy(call(*xs), y, reduction="sum")

    def batch_loss(m, batched, reduction="mean"):
        *xs, y = batched
        return F.cross_entropy(m(*xs), y, reduction=reduction)

    return Case(model, (*inputs, labels), example_loss, batch_loss)


def mlp(batch, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5)).double()
    return _classification(model, (torch.randn(batch, 7, dtype=torch.float64),),
                           torch.randint(0, 5, (batch,)))


class SequenceMLP(nn.Module):
    """Linear layers on (B, T, d) and (B, T1, T2, d) inputs: the 3-D and N-D linear paths."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 9)
        self.norm = nn.RMSNorm(9)
        self.wide = nn.Linear(9, 3, bias=False)
        self.head = nn.Linear(3, 4)

    def forward(self, x):  # (B, T1, T2, 5)
        h = self.norm(torch.tanh(self.inner(x))).flatten(1, 2)  # (B, T, 9)
        return self.head(torch.tanh(self.wide(h)).mean(dim=1))


def sequence_mlp(batch, seed=0):
    torch.manual_seed(seed)
    model = SequenceMLP().double()
    return _classification(model, (torch.randn(batch, 3, 2, 5, dtype=torch.float64),),
                           torch.randint(0, 4, (batch,)))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.norm1 = nn.GroupNorm(2, 6)
        self.conv2 = nn.Conv2d(6, 4, 3, stride=2, groups=2, padding=1, padding_mode="reflect")
        self.conv1d = nn.Conv1d(4, 3, 2, dilation=2, bias=False)
        self.head = nn.Linear(3, 5)

    def forward(self, x):  # (B, 3, 7, 6)
        h = torch.relu(self.norm1(self.conv1(x)))
        h = torch.relu(self.conv2(h)).flatten(2)  # (B, 4, L)
        return self.head(torch.tanh(self.conv1d(h)).mean(dim=2))


def cnn(batch, seed=0):
    torch.manual_seed(seed)
    return _classification(SmallCNN().double(), (torch.randn(batch, 3, 7, 6, dtype=torch.float64),),
                           torch.randint(0, 5, (batch,)))


class Volume(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=1)
        self.head = nn.Linear(3, 2)

    def forward(self, x):  # (B, 2, 4, 5, 3)
        return self.head(torch.tanh(self.conv(x)).mean(dim=(2, 3, 4)))


def conv3d(batch, seed=0):
    torch.manual_seed(seed)
    return _classification(Volume().double(), (torch.randn(batch, 2, 4, 5, 3, dtype=torch.float64),),
                           torch.randint(0, 2, (batch,)))


class PaddedBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)).mean(dim=1))


def padded_embedding(batch, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(0, 20, (batch, 9))
    ids[:, -3:] = 0  # padding positions
    ids[0, :2] = 5  # a repeated id
    return _classification(PaddedBag().double(), (ids,), torch.randint(0, 3, (batch,)))


class TinyTransformer(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(30, 8, padding_idx=1)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0,
                                           batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.cross = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 4)

    def forward(self, ids):  # ids (B, T)
        x = self.embed(ids if self.batch_first else ids.t())
        pad = ids == 1
        h = self.encoder(x, src_key_padding_mask=pad)
        q = h[:, :1] if self.batch_first else h[:1]
        out, _ = self.cross(q, h, h, key_padding_mask=pad)
        return self.head(out.mean(dim=1 if self.batch_first else 0))


def transformer(batch, seed=0, batch_first=True):
    torch.manual_seed(seed)
    ids = torch.randint(2, 30, (batch, 6))
    ids[-1, -2:] = 1
    return _classification(TinyTransformer(batch_first).double(), (ids,),
                           torch.randint(0, 4, (batch,)))


def _lm_case(model, batch, seq, vocab, seed):
    torch.manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    lengths = [seq - (i % 3) for i in range(batch)]  # ragged: right padding
    for i, n in enumerate(lengths):
        mask[i, n:] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def example_loss(call, batched):
        ids_, mask_, labels_ = batched
        logits = call(input_ids=ids_, attention_mask=mask_).logits
        return per_example_lm_loss(logits, labels_, reduction="sum")

    def batch_loss(m, batched, reduction="mean"):
        ids_, mask_, labels_ = batched
        return per_example_lm_loss(m(input_ids=ids_, attention_mask=mask_).logits, labels_,
                                   reduction=reduction)

    return Case(model, (ids, mask, labels), example_loss, batch_loss)


def gpt2(batch, seed=0, seq=7):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=12, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        attn_implementation="eager")
    model = GPT2LMHeadModel(config).double().train()
    assert model.lm_head.weight is model.transformer.wte.weight
    return _lm_case(model, batch, seq, 40, seed)


def llama(batch, seed=0, seq=6, tied=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=36, hidden_size=16, intermediate_size=20, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=tied, attn_implementation="eager")
    model = LlamaForCausalLM(config).double().train()
    return _lm_case(model, batch, seq, 36, seed)


def gpt2_lora(batch, seed=0):
    from peft import LoraConfig, get_peft_model

    case = gpt2(batch, seed)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], lora_dropout=0.0,
                        fan_in_fan_out=True)
    model = get_peft_model(case.model, config)
    for name, p in model.named_parameters():  # random B so that adapter gradients are non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    case.model = model.train()
    return case


FACTORIES = {
    "mlp": mlp,
    "sequence_mlp": sequence_mlp,
    "cnn_groupnorm": cnn,
    "conv3d": conv3d,
    "padded_embedding": padded_embedding,
    "transformer_encoder": transformer,
    "transformer_seq_first": lambda b, seed=0: transformer(b, seed, batch_first=False),
    "gpt2_tied": gpt2,
    "llama_gqa": llama,
    "llama_tied": lambda b, seed=0: llama(b, seed, tied=True),
    "gpt2_lora": gpt2_lora,
}


class ZeroGradient(nn.Module):
    """A model whose gradients are all zero: the released update is the noise alone."""

    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width, bias=False)

    def forward(self, x):
        return self.lin(x) * 0.0


def zero_gradient_model(width=120):
    return ZeroGradient(width).double()
