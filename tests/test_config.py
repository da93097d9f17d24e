"""Config: shipped recipes load, defaults are the published recipe, bad input is named clearly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from orpo.config import ConfigError, TrainConfig, load_config, parse_override, plan_batches
from tests.conftest import ROOT

SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    for key, value in raw.items():
        got = getattr(cfg, key)
        assert got == (float(value) if isinstance(got, float) else value), key


def test_shipped_configs_include_demo_and_recipe() -> None:
    assert {p.name for p in SHIPPED} >= {"tiny.yaml", "mistral7b_qlora.yaml"}


def test_defaults_are_the_published_recipe() -> None:
    recipe = load_config(ROOT / "configs" / "mistral7b_qlora.yaml")
    assert recipe == TrainConfig()
    d = TrainConfig()
    assert (d.model_name_or_path, d.dataset, d.train_split, d.eval_split) == (
        "mistralai/Mistral-7B-v0.1",
        "HuggingFaceH4/ultrafeedback_binarized",
        "train_prefs",
        "test_prefs",
    )
    assert (d.mode, d.lora_r, d.lora_alpha, d.lora_dropout) == ("qlora", 16, 16, 0.05)
    assert set(d.lora_target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (d.orpo_lambda, d.learning_rate, d.lr_scheduler, d.warmup_ratio) == (0.1, 8e-6, "linear", 0.1)
    assert (d.max_length, d.optim, d.gradient_checkpointing, d.global_batch_size, d.max_steps) == (
        1024,
        "paged_adamw_8bit",
        True,
        64,
        2000,
    )


def test_unknown_key_names_nearest_valid_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'learning_rat'.*Did you mean 'learning_rate'"):
        load_config(None, ["learning_rat=1e-4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("orpo_lamda: 0.2\n")
    with pytest.raises(ConfigError, match=r"orpo_lamda.*bad\.yaml.*Did you mean 'orpo_lambda'"):
        load_config(bad)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("max_steps=ten", r"max_steps .* must be int, got 'ten'"),
        ("max_steps=2.5", r"max_steps .* must be int, got 2.5"),
        ("nll_on_prompt=1", r"nll_on_prompt .* must be bool"),
        ("lora_target_modules=q_proj", r"lora_target_modules .* must be list"),
        ("mode=int4", r"mode='int4' is not one of full, lora, qlora"),
        ("max_prompt_length=2048", r"max_prompt_length \(2048\) must be smaller than max_length \(1024\)"),
        ("learning_rate=fast", r"learning_rate .* must be float"),
        ("lr_scheduler=wsd", r"lr_scheduler='wsd' is not one of .*cosine_with_min_lr, warmup_stable_decay"),
        ("min_lr_ratio=1.0", r"min_lr_ratio must be in \[0, 1\), a share of learning_rate, got 1.0"),
        ("decay_ratio=0.95", r"decay_ratio must be in \(0, 1 - warmup_ratio\] = \(0, 0.9\].*got 0.95"),
        ("decay_ratio=0", r"decay_ratio must be in \(0, 1 - warmup_ratio\]"),
    ],
)
def test_wrong_types_and_values_are_refused(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_overrides_are_read_as_yaml() -> None:
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        ["learning_rate=1e-4", "eval_split=null", "max_steps=7", "lora_target_modules=[q_proj, v_proj]"],
    )
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.eval_split is None and cfg.max_steps == 7 and cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert parse_override("output_dir=a=b") == ("output_dir", "a=b")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_override("max_steps")


def test_missing_config_file_is_named() -> None:
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        load_config("nope.yaml")


def test_accumulation_is_derived_from_the_global_batch() -> None:
    cfg = TrainConfig()  # 64 pairs, 2 per device
    assert dataclasses.astuple(plan_batches(cfg, 1))[:4] == (2, 32, 1, 64)
    assert dataclasses.astuple(plan_batches(cfg, 8))[:4] == (2, 4, 8, 64)
    assert plan_batches(cfg, 1).warmup_steps == 200


def test_global_batch_that_does_not_divide_says_which_would() -> None:
    with pytest.raises(
        ConfigError,
        match=r"global_batch_size=64 does not split over 3 processes .*"
        r"global_batch_size=60 or 66 would divide",
    ):
        plan_batches(TrainConfig(), 3)
    with pytest.raises(
        ConfigError,
        match=r"global_batch_size=10 is not a multiple of per_device_batch_size=4; "
        r"global_batch_size=8 or 12 would divide",
    ):
        TrainConfig(global_batch_size=10, per_device_batch_size=4)


def test_single_file_dataset_needs_an_eval_file_or_none(tmp_path: Path) -> None:
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(ConfigError, match="is a single file, the training data, so eval_split='test_prefs'"):
        load_config(None, [f"dataset={data}"])
    assert load_config(None, [f"dataset={data}", "eval_split=null"]).eval_split is None
    assert load_config(None, [f"dataset={data}", f"eval_split={data}"]).eval_split == str(data)


def test_report_to_needs_tensorboard_and_known_trackers() -> None:
    assert load_config(None, ["report_to=[tensorboard, wandb]"]).report_to == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="report_to must list tensorboard"):
        load_config(None, ["report_to=[wandb]"])
    with pytest.raises(ConfigError, match="report_to must list tensorboard"):
        load_config(None, ["report_to=[tensorboard, mlflow]"])


def test_wandb_not_installed_is_refused_before_anything_runs(tmp_path: Path) -> None:
    import importlib.util

    import train_orpo

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here; the check is for machines without it")
    with pytest.raises(ConfigError, match="wandb, which is not installed"):
        train_orpo.check_trackers(load_config(None, ["report_to=[tensorboard, wandb]", f"output_dir={tmp_path}"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("learning_rate=.inf", "learning_rate must be a finite number, got inf."),
        ("max_grad_norm=nan", "max_grad_norm must be a finite number, got nan."),
        ("orpo_lambda=.nan", "orpo_lambda must be a finite number, got nan."),
        ("warmup_ratio=-.inf", "warmup_ratio must be a finite number, got -inf."),
        ("output_dir=", "output_dir is empty; give it a value (e.g. output_dir=runs/mistral7b-orpo-qlora)."),
        ("output_dir=' '", "output_dir is empty;"),
        ("dataset=", "dataset is empty;"),
    ],
)
def test_non_finite_numbers_and_empty_paths_are_refused(override: str, message: str) -> None:
    """Before: NaN passed every comparison in validate(), inf passed `> 0`, and "" is the current directory."""
    with pytest.raises(ConfigError) as raised:
        load_config(None, [override])
    assert str(raised.value).startswith(message)


def test_random_init_with_qlora_is_a_config_error() -> None:
    """Before: a bare ValueError from load_model, after the data was tokenised."""
    with pytest.raises(ConfigError, match="random_init=true cannot be combined with mode=qlora: .* Use mode=lora"):
        load_config(None, ["random_init=true", "mode=qlora"])


def test_yaml_syntax_error_in_a_file_names_the_file_and_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "recipe.yaml"
    bad.write_text("mode: full\nlora_target_modules: [q_proj, v_proj\nseed: 3\n")
    with pytest.raises(ConfigError) as raised:
        load_config(bad)
    assert str(raised.value) == (
        f"{bad} is not valid YAML: while parsing a flow sequence at line 2, column 22: "
        "expected ',' or ']', but got ':' at line 3, column 5."
    )
    bad.write_text("mode: full\n  seed: 3\n")
    with pytest.raises(
        ConfigError, match=r"recipe\.yaml is not valid YAML: mapping values are not allowed here at line 2"
    ):
        load_config(bad)


def test_yaml_syntax_error_in_an_override_names_the_override() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(None, ["seed=3", "lora_target_modules=[q_proj, v_proj"])
    assert str(raised.value) == (
        "Override 'lora_target_modules=[q_proj, v_proj': its value is not valid YAML (while parsing a flow sequence "
        "at line 1, column 1: expected ',' or ']', but got '<stream end>' at line 1, column 16)."
    )


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "cosine_with_min_lr", "warmup_stable_decay"])
@pytest.mark.parametrize(("max_steps", "warmup_ratio"), [(100, 0.1), (37, 0.05), (10, 0.0)])
def test_after_warmup_each_schedule_is_transformers_own(kind: str, max_steps: int, warmup_ratio: float) -> None:
    """Issue 14 item 4: every lr_scheduler is, after warmup, transformers' schedule of the same name; the
    warmup keeps its (step + 1) / (warmup + 1) ramp, which the reliability tests rely on."""
    import math

    import torch
    from transformers import get_scheduler

    from orpo.optim import build_scheduler

    cfg = TrainConfig(
        lr_scheduler=kind, max_steps=max_steps, warmup_ratio=warmup_ratio, min_lr_ratio=0.1, decay_ratio=0.2
    )
    warmup = math.ceil(warmup_ratio * max_steps)
    specific = {
        "cosine_with_min_lr": {"min_lr_rate": cfg.min_lr_ratio},
        "warmup_stable_decay": {"num_decay_steps": math.ceil(cfg.decay_ratio * max_steps), "min_lr_ratio": 0.1},
    }.get(kind, {})
    theirs = get_scheduler(
        kind,
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
        num_warmup_steps=warmup,
        num_training_steps=max_steps,
        scheduler_specific_kwargs=specific,
    )
    ours = build_scheduler(cfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), warmup)
    for step in range(max_steps):  # the steps a run takes; beyond them transformers' cosine rises again
        if step >= warmup:
            assert ours.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], abs=1e-12), step
        else:
            assert ours.get_last_lr()[0] == pytest.approx((step + 1) / (warmup + 1))
        for scheduler in (ours, theirs):
            scheduler.optimizer.step()
            scheduler.step()
    if kind in ("cosine_with_min_lr", "warmup_stable_decay"):
        assert ours.get_last_lr()[0] == pytest.approx(0.1)  # decayed to min_lr_ratio, not to 0
    if kind == "warmup_stable_decay":  # at the peak until the last decay_ratio of the steps, then lower
        last_stable = max_steps - math.ceil(cfg.decay_ratio * max_steps) - 1
        assert last_stable >= warmup and ours.lr_lambdas[0](last_stable) == 1.0
        assert ours.lr_lambdas[0](last_stable + 2) < 1.0
