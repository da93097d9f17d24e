"""Preemption from the first second, and TensorBoard after any kill: real processes on the tiny config.

A stop signal (SIGTERM/SIGUSR1) while the data is tokenised, the model loads or the start evaluation
runs ends the run with exit 75 and `stop_reason: preempted`; nothing has been trained yet, so no
checkpoint is written and a requeued `resume_from=latest` starts over (or continues from the
checkpoint it had resumed). The signal comes from tests/fault_injection.py (ORPO_SIGTERM_IN), sent
by the process to itself as the phase starts, so the timing is exact.
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest

import train_orpo
from orpo.checkpoint import checkpoints_dir, verify
from tests.conftest import ROOT
from tests.test_reliability import (
    SORT,
    TWO_PROCESSES,
    WRAPPER,
    Attempt,
    Setup,
    attempt,
    data_order,
    env,
    launcher,
    logged,
    steps_of_checkpoints,
    summary,
)

STOPPED_EARLY = re.compile(
    r"stopped: a stop signal \(SIGTERM/SIGUSR1\) reached (this|another) rank before step (\d+) \(([^)]*)\): "
    r"nothing was trained"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("preemption")
    train_file = root / "train44.jsonl"
    train_file.write_text("".join((SORT / "train.jsonl").read_text().splitlines(keepends=True)[:44]))
    return Setup(train_file, root / "cache")


@pytest.fixture(scope="module")
def reference(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = attempt(setup, out, "eval_at_start=true")
    assert done.returncode == 0, done.tail()
    return out


def assert_preempted_before_training(out: Path, stopped: Attempt, step: int, where: str) -> None:
    assert stopped.returncode == train_orpo.EXIT_PREEMPTED == 75, stopped.tail()
    match = STOPPED_EARLY.search(stopped.stderr)
    assert match and match.groups() == ("this", str(step + 1), where), stopped.tail()
    got = summary(out)
    assert (got["finished"], got["step"], got["stop_reason"], got["exit_code"]) == (False, step, "preempted", 75)
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("phase", "where"),
    [
        ("data", "after loading the data"),
        ("model", "after loading the model"),
        ("start_eval", "after the evaluation at the start"),
    ],
)
def test_sigterm_before_the_first_step_exits_75_then_the_requeue_starts_over(
    setup: Setup, reference: Path, tmp_path: Path, phase: str, where: str
) -> None:
    """Before this change the signal killed the process (exit -15) with no run_summary.json."""
    out = tmp_path / "run"
    stopped = attempt(setup, out, "eval_at_start=true", faults={"ORPO_SIGTERM_IN": phase})
    assert f"fault: SIGTERM in {phase}" in stopped.stderr, stopped.tail()
    assert_preempted_before_training(out, stopped, 0, where)
    assert steps_of_checkpoints(out) == [], "nothing trained: no step-0 checkpoint"

    if phase != "start_eval":
        return
    # The start evaluation was logged (step 0) before the stop; the requeue logs it again, once.
    requeued = attempt(setup, out, "eval_at_start=true", "resume_from=latest")
    assert requeued.returncode == 0, requeued.tail()
    assert "resume_from=latest: no checkpoint yet, starting from step 0" in requeued.stdout
    for tag in ("train/loss", "train/grad_norm", "eval/loss"):
        assert logged(out, tag) == logged(reference, tag), tag  # also: each step shown once


def test_sigterm_while_loading_a_resumed_model_keeps_its_checkpoint_and_the_lock_is_taken_over(
    setup: Setup, reference: Path, tmp_path: Path
) -> None:
    """SIGKILL at step 4 (checkpoint 3, a stale lock left), then SIGTERM while the resumed attempt loads
    the model: exit 75 at step 3, step_3 untouched; the third attempt equals the uninterrupted run."""
    out = tmp_path / "run"
    killed = attempt(setup, out, "eval_at_start=true", faults={"ORPO_KILL_AT_STEP": "4"})
    assert killed.returncode == -signal.SIGKILL, killed.tail()
    holder = (out / "run.lock").read_text()
    assert holder, "a killed run leaves its lock's body behind"

    stopped = attempt(setup, out, "eval_at_start=true", "resume_from=latest", faults={"ORPO_SIGTERM_IN": "model"})
    assert "output dir   took over the lock of a run that is gone (host " in stopped.stdout, stopped.tail()
    assert_preempted_before_training(out, stopped, 3, "after loading the model")
    assert steps_of_checkpoints(out) == [3]
    verify(checkpoints_dir(out) / "step_3")

    resumed = attempt(setup, out, "eval_at_start=true", "resume_from=latest")
    assert resumed.returncode == 0, resumed.tail()
    assert resumed.resumed_from() == 3
    assert "took over the lock" not in resumed.stdout, "a stop before training releases the lock cleanly"
    for tag in ("train/loss", "train/grad_norm", "train/lr", "eval/loss"):
        assert logged(out, tag) == logged(reference, tag), tag
    assert [r["step"] for r in data_order(out)] == list(range(1, 13))


def test_a_run_killed_before_its_first_checkpoint_then_restarted_shows_each_step_once(
    setup: Setup, reference: Path, tmp_path: Path
) -> None:
    """Before this change purge_step was only set when resuming from a checkpoint: the restarted run
    showed steps 1-2 (and the start evaluation) twice in TensorBoard."""
    out = tmp_path / "run"
    killed = attempt(setup, out, "eval_at_start=true", faults={"ORPO_KILL_AT_STEP": "2"})
    assert killed.returncode == -signal.SIGKILL and steps_of_checkpoints(out) == [], killed.tail()
    restarted = attempt(setup, out, "eval_at_start=true", "resume_from=latest")
    assert restarted.returncode == 0, restarted.tail()
    for tag in ("train/loss", "train/grad_norm", "eval/loss"):
        assert logged(out, tag) == logged(reference, tag), tag


def test_sigterm_to_one_rank_while_loading_the_model_stops_both_ranks(setup: Setup, tmp_path: Path) -> None:
    """DDP, 2 processes: rank 1 alone gets the signal; the ranks agree (a max all-reduce) and stop."""
    out = tmp_path / "run"
    cmd = [*launcher("ddp"), WRAPPER, *setup.args(out, *TWO_PROCESSES)]
    faults = {"ORPO_SIGTERM_IN": "model", "ORPO_SIGTERM_RANK": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**faults), capture_output=True, text=True, timeout=300)
    stopped = Attempt(proc.returncode, proc.stdout, proc.stderr)
    assert stopped.returncode != 0, stopped.tail()
    found = sorted(m[0] for m in STOPPED_EARLY.findall(stopped.stderr))
    assert found == ["another", "this"], stopped.tail()
    assert stopped.stderr.count("(after loading the model)") == 2, stopped.tail()
    got = summary(out)
    assert (got["step"], got["stop_reason"], got["exit_code"]) == (0, "preempted", 75)
    assert steps_of_checkpoints(out) == []


def test_sigterm_during_the_final_save_finishes_the_run(setup: Setup, tmp_path: Path) -> None:
    """After the last step the final save completes and the run ends finished (exit 0): a requeue of a
    finished run could only be refused ("already holds a finished run")."""
    out = tmp_path / "run"
    done = attempt(setup, out, faults={"ORPO_SIGTERM_IN": "final_save"})
    assert "fault: SIGTERM in final_save" in done.stderr, done.tail()
    assert done.returncode == 0, done.tail()
    assert summary(out)["finished"] is True and "stop_reason" not in summary(out)
    assert (out / "model.safetensors").is_file()
    assert (out / "run.lock").read_text() == "", "a clean end empties the lock"
