"""Resume on the recipe's own path (LoRA / QLoRA): a checkpoint holds the adapter and what trains it,
not the frozen base; a resumed run logs what the uninterrupted one logged, after SIGKILL or SIGTERM,
on one process and with 2 real processes (DDP, ZeRO-2, ZeRO-3); a run resumes with another
per_device_batch_size or process count; a finished run is extended from its last step; an adapter is
never resumed onto another base.

The runs are those of tests/test_reliability.py (44 pairs, 8 pairs per step) on a saved random
2-layer base (QLoRA cannot start from random_init), 6 steps with a checkpoint every 2.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orpo.checkpoint import checkpoints_dir, read_trainer_state
from orpo.config import load_config
from orpo.optim import lr_lambda
from tests.conftest import TINY_CONFIG
from tests.test_reliability import (
    PER_STEP_TAGS,
    TRAINER,
    TWO_PROCESSES,
    Setup,
    assert_stopped_with_a_checkpoint,
    attempt,
    data_order,
    interrupt,
    launcher,
    logged,
    logged_per_attempt,
    setup,  # noqa: F401  (the module-scoped fixture)
    steps_of_checkpoints,
    summary,
)

STEPS = 6
ADAPTER = (f"max_steps={STEPS}", "save_steps=2", "random_init=false", "optim=adamw_torch")


def adapter(base: Path, mode: str, *more: str) -> tuple[str, ...]:
    return (f"model_name_or_path={base}", f"mode={mode}", *ADAPTER, *more)


def assert_same_adapter_run(out: Path, ref: Path, first_step: int = 1, rel: float | None = None) -> None:
    """Per-step loss, grad norm and lr from `first_step` on, the rows of every step and the final
    adapter are those of the uninterrupted run `ref` (`==`, or within `rel`)."""

    def same(got: object, want: object) -> bool:
        return got == want if rel is None else got == pytest.approx(want, rel=rel)

    for tag in PER_STEP_TAGS:
        got, want = logged(out, tag), logged(ref, tag)
        assert list(want) == list(range(1, STEPS + 1)) and list(got) == list(range(first_step, STEPS + 1)), tag
        assert same(got, {s: want[s] for s in got}), f"{tag}: {got} != {want}"
    assert data_order(out) == data_order(ref)
    assert summary(out)["finished"] is True and summary(out)["step"] == STEPS
    got_w, want_w = load_file(out / "adapter_model.safetensors"), load_file(ref / "adapter_model.safetensors")
    assert got_w.keys() == want_w.keys()
    for name, want in want_w.items():
        if rel is None:
            assert torch.equal(got_w[name], want), name
        else:
            torch.testing.assert_close(got_w[name], want, rtol=10 * rel, atol=rel, msg=name)


def assert_adapter_only(checkpoint: Path, trainable_params: int) -> int:
    """The checkpoint's model files hold only LoRA tensors, `trainable_params` values in all (float32);
    returns the model part's size in bytes."""
    if (checkpoint / "model.safetensors").exists():
        files = [checkpoint / "model.safetensors"]
        tensors = load_file(files[0])
    else:  # DeepSpeed: the engine's module state (one file, or one per rank under ZeRO-3)
        files = sorted(checkpoint.rglob("*model_states.pt"))
        tensors = {}
        for path in files:
            state = torch.load(path, map_location="cpu", weights_only=False)
            assert not state.get("frozen_param_fragments"), f"{path} holds frozen base fragments"
            tensors.update(state["module"])
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors), sorted(tensors)[:5]
    if (checkpoint / "model.safetensors").exists():  # ZeRO-3 keeps partitioned placeholders there
        assert sum(t.numel() for t in tensors.values()) == trainable_params
    size = sum(p.stat().st_size for p in files)
    assert size < trainable_params * 4 + 64 * 1024, f"{size} bytes for {trainable_params} float32 values"
    return size


@pytest.fixture(scope="module")
def references(setup: Setup, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    """The uninterrupted single-process lora and qlora runs."""
    refs = {}
    for mode in ("lora", "qlora"):
        out = tmp_path_factory.mktemp(f"uninterrupted_{mode}") / "run"
        done = attempt(setup, out, *adapter(tiny_base, mode))
        assert done.returncode == 0, done.tail()
        refs[mode] = out
    return refs


# ---- 1. what a checkpoint holds ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_checkpoint_holds_the_adapter_not_the_base(references: dict[str, Path], mode: str) -> None:
    """Every checkpoint, the last step's included, holds the LoRA tensors only, and the log names its
    real size; the base (and QLoRA's 4-bit quantisation state, which could not be loaded back) is
    not in it."""
    out = references[mode]
    assert steps_of_checkpoints(out) == [4, 6], "the last step is checkpointed"
    trainable = summary(out)["plan"]["trainable_params"]
    # r=16 on q, k, v, o (128->128, 128->64 twice, 128->128) and gate, up, down (128<->384), 2 layers
    assert trainable == 2 * (2 * 16 * (128 + 128) + 2 * 16 * (128 + 64) + 3 * 16 * (128 + 384)) == 77_824
    for step in (4, 6):
        size = assert_adapter_only(checkpoints_dir(out) / f"step_{step}", trainable)
        assert size == (checkpoints_dir(out) / f"step_{step}" / "model.safetensors").stat().st_size
    state = read_trainer_state(checkpoints_dir(out) / "step_6")
    assert state["base"]["weights_sha256"] and state["base"]["config_sha256"]
    assert state["schedule"] == {"max_steps": STEPS, "warmup_steps": 1}


# ---- 2. resume equals uninterrupted, one process -------------------------------------------------


@pytest.mark.parametrize("mode", ["lora", "qlora"])
@pytest.mark.parametrize("kill", ["sigkill", "sigterm"])
def test_adapter_resume_equals_uninterrupted(
    setup: Setup,  # noqa: F811
    references: dict[str, Path],
    tiny_base: Path,
    tmp_path: Path,
    mode: str,
    kill: str,
) -> None:
    """lora_dropout is on (0.05): the restored RNG gives the same dropout masks."""
    out, overrides = tmp_path / "run", adapter(tiny_base, mode)
    if kill == "sigkill":
        stopped = attempt(setup, out, *overrides, faults={"ORPO_KILL_AT_STEP": "3"})
        assert stopped.returncode == -signal.SIGKILL, stopped.tail()
        at = 2
    else:
        cmd = [sys.executable, TRAINER, *setup.args(out, *overrides)]
        stopped = interrupt(cmd, out, tmp_path / "logs", random.Random(mode).randint(1, 3))
        assert stopped.returncode == 75, stopped.tail()
        at = assert_stopped_with_a_checkpoint(out, stopped, 1)
    resumed = attempt(setup, out, *overrides, "resume_from=latest")
    assert resumed.returncode == 0, resumed.tail()
    assert resumed.resumed_from() == at
    assert_same_adapter_run(out, references[mode])


# ---- 3. two processes: DDP, ZeRO-2, ZeRO-3 -------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "mode", "kill"),
    [("ddp", "qlora", "sigterm"), ("zero2", "qlora", "sigkill"), ("zero3", "lora", "sigkill")],
)
def test_two_processes_adapter_resume_equals_uninterrupted(
    setup: Setup,  # noqa: F811
    tiny_base: Path,
    tmp_path: Path,
    engine: str,
    mode: str,
    kill: str,
) -> None:
    """QLoRA under ZeRO-3 is not covered (its 4-bit storage in the compute dtype is a GPU path)."""
    overrides = (*TWO_PROCESSES, *adapter(tiny_base, mode))
    ref, out = tmp_path / "uninterrupted", tmp_path / "run"
    done = attempt(setup, ref, *overrides, launcher=launcher(engine))
    assert done.returncode == 0 and "x 2 processes" in done.stdout, done.tail()
    if kill == "sigkill":
        faults = {"ORPO_KILL_AT_STEP": "3", "ORPO_KILL_RANK": "1"}
        stopped = attempt(setup, out, *overrides, faults=faults, launcher=launcher(engine))
        assert stopped.returncode != 0, stopped.tail()
        at = 2
    else:
        cmd = [*launcher(engine), TRAINER, *setup.args(out, *overrides)]
        stopped = interrupt(cmd, out, tmp_path / "logs", 2, rank=1)
        at = int(json.loads((out / "run_summary.json").read_text())["step"])
        assert summary(out)["stop_reason"] == "preempted" and at >= 2, stopped.tail()
    assert_adapter_only(checkpoints_dir(out) / f"step_{at}", summary(ref)["plan"]["trainable_params"])
    resumed = attempt(setup, out, *overrides, "resume_from=latest", launcher=launcher(engine))
    assert resumed.returncode == 0, resumed.tail()
    assert resumed.resumed_from() == at
    assert_same_adapter_run(out, ref)


# ---- 4. another batch split, another process count -----------------------------------------------


def test_resume_with_half_the_per_device_batch(
    setup: Setup,  # noqa: F811
    references: dict[str, Path],
    tiny_base: Path,
    tmp_path: Path,
) -> None:
    """Killed after step 3 with 4 pairs per micro-batch (x 2 accumulation), resumed with 2 (x 4): the
    global batch fixes the gradient, so the steps match within 1e-5. Before the fix the resumed run
    died on accelerate's restored micro-step counter. lora_dropout=0: masks depend on the split."""
    out, overrides = tmp_path / "run", adapter(tiny_base, "qlora", "lora_dropout=0")
    ref = tmp_path / "ref"
    assert attempt(setup, ref, *overrides).returncode == 0
    killed = attempt(setup, out, *overrides, faults={"ORPO_KILL_AT_STEP": "3"})
    assert killed.returncode == -signal.SIGKILL, killed.tail()
    resumed = attempt(setup, out, *overrides, "per_device_batch_size=2", "resume_from=latest")
    assert resumed.returncode == 0, resumed.tail()
    assert resumed.resumed_from() == 2 and "2 pairs/micro-batch x 4 accumulation" in resumed.stdout
    assert_same_adapter_run(out, ref, rel=1e-5)


def test_ddp_two_processes_resumed_on_one_then_on_two(setup: Setup, tmp_path: Path) -> None:  # noqa: F811
    """Full fine-tuning under DDP, killed after step 1 (checkpoint of 2 processes, 2 x 2 accumulation),
    resumed on one process (2 x 4) to step 3, then on 2 processes again to step 6: the steps match
    the uninterrupted 2-process run within 1e-5. Before the fix the one-process attempt died on
    accelerate's restored micro-step counter. Rank 1 of the last attempt finds its own RNG file
    (see restore_missing_rng for a rank that finds none)."""
    overrides = (*TWO_PROCESSES, "max_steps=6", "save_steps=1")
    ref, out = tmp_path / "uninterrupted", tmp_path / "run"
    assert attempt(setup, ref, *overrides, launcher=launcher("ddp")).returncode == 0
    killed = attempt(setup, out, *overrides, faults={"ORPO_KILL_AT_STEP": "1"}, launcher=launcher("ddp"))
    assert killed.returncode != 0 and steps_of_checkpoints(out) == [1], killed.tail()
    one = attempt(setup, out, *overrides, "resume_from=latest", faults={"ORPO_KILL_AT_STEP": "2"})
    assert one.returncode == -signal.SIGKILL and one.resumed_from() == 1, one.tail()
    assert steps_of_checkpoints(out) == [2, 3] and "x 1 processes" in one.stdout
    two = attempt(setup, out, *overrides, "resume_from=latest", launcher=launcher("ddp"))
    assert two.returncode == 0 and two.resumed_from() == 3, two.tail()
    for tag in PER_STEP_TAGS:
        got, want = logged(out, tag), logged(ref, tag)
        assert list(got) == list(range(1, 7)), tag
        assert list(got.values()) == pytest.approx(list(want.values()), rel=1e-5), tag
    # The same pairs in every step; grouping by length orders them for the process count that runs them.
    assert [sorted(s["rows"]) for s in data_order(out)] == [sorted(s["rows"]) for s in data_order(ref)]
    got_w, want_w = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    for name, want in want_w.items():
        torch.testing.assert_close(got_w[name], want, rtol=1e-4, atol=1e-6, msg=name)


def test_deepspeed_checkpoint_on_another_process_count_is_refused_before_loading(
    setup: Setup,  # noqa: F811
    tiny_base: Path,
    tmp_path: Path,
) -> None:
    overrides = (*TWO_PROCESSES, *adapter(tiny_base, "lora", "max_steps=2"))
    out = tmp_path / "run"
    assert attempt(setup, out, *overrides, launcher=launcher("zero2")).returncode == 0
    refused = attempt(setup, out, *overrides, "max_steps=4", "resume_from=latest", script=TRAINER)
    assert refused.returncode == 1, refused.tail()
    assert (
        f"error: Cannot resume {checkpoints_dir(out) / 'step_2'}: it was written by DeepSpeed ZeRO-2 with 2 processes, "
        "this launch runs no DeepSpeed (DDP or one process) with 1 processes." in refused.stderr
    ), refused.tail()
    assert "--num_processes 2" in refused.stderr and "Loading weights" not in refused.stderr
    assert logged_per_attempt(out, "train/loss") == [[1, 2]], "nothing trained"


# ---- 5. extending a finished run ------------------------------------------------------------------


def test_finished_run_extended_from_its_last_step(
    setup: Setup,  # noqa: F811
    references: dict[str, Path],
    tiny_base: Path,
    tmp_path: Path,
) -> None:
    """A finished 6-step QLoRA run, resumed with max_steps=9, trains steps 7..9 from step 6's
    checkpoint (steps 1..6 are not retrained); its schedule keeps the 1 warmup step and ends its
    cosine at step 9. A plain relaunch, and a resume that would not extend it, are refused."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(references["qlora"], out)
    overrides = adapter(tiny_base, "qlora")
    plain = attempt(setup, out, *overrides, "overwrite=false", "max_steps=9", script=TRAINER)
    assert plain.returncode == 1 and "already holds a finished run" in plain.stderr, plain.tail()
    same = attempt(setup, out, *overrides, "overwrite=false", "resume_from=latest", script=TRAINER)
    assert same.returncode == 1 and "already holds a finished run" in same.stderr, same.tail()

    longer = attempt(setup, out, *overrides, "overwrite=false", "resume_from=latest", "max_steps=9")
    assert longer.returncode == 0 and longer.resumed_from() == STEPS, longer.tail()
    cfg = load_config(TINY_CONFIG, [])
    old = cfg.learning_rate * lr_lambda(5, 1, 6, "cosine")
    new = cfg.learning_rate * lr_lambda(6, 1, 9, "cosine")
    assert (
        f"schedule     resumed at step 6: max_steps 6 -> 9; cosine recomputed to end at step 9, warmup kept at 1 "
        f"steps; lr {old:.3g} at step 6 -> {new:.3g} at step 7" in longer.stdout
    ), longer.tail()
    assert logged_per_attempt(out, "train/loss") == [list(range(1, 7)), [7, 8, 9]], "steps 1..6 not retrained"
    lrs = logged(out, "train/lr")
    ref_lrs = logged(references["qlora"], "train/lr")
    assert [lrs[s] for s in range(1, 7)] == [ref_lrs[s] for s in range(1, 7)]
    expected = [cfg.learning_rate * lr_lambda(s - 1, 1, 9, "cosine") for s in (7, 8, 9)]
    assert [lrs[s] for s in (7, 8, 9)] == pytest.approx(expected, rel=1e-6)
    assert data_order(out)[:6] == data_order(references["qlora"]) and len(data_order(out)) == 9
    assert summary(out)["finished"] is True and summary(out)["step"] == 9
    assert steps_of_checkpoints(out)[-1] == 9
    assert all(math.isfinite(v) for v in logged(out, "train/loss").values())


# ---- 6. another base ------------------------------------------------------------------------------


def test_adapter_is_never_resumed_onto_another_base(
    setup: Setup,  # noqa: F811
    references: dict[str, Path],
    tmp_path: Path,
) -> None:
    """Same path, same config, other weights: refused once the base is loaded, before any step,
    naming both fingerprints."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ref = references["lora"]
    other = tmp_path / "other_base"
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(summary(ref)["config"]["model_name_or_path"]))
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(summary(ref)["config"]["model_name_or_path"]).save_pretrained(other)
    out = tmp_path / "run"
    shutil_copy_unfinished(ref, out)
    saved = read_trainer_state(checkpoints_dir(out) / "step_6")["base"]
    # Point the checkpoint's fingerprint at the same path name as the new base: only the weights differ.
    state_path = checkpoints_dir(out) / "step_6" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["base"]["model_name_or_path"] = str(other)
    state["resume_key"]["model_name_or_path"] = str(other)
    state_path.write_text(json.dumps(state))
    from orpo.checkpoint import write_manifest

    write_manifest(checkpoints_dir(out) / "step_6")
    refused = attempt(
        setup, out, *adapter(other, "lora"), "max_steps=8", "resume_from=latest", "overwrite=false", script=TRAINER
    )
    assert refused.returncode == 1, refused.tail()
    message = refused.stderr
    assert "it was trained on another base model (weights_sha256 differ)" in message, refused.tail()
    assert saved["weights_sha256"] in message and saved["config_sha256"] in message
    assert logged_per_attempt(out, "train/loss") == [list(range(1, 7))], "nothing trained"


def shutil_copy_unfinished(ref: Path, out: Path) -> None:
    """The reference's checkpoints, as an unfinished run (no run_summary.json)."""
    import shutil

    shutil.copytree(ref, out)
    (out / "run_summary.json").unlink()


def test_recipe_checkpoint_size_is_adapter_sized() -> None:
    """The recipe's adapter (r=16 on q, k, v, o, gate, up, down of Mistral-7B, built on the meta
    device from transformers' MistralConfig defaults, which are Mistral-7B-v0.1's): 32 layers x 16 x
    (2 x (4096 + 4096) + 2 x (4096 + 1024) + 3 x (4096 + 14336)) parameters, 168 MB in float32, and
    paged 8-bit AdamW's two 1-byte moments each: ~0.25 GB per checkpoint, not the 5 GB of the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, MistralConfig

    from orpo.checkpoint import expected_checkpoint_bytes

    config = MistralConfig()
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 14336, 32)
    assert (config.num_attention_heads, config.num_key_value_heads) == (32, 8)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    cfg = load_config(None, [])  # the recipe's defaults
    lora = LoraConfig(r=cfg.lora_r, target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    count, model_bytes, optimizer_bytes = expected_checkpoint_bytes(model, cfg.optim, full=False, deepspeed=False)
    assert count == 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336)) == 41_943_040
    assert model_bytes == 4 * count == 167_772_160 and optimizer_bytes == 2 * count == 83_886_080
