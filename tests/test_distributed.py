"""DeepSpeed settings from the recipe (orpo/distributed.py): the shipped JSON files pass and get
the recipe's numbers; a config that would change what a step means, or let DeepSpeed apply a
non-finite update, is refused by name. Real multi-process runs: tests/test_multiprocess.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from orpo.config import ConfigError, load_config, plan_batches
from orpo.distributed import check_engine_agrees, configure_deepspeed
from tests.conftest import ROOT

DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


def accelerator_with(ds: dict[str, Any]) -> SimpleNamespace:
    """The one thing configure_deepspeed reads: accelerate's DeepSpeed plugin and its config dict."""
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)))


def configure(ds: dict[str, Any], *overrides: str) -> dict[str, Any]:
    cfg = load_config(None, ["global_batch_size=16", "per_device_batch_size=2", "max_grad_norm=0.5", *overrides])
    configure_deepspeed(accelerator_with(ds), cfg, plan_batches(cfg, 2))
    return ds


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_shipped_deepspeed_configs_get_the_recipe_numbers(path: Path) -> None:
    ds = configure(json.loads(path.read_text()), "optim=adamw_torch")  # offload needs DeepSpeed's CPU Adam
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4  # 16 = 2 per micro-batch x 4 x 2 processes
    assert ds["train_batch_size"] == 16
    assert ds["gradient_clipping"] == 0.5


def test_shipped_deepspeed_configs_exist() -> None:
    assert {p.name for p in DS_CONFIGS} >= {"zero2.json", "zero3.json", "zero3_offload.json"}


def test_a_number_that_disagrees_with_the_recipe_is_named() -> None:
    ds = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 2}
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=2 but the recipe implies 4"):
        configure(ds)


def test_a_number_that_agrees_is_kept() -> None:
    assert configure({"zero_optimization": {"stage": 3}, "train_batch_size": 16})["train_batch_size"] == 16


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_optimizer_or_scheduler_section_is_refused(section: str) -> None:
    with pytest.raises(ConfigError, match=f"has an '{section}' section"):
        configure({"zero_optimization": {"stage": 2}, section: {"type": "AdamW"}})


@pytest.mark.parametrize("ds", [{}, {"zero_optimization": {"stage": 0}}], ids=["no-zero-section", "stage-0"])
def test_stage_0_is_refused_for_ddp(ds: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"zero_optimization.stage=0; expected 1, 2 or 3.*ddp.yaml"):
        configure(ds)


def test_bf16_without_the_overflow_check_is_refused() -> None:
    ds = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True, "check_grad_overflow": False}}
    with pytest.raises(ConfigError, match=r"bf16.check_grad_overflow=false"):
        configure(ds)
    ds["bf16"]["check_grad_overflow"] = True
    configure(ds)


def engine_that(applied: bool) -> SimpleNamespace:
    engine = SimpleNamespace(was_step_applied=lambda: applied)
    return SimpleNamespace(deepspeed_engine_wrapped=SimpleNamespace(engine=engine))


def test_engine_and_loop_must_agree_on_a_skip() -> None:
    check_engine_agrees(engine_that(applied=True), finite=True, step=3)
    check_engine_agrees(engine_that(applied=False), finite=False, step=3)
    with pytest.raises(RuntimeError, match=r"step 3: the DeepSpeed engine applied the update .* should be skipped"):
        check_engine_agrees(engine_that(applied=True), finite=False, step=3)
    with pytest.raises(RuntimeError, match=r"step 7: the DeepSpeed engine skipped the update .* should be applied"):
        check_engine_agrees(engine_that(applied=False), finite=True, step=7)


def test_without_deepspeed_there_is_nothing_to_agree_with() -> None:
    check_engine_agrees(SimpleNamespace(), finite=False, step=1)
    configure_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)), load_config(), None)
