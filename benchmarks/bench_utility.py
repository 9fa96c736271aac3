"""Utility at equal epsilon: DP-SGD, BandMF (two band counts), truncated Poisson and automatic
clipping, against the non-private run, on the vision recipe and a small LoRA language model.

    python benchmarks/bench_utility.py                 # both tasks, 3 seeds: ~30-40 min on 2 busy cores
    python benchmarks/bench_utility.py --smoke         # ~20 s: 3 steps, 1 seed, a fixed sigma (CI)

Each mechanism gets the noise multiplier that spends exactly the target epsilon over the same
number of steps (``dpfused.accounting.calibrate_noise_multiplier`` with its own sampling: Poisson,
cyclic Poisson with b partitions for BandMF, truncated Poisson), calibrated once and used for every
seed; the runs are the recipes' own ``main`` with the mechanism's flags. Writes
``<out>.md`` (the tables), ``<out>.json`` (every run) and ``<out>.png`` (the plot), and prints the
tables. Also prints the strategy table of docs/design.md §5.1: the error of the noise in the
model iterates against the step count, for DP-SGD and BandMF, at equal sigma and at equal epsilon.

Vision: ``recipes/train_vision.py`` on Fashion-MNIST when the Debian package
dataset-fashion-mnist is installed (/usr/share/datasets/fashion-mnist), else on scikit-learn's
digits; the table says which. Language model: ``recipes/finetune_llama.py``'s random-init Llama
with a LoRA adapter on the Lee news corpus, held-out perplexity.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dpfused  # noqa: E402
from dpfused import privacy_math  # noqa: E402
from dpfused.accounting import calibrate_noise_multiplier  # noqa: E402
from dpfused.bandmf import (  # noqa: E402
    optimized_toeplitz_coefficients,
    sqrt_toeplitz_coefficients,
    toeplitz_error,
)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Mechanism:
    """One row of the table: the recipe flags and what calibration needs to know of them."""

    name: str
    flags: tuple[str, ...] = ()
    bands: int = 1
    strategy: str = "sqrt"
    max_batch_size: int | None = None
    private: bool = True


@dataclass
class Task:
    name: str
    recipe: str
    metric: str  # key of the recipe's result dict
    higher_is_better: bool
    num_samples: int
    batch_size: int
    steps: int
    base_flags: list[str] = field(default_factory=list)
    momentum: float = 0.0


def mechanisms(task: Task, bands: tuple[int, int]) -> list[Mechanism]:
    """Non-private, DP-SGD, BandMF at two band counts (optimized for the task's steps and
    momentum), truncated Poisson at about two standard deviations above q N, automatic clipping."""
    expected = task.batch_size
    limit = int(math.ceil(expected + 2 * math.sqrt(expected)))
    rows = [Mechanism("non-private", ("--no-dp",), private=False), Mechanism("DP-SGD")]
    for b in bands:
        strategy = "optimized" if b <= task.steps else "sqrt"
        rows.append(Mechanism(f"BandMF b={b} ({strategy})",
                              ("--bands", str(b), "--bandmf-strategy", strategy), bands=b,
                              strategy=strategy))
    cut = privacy_math.truncation_probability(num_samples=task.num_samples,
                                              sample_rate=task.batch_size / task.num_samples,
                                              max_batch_size=limit)
    rows.append(Mechanism(f"truncated Poisson K={limit} (P[cut] = {cut:.2g})",
                          ("--max-batch-size", str(limit)), max_batch_size=limit))
    rows.append(Mechanism("automatic clipping (AUTO-S)", ("--clipping-function", "automatic")))
    return rows


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_recipe_{name}",
                                                  REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def calibrated_sigma(task: Task, mechanism: Mechanism, epsilon: float, delta: float) -> float:
    """The sigma that spends ``epsilon`` over the task's steps with this mechanism's sampling."""
    kwargs = dict(target_epsilon=epsilon, delta=delta, num_samples=task.num_samples,
                  batch_size=task.batch_size, steps=task.steps)
    if mechanism.bands > 1:
        noise = dpfused.BandMF(bands=mechanism.bands, strategy=mechanism.strategy,
                               steps=task.steps if mechanism.strategy == "optimized" else None,
                               momentum=task.momentum if mechanism.strategy == "optimized" else 0)
        sigma = calibrate_noise_multiplier(sampling="cyclic_poisson", partitions=mechanism.bands,
                                           **kwargs)
        return sigma * noise.max_column_norm
    return calibrate_noise_multiplier(sampling="poisson", max_batch_size=mechanism.max_batch_size,
                                      **kwargs)


def run_once(recipe, task: Task, mechanism: Mechanism, sigma: float | None, seed: int) -> dict:
    argv = [*task.base_flags, "--steps", str(task.steps), "--seed", str(seed), "--out", "",
            "--eps-every", str(10**9), *mechanism.flags]
    if mechanism.private:
        argv += ["--noise-multiplier", repr(sigma)]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result = recipe.main(argv)
    return {"seed": seed, "metric": float(result[task.metric]),
            "epsilon": float(result["epsilon"]), "seconds": time.perf_counter() - start,
            "truncated_batches": result.get("truncated_batches")}


def tasks(args) -> list[Task]:
    out = []
    if "vision" in args.tasks:
        fashion = FASHION_MNIST_DIR.is_dir()
        out.append(Task(
            name="vision: " + ("Fashion-MNIST" if fashion else "digits (scikit-learn; "
                               "Fashion-MNIST not installed)"),
            recipe="train_vision", metric="acc_after", higher_is_better=True,
            num_samples=60000 if fashion else 1437, batch_size=args.vision_batch,
            steps=args.vision_steps, momentum=0.5,
            base_flags=["--dataset", "fashion-mnist" if fashion else "digits", "--batch-size",
                        str(args.vision_batch)]))
    if "lm" in args.tasks:
        out.append(Task(
            name="LoRA LM: random-init Llama (1 layer, hidden 64), LoRA rank 4, Lee corpus",
            recipe="finetune_llama", metric="ppl_after", higher_is_better=False,
            num_samples=2011, batch_size=args.lm_batch, steps=args.lm_steps,
            base_flags=["--block-size", "32", "--n-layer", "1", "--n-head", "2", "--n-kv-head",
                        "1", "--hidden-size", "64", "--intermediate-size", "128", "--lora-rank",
                        "4", "--batch-size", str(args.lm_batch)]))
    return out


def strategy_table(*, num_samples: int, batch_size: int, epsilon: float, delta: float,
                   steps_list, bands_list, momentum: float) -> list[dict]:
    """RMSE of the noise in the iterates (units of sigma C lr) for DP-SGD and BandMF, at equal
    sigma and, multiplied by each mechanism's calibrated sigma, at equal epsilon."""
    rows = []
    q = batch_size / num_samples
    for steps in steps_list:
        sigma = calibrate_noise_multiplier(target_epsilon=epsilon, delta=delta, sampling="poisson",
                                           sample_rate=q, steps=steps)
        error = toeplitz_error((1.0,), steps=steps, momentum=momentum)
        rows.append({"steps": steps, "mechanism": "DP-SGD", "error": error, "sigma": sigma})
        for b in bands_list:
            if b > steps or q * b > 1:
                continue
            sigma_b = calibrate_noise_multiplier(target_epsilon=epsilon, delta=delta,
                                                 sampling="cyclic_poisson", sample_rate=q,
                                                 partitions=b, num_samples=num_samples,
                                                 steps=steps)
            for name, coefficients in (("sqrt", sqrt_toeplitz_coefficients(b)),
                                       ("optimized", optimized_toeplitz_coefficients(b, steps,
                                                                                     momentum))):
                rows.append({"steps": steps, "mechanism": f"BandMF b={b} {name}",
                             "error": toeplitz_error(coefficients, steps=steps, momentum=momentum),
                             "sigma": sigma_b})
    return rows


def markdown(results, strategy_rows, args) -> str:
    lines = [f"Target epsilon {args.epsilon:g} at delta {args.delta:g}; every private row spends "
             "it over the same steps (its own calibrated sigma); mean ± standard deviation over "
             f"{args.seeds} seed(s); per-seed values in brackets.", ""]
    for task in results:
        arrow = "higher is better" if task["higher_is_better"] else "lower is better"
        lines += [f"**{task['name']}**: {task['steps']} steps, expected batch {task['batch']}, "
                  f"metric `{task['metric']}` ({arrow}).", "",
                  "| mechanism | sigma | epsilon | metric | per seed | s/run |",
                  "|---|---|---|---|---|---|"]
        for row in task["rows"]:
            values = [r["metric"] for r in row["runs"]]
            mean = statistics.fmean(values)
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            eps = max(r["epsilon"] for r in row["runs"])
            sigma = "-" if row["sigma"] is None else f"{row['sigma']:.3f}"
            cuts = [r.get("truncated_batches") for r in row["runs"]]
            name = row["mechanism"]
            if "truncated" in name and all(c is not None for c in cuts):
                name += f"; cut {'/'.join(map(str, cuts))} of {task['steps']} steps"
            lines.append(
                f"| {name} | {sigma} "
                f"| {'inf' if math.isinf(eps) else f'{eps:.3f}'} | {mean:.4g} ± {spread:.2g} "
                f"| [{', '.join(f'{v:.4g}' for v in values)}] "
                f"| {statistics.fmean(r['seconds'] for r in row['runs']):.0f} |")
        lines.append("")
    if strategy_rows:
        lines += ["**Noise in the iterates** (docs/design.md §5.1): RMSE per coordinate of the "
                  "noise the model carries after SGD (momentum "
                  f"{args.strategy_momentum:g}), in units of sigma C lr, over T steps; times the "
                  "mechanism's own calibrated sigma at the vision task's N and batch, i.e. at "
                  "equal epsilon.", "",
                  "| T | mechanism | error at equal sigma | sigma for the target epsilon | "
                  "error at equal epsilon |", "|---|---|---|---|---|"]
        for row in strategy_rows:
            lines.append(f"| {row['steps']} | {row['mechanism']} | {row['error']:.3f} | "
                         f"{row['sigma']:.3f} | {row['error'] * row['sigma']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, task in zip(axes[0], results):
        names = [row["mechanism"] for row in task["rows"]]
        values = [[r["metric"] for r in row["runs"]] for row in task["rows"]]
        means = [statistics.fmean(v) for v in values]
        spreads = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.barh(range(len(names)), means, xerr=spreads, color="tab:blue")
        for i, v in enumerate(values):
            ax.plot(v, [i] * len(v), "k.", markersize=4)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(task["metric"])
        ax.set_title(task["name"].split(":")[0] + f" ({task['steps']} steps)", fontsize=9)
        if not task["higher_is_better"]:
            ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return (f"{name}, {os.cpu_count()} cores, load average "
            f"{load[0]:.1f} at the end; torch {torch.__version__}, Python "
            f"{platform.python_version()}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="vision,lm", help="comma-separated: vision, lm")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--vision-steps", type=int, default=400)
    parser.add_argument("--vision-batch", type=int, default=64)
    parser.add_argument("--lm-steps", type=int, default=40)
    parser.add_argument("--lm-batch", type=int, default=32)
    parser.add_argument("--bands", default="4,16", help="the two BandMF band counts")
    parser.add_argument("--sigma", type=float, default=None,
                        help="skip calibration: this sigma for every private row (the smoke test)")
    parser.add_argument("--strategy-momentum", type=float, default=0.5)
    parser.add_argument("--no-strategy-table", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "utility"),
                        help="writes <out>.md, <out>.json and <out>.png")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: vision only, 3 steps, 1 seed, sigma 3, no strategy table")
    args = parser.parse_args(argv)
    if args.smoke:
        # sigma 3: the truncated row's PLD accounting (seconds at small sigma) stays quick
        args.tasks, args.seeds, args.vision_steps, args.sigma = "vision", 1, 3, 3.0
        args.no_strategy_table = True
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    bands = tuple(int(b) for b in args.bands.split(","))
    results = []
    for task in tasks(args):
        recipe = load_recipe(task.recipe)
        rows = []
        for mechanism in mechanisms(task, bands):
            sigma = None
            if mechanism.private:
                sigma = args.sigma if args.sigma is not None else calibrated_sigma(
                    task, mechanism, args.epsilon, args.delta)
            runs = [run_once(recipe, task, mechanism, sigma, seed) for seed in range(args.seeds)]
            rows.append({"mechanism": mechanism.name, "sigma": sigma, "runs": runs})
            print(f"{task.name.split(':')[0]:7s} {mechanism.name:32s} sigma "
                  f"{'-' if sigma is None else f'{sigma:.3f}':>6s}  {task.metric} "
                  f"{[round(r['metric'], 4) for r in runs]}", flush=True)
        results.append({"name": task.name, "steps": task.steps, "batch": task.batch_size,
                        "metric": task.metric, "higher_is_better": task.higher_is_better,
                        "rows": rows})
    strategy_rows = [] if args.no_strategy_table else strategy_table(
        num_samples=1437, batch_size=args.vision_batch, epsilon=args.epsilon, delta=args.delta,
        steps_list=(100, 400, 1000, 4000), bands_list=bands, momentum=args.strategy_momentum)
    text = markdown(results, strategy_rows, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_utility.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv)
    text = f"{text}\nCommand: `{command.strip()}`. Machine: {machine()}.\n"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"results": results, "strategy": strategy_rows},
                                                   indent=1))
    plot(results, out.with_suffix(".png"))
    print(text)
    return {"results": results, "strategy": strategy_rows}


if __name__ == "__main__":
    main()
