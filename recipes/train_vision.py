"""Train a small CNN on images with DP-SGD, end to end, offline (the classic Opacus setting).

    python recipes/train_vision.py                        # digits (8x8), sigma = 1.5: ~10 s on 2 cores
    python recipes/train_vision.py --epsilon 3            # calibrate sigma to reach epsilon = 3
    python recipes/train_vision.py --dataset fashion-mnist --batch-size 256 --noise-multiplier 1 --epochs 2
    python recipes/train_vision.py --norm batch --clipping per_layer  # BatchNorm CNN through dpfused.fix
    python recipes/train_vision.py --no-dp                # the same loop without privacy (baseline)
    python recipes/train_vision.py --bands 4              # BandMF correlated noise, b-min-sep sampling
    python recipes/train_vision.py --max-batch-size 160   # truncated Poisson: at most 160 images a step
    python recipes/train_vision.py --clipping-function automatic --lr 4  # AUTO-S clipping

Nothing is downloaded. Digits (1797 images of 8x8) ship with scikit-learn; Fashion-MNIST (60k + 10k
images of 28x28) with the Debian package `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist),
read from its idx files (gzipped or not) in --data-dir.

Coming from Opacus: `make_private` takes the same arguments (`noise_multiplier`, `max_grad_norm`,
Poisson sampling, `make_private_with_epsilon`); BatchNorm must go, as in Opacus (`dpfused.fix` swaps
it for GroupNorm, like `ModuleValidator.fix`); there is no `grad_sample`: per-example clipping happens
inside the one backward pass. `--clipping flat` clips each example's whole gradient to C (Opacus'
default); `per_layer` gives every layer its own threshold C / sqrt(#layers) (same sensitivity C).

The unit of privacy is one image; the test set is never trained on.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import math
import random
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpfused

HERE = str(Path(__file__).resolve().parent)  # recipes/, where common.py lives
if HERE not in sys.path:  # there for `python recipes/...`, not for an import by path
    sys.path.insert(0, HERE)
from common import TrainingLoop, mechanism, mechanism_in_words, parse_config  # noqa: E402

# dp_accounting's RDP screening logs convergence notes for fractional orders at small sigma; they
# do not change epsilon (those orders are dropped).
logging.getLogger("absl").setLevel(logging.ERROR)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where dataset-fashion-mnist installs it
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # data
    dataset: str = "digits"  # "digits" (scikit-learn, 8x8) | "fashion-mnist" (Debian package, 28x28)
    data_dir: str = FASHION_MNIST_DIR  # fashion-mnist: folder with the four idx files (.gz or raw)
    test_fraction: float = 0.2  # digits: share held out for test (Fashion-MNIST has its own test set)
    # model
    width: int = 16  # channels of the first conv block; the second has twice as many
    norm: str = "group"  # "group": GroupNorm built in | "batch": a BatchNorm CNN passed through dpfused.fix
    activation: str = "tanh"  # "tanh" | "relu"; bounded activations tend to do better under DP-SGD
    # privacy
    dp: bool = True  # False (--no-dp): the same loop without clipping or noise, the baseline
    noise_multiplier: float = 1.5  # sigma; ignored when `epsilon` is set
    epsilon: float | None = None  # target epsilon: calibrate sigma for the planned number of steps
    delta: float = 1e-5  # below 1 / N for both datasets
    max_grad_norm: float = 1.0  # C, the total clipping threshold
    clipping: str = "flat"  # "flat" (Opacus' default) | "per_layer"
    accountant: str = "pld"  # "pld" (tight; Opacus' "prv" maps to it) | "rdp" (looser, faster)
    # mechanism (docs/design.md §4-§6): the defaults are DP-SGD
    bands: int = 1  # BandMF: noise correlated over this many steps; > 1 samples b-min-sep (cyclic Poisson)
    bandmf_strategy: str = "sqrt"  # "sqrt" | "optimized" (for the planned steps and --momentum)
    max_batch_size: int | None = None  # truncated Poisson: at most this many images per logical step
    clipping_function: str = "standard"  # "standard" min(1, C/||g||) | "automatic" C/(||g||+0.01)
    # optimisation
    batch_size: int = 128  # expected logical batch (Poisson sampling rate q = batch_size / N); larger
    # batches with more noise usually beat small ones at the same epsilon (signal grows with B, noise not)
    max_physical_batch_size: int | None = None  # split logical batches to bound memory
    lr: float | None = None  # None: 1.0 with DP (the clipped mean gradient has norm <= C), 0.1 without
    momentum: float = 0.5  # 0: plain SGD
    epochs: int = 20
    steps: int | None = None  # train exactly this many optimizer steps instead of `epochs` epochs
    eval_batch_size: int = 1024
    # run
    device: str = "cpu"
    seed: int = 0
    log_loss: str = "off"  # "off": the bar shows epsilon but no training loss (a function of the
    #                        private data); "unprotected": also the raw loss, NOT covered by DP
    eps_every: int = 50  # refresh epsilon on the progress bar every this many steps: get_epsilon costs
    #                     ~0.15 s a call, ~6 digits steps (100 steps: 3 s; refreshed every step: 17 s).
    #                     An older epsilon is marked with its step ("1.23@50"), never shown as current
    explain: bool = False  # print dpfused.explain(model): each layer's rule, group and norm path
    out: str | None = "runs/train_vision"  # checkpoint directory; "" or None: do not save


CHOICES = {
    "dataset": ("digits", "fashion-mnist"),
    "norm": ("group", "batch"),
    "activation": ("tanh", "relu"),
    "clipping": ("flat", "per_layer"),
    "accountant": ("pld", "rdp"),
    "bandmf_strategy": ("sqrt", "optimized"),
    "clipping_function": ("standard", "automatic"),
}


def parse_args(argv: list[str] | None = None) -> Config:
    """Every Config field becomes a flag: `--name VALUE`, `--name` for a False default, `--no-name`
    for a True one."""
    return parse_config(Config, argv, description=__doc__.split("\n")[0], choices=CHOICES)


# ----------------------------------------------------------------------------------------------------
# Data


def scale(images: torch.Tensor, max_value: float) -> torch.Tensor:
    """Pixels to [-1, 1] with fixed constants: a mean/std measured on the training set would be a
    (small) release of private data that no accountant covers."""
    return (images.float() / max_value - 0.5) / 0.5


def load_digits(test_fraction: float, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled digits: (N, 1, 8, 8) images in [-1, 1] and labels 0-9, split seeded."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise FileNotFoundError(
            "--dataset digits ships with scikit-learn, which is not installed; install it: "
            "pip install scikit-learn"
        ) from None
    digits = sklearn_digits()
    images = scale(torch.from_numpy(digits.images), 16.0).unsqueeze(1)  # (N, 1, 8, 8); pixels 0..16
    labels = torch.from_numpy(digits.target).long()  # (N,)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(labels))
    test, train = order[:n_test], order[n_test:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test])


def read_idx(path: Path) -> torch.Tensor:
    """An idx file (MNIST's format: big-endian magic with the dtype code and rank, then the sizes)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    zero, dtype_code, rank = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:  # 0x08: unsigned byte, the only type MNIST-style files use
        raise ValueError(f"{path} is not an unsigned-byte idx file (header {raw[:4].hex()})")
    shape = struct.unpack(f">{rank}I", raw[4 : 4 + 4 * rank])
    data = torch.frombuffer(bytearray(raw[4 + 4 * rank :]), dtype=torch.uint8)
    return data.reshape(shape)


def find_idx(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}[.gz] not found in {data_dir}; install the dataset: "
        f"apt-get install -y dataset-fashion-mnist (it installs to {FASHION_MNIST_DIR}), or pass "
        "--data-dir with the four idx files"
    )


def load_fashion_mnist(data_dir: str) -> tuple[TensorDataset, TensorDataset]:
    """Fashion-MNIST's own train/test split: (N, 1, 28, 28) images in [-1, 1] and labels 0-9."""
    splits = []
    for images_name, labels_name in FASHION_MNIST_FILES.values():
        images = read_idx(find_idx(Path(data_dir), images_name))  # (N, 28, 28) uint8
        labels = read_idx(find_idx(Path(data_dir), labels_name))  # (N,) uint8
        splits.append(TensorDataset(scale(images, 255.0).unsqueeze(1), labels.long()))
    return splits[0], splits[1]


def load_dataset(cfg: Config) -> tuple[TensorDataset, TensorDataset]:
    if cfg.dataset == "digits":
        return load_digits(cfg.test_fraction, cfg.seed)
    return load_fashion_mnist(cfg.data_dir)


# ----------------------------------------------------------------------------------------------------
# Model


class ConvNet(nn.Module):
    """Two conv blocks (conv 3x3 -> norm -> activation -> 2x2 max pool) and a linear classifier."""

    def __init__(self, *, in_channels: int, image_size: int, num_classes: int, width: int, norm: str,
                 activation: str):
        super().__init__()
        make_norm = (lambda c: nn.GroupNorm(4, c)) if norm == "group" else nn.BatchNorm2d
        act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), make_norm(width), act(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), make_norm(2 * width), act(), nn.MaxPool2d(2),
        )
        side = image_size // 4  # two 2x2 pools
        self.classifier = nn.Linear(2 * width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.classifier(self.features(x).flatten(1))


def build_model(cfg: Config, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    model = ConvNet(in_channels=in_channels, image_size=image_size, num_classes=num_classes,
                    width=cfg.width, norm=cfg.norm, activation=cfg.activation)
    # BatchNorm normalizes with batch statistics, so one image would move every other image's gradient;
    # dpfused.fix swaps it for GroupNorm (a model built with GroupNorm is unchanged).
    return dpfused.fix(model).to(cfg.device)


# ----------------------------------------------------------------------------------------------------
# Train / evaluate / save


class Recipe(TrainingLoop):
    """setup, the shared loop (TrainingLoop.train) over train_step, evaluate, save_checkpoint."""

    loss_decay = 0.95  # many short, noisy steps: the bar averages over ~20 of them

    def setup(self) -> None:
        cfg = self.cfg
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.train_set, self.test_set = load_dataset(cfg)
        images = self.train_set.tensors[0]  # (N, C, H, W)
        self.model_args = dict(in_channels=images.shape[1], image_size=images.shape[-1], num_classes=10)
        self.model = build_model(cfg, **self.model_args)
        self.model.train()
        lr = cfg.lr if cfg.lr is not None else (1.0 if cfg.dp else 0.1)  # unclipped gradients are larger
        optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=cfg.momentum)
        train_loader = DataLoader(self.train_set, batch_size=cfg.batch_size, shuffle=True)
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * len(train_loader)
        if cfg.dp:
            optimizer, train_loader = self.make_private(optimizer, train_loader)
        self.optimizer, self.train_loader = optimizer, train_loader
        print(
            f"{cfg.dataset}: train {len(self.train_set)} / test {len(self.test_set)} images of "
            f"{tuple(images.shape[1:])}; model {sum(p.numel() for p in self.model.parameters()) / 1e3:.1f}k "
            f"params; " + (f"DP {cfg.clipping} clipping, {mechanism_in_words(cfg)}" if cfg.dp
                           else "no DP")
        )

    def make_private(self, optimizer, train_loader):
        cfg = self.cfg
        self.engine = dpfused.PrivacyEngine(accountant=cfg.accountant)
        common = dict(
            module=self.model,
            optimizer=optimizer,
            data_loader=train_loader,
            max_grad_norm=cfg.max_grad_norm,
            clipping=cfg.clipping,
            loss_reduction="mean",  # F.cross_entropy's default reduction below
            max_physical_batch_size=cfg.max_physical_batch_size,
            **mechanism(cfg, self.total_steps, momentum=cfg.momentum),
        )
        if cfg.epsilon is not None:  # calibrate for the steps train() will take, so epsilon is reached
            self.model, optimizer, train_loader = self.engine.make_private_with_epsilon(
                target_epsilon=cfg.epsilon, target_delta=cfg.delta, steps=self.total_steps, **common
            )
            print(f"calibrated noise multiplier {optimizer.noise_multiplier:.3f} for epsilon {cfg.epsilon:g} "
                  f"over {self.total_steps} steps")
        else:
            self.model, optimizer, train_loader = self.engine.make_private(
                noise_multiplier=cfg.noise_multiplier, **common
            )
        return optimizer, train_loader

    def train_step(self, batch: list[torch.Tensor]) -> float:
        images, labels = (t.to(self.cfg.device) for t in batch)  # (B, C, H, W), (B,)
        self.optimizer.zero_grad(set_to_none=True)
        if images.shape[0] == 0:
            # An empty Poisson batch still takes a noisy step: skipping it would reveal that the batch
            # was empty (and a mean over zero examples is NaN), so step without a backward.
            self.optimizer.step()
            return math.nan
        loss = F.cross_entropy(self.model(images), labels)  # mean over the batch
        loss.backward()  # one backward: per-example norms and clipping happen inside it
        self.optimizer.step()  # noise is added once per logical batch
        return loss.item()

    def evaluate(self) -> float:
        return accuracy(self.model, self.test_set, self.cfg.eval_batch_size, self.cfg.device)

    def save_checkpoint(self, out: Path) -> None:
        """training_state.pt: model, optimizer, accountant ledger, sampler position and noise
        stream, RNG, config, as plain data; `load_checkpoint` rebuilds the model from it. SECRET
        as the data (the sampler and noise states let whoever holds them replay training):
        publish the weights alone, never this file."""
        out.mkdir(parents=True, exist_ok=True)
        state = {
            "config": dataclasses.asdict(self.cfg),
            "model_args": self.model_args,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        if self.engine is not None:
            state["epsilon"], state["delta"] = self.epsilon(), self.cfg.delta
            state["engine"] = self.engine.state_dict()
        torch.save(state, out / "training_state.pt")


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, batch_size: int, device: str) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for images, labels in DataLoader(data, batch_size=batch_size):
        correct += (model(images.to(device)).argmax(dim=1) == labels.to(device)).sum().item()
    model.train(was_training)
    return correct / len(data)


def load_checkpoint(out: str | Path) -> tuple[nn.Module, dict]:
    """The trained model (in eval mode) and the saved training state, from `save_checkpoint`'s file."""
    # weights_only: plain data only, so a tampered file cannot run code when it is loaded.
    state = torch.load(Path(out) / "training_state.pt", weights_only=True)
    cfg = dataclasses.replace(Config(**state["config"]), device="cpu")
    model = build_model(cfg, **state["model_args"])
    model.load_state_dict(state["model"])
    return model.eval(), state


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    start = time.perf_counter()
    recipe = Recipe(cfg)
    recipe.setup()
    acc_before = recipe.evaluate()
    print(f"test accuracy before training: {acc_before:.3f}")
    recipe.train()
    if recipe.engine is not None:
        if cfg.explain:
            print(dpfused.explain(recipe.model))
        dpfused.detach(recipe.model)  # plain nn.Module again
    acc_after = recipe.evaluate()
    eps = recipe.epsilon()
    print(f"test accuracy after training:  {acc_after:.3f}")
    if recipe.engine is not None:
        print(f"privacy: epsilon = {eps:.2f} at delta = {cfg.delta:g} after {recipe.step} steps")
        print(recipe.engine.privacy_report(delta=cfg.delta))
    else:
        print("privacy: none (--no-dp)")
    if cfg.out:
        recipe.save_checkpoint(Path(cfg.out))
        print(f"checkpoint: {cfg.out}")
    print(f"wall time: {time.perf_counter() - start:.0f} s")
    return {"acc_before": acc_before, "acc_after": acc_after, "epsilon": eps, "delta": cfg.delta,
            "steps": recipe.step,
            # truncated Poisson: logical batches cut to --max-batch-size (not private, see §6)
            "truncated_batches": getattr(recipe.train_loader, "truncated_batches", None)}


if __name__ == "__main__":
    main()
