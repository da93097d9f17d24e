"""Reliability of a run on the tiny config: whatever stops it (SIGKILL, SIGTERM, a kill while a
checkpoint is sealed or pruned, a corrupted checkpoint, non-finite steps) loses nothing, and a
resumed run logs exactly what the uninterrupted one logged; bad input fails before any model is
loaded, or is counted and skipped.

Faults come from tests/fault_injection.py (see its docstring). Runs go through a real process
boundary: `python tests/fault_injection.py` or `python train_orpo.py`, and `accelerate launch` for
two processes on the CPU. The training file is the first 44 pairs of the demo's data, 5 steps of 8
pairs per epoch, so that 12 steps reshuffle twice and a resume lands in another epoch than the kill.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from safetensors.torch import load_file

import train_orpo
from orpo.checkpoint import CheckpointError, checkpoints_dir, complete_checkpoints, read_trainer_state, verify
from orpo.config import ConfigError, load_config
from orpo.data import DataError, load_split
from orpo.model import load_tokenizer
from orpo.optim import lr_lambda
from tests.conftest import ROOT, TINY_CONFIG, reset_accelerate
from tests.test_multiprocess import free_port, launch_args

SORT = ROOT / "data" / "sort_prefs"
WRAPPER = "tests/fault_injection.py"
TRAINER = "train_orpo.py"
STEPS, SAVE = 12, 3  # checkpoints at steps 3, 6, 9 and the last, 12 (keep_last=2)
COMMON = (
    f"eval_split={SORT / 'test.jsonl'}",
    f"max_steps={STEPS}",
    f"save_steps={SAVE}",
    "logging_steps=1",
    "eval_steps=0",
    "eval_at_start=false",
    "eval_max_samples=40",
    "num_sample_prompts=0",
    "record_data_order=true",
    "global_batch_size=8",
    "per_device_batch_size=4",
)
TWO_PROCESSES = ("global_batch_size=8", "per_device_batch_size=2")  # 2 x 2 accumulation x 2 processes
PER_STEP_TAGS = ("train/loss", "train/grad_norm", "train/lr")
RESUMED = re.compile(r"resumed\s+from (\S+) at step (\d+)")


class Attempt(NamedTuple):
    returncode: int
    stdout: str
    stderr: str

    def tail(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-5000:]}"

    def resumed_from(self) -> int:
        found = RESUMED.findall(self.stdout)
        assert len(found) == 1, self.tail()
        return int(found[0][1])


@dataclasses.dataclass(frozen=True)
class Setup:
    train_file: Path
    cache: Path

    def args(self, out: Path, *overrides: str) -> list[str]:
        """The trainer's command-line arguments for a run into `out`."""
        return [
            "--config",
            str(TINY_CONFIG),
            f"output_dir={out}",
            f"data_cache_dir={self.cache}",
            f"dataset={self.train_file}",
            *COMMON,
            *overrides,
        ]


def env(**faults: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ORPO_") and k != "WORLD_SIZE"}
    return {**clean, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ORPO_SKIP_PLOTS": "1", **faults}


def attempt(
    setup: Setup,
    out: Path,
    *overrides: str,
    faults: dict[str, str] | None = None,
    script: str = WRAPPER,
    launcher: list[str] | None = None,
) -> Attempt:
    """One attempt at the run in `out`, as its own process (or processes, under `launcher`)."""
    cmd = [*(launcher or [sys.executable]), script, *setup.args(out, *overrides)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**(faults or {})), capture_output=True, text=True, timeout=300)
    return Attempt(proc.returncode, proc.stdout, proc.stderr)


def launcher(config: str) -> list[str]:
    return launch_args(config, 2, free_port())


# ---- what a run left behind --------------------------------------------------------------------


def logged(out: Path, tag: str) -> dict[int, float]:
    """What TensorBoard shows for `tag`: the run's event files read in order as one run, so that a
    resumed attempt's purge_step hides what a killed attempt logged after its last checkpoint. Each
    step must show exactly once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars(tag) if tag in acc.Tags()["scalars"] else []
    steps = [e.step for e in events]
    assert steps == sorted(set(steps)), f"{tag}: steps shown {steps}"
    return {e.step: e.value for e in events}


def logged_per_attempt(out: Path, tag: str) -> list[list[int]]:
    """The steps each attempt's event file holds, before TensorBoard purges anything."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for path in sorted((out / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0}, purge_orphaned_data=False)
        acc.Reload()
        steps.append([e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else [])
    return steps


def data_order(out: Path) -> list[dict[str, Any]]:
    path = out / "data_order.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "run_summary.json").read_text())


def steps_of_checkpoints(out: Path) -> list[int]:
    return [step for step, _ in complete_checkpoints(out)]


def staging_dirs(out: Path) -> list[str]:
    root = checkpoints_dir(out)
    return sorted(p.name for p in root.glob(".tmp-step_*")) if root.is_dir() else []


def digest_tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }


def assert_same_run(out: Path, ref: Path, first_step: int = 1, steps: int = STEPS, rel: float | None = None) -> None:
    """The run in `out` logged, from `first_step` on, what the uninterrupted `ref` logged (exactly, or
    within `rel`), consumed the same rows at every step, finished, and ended with the same weights."""

    def same(got: Any, want: Any) -> bool:
        return got == want if rel is None else got == pytest.approx(want, rel=rel)

    for tag in PER_STEP_TAGS:
        got, want = logged(out, tag), logged(ref, tag)
        assert list(want) == list(range(1, steps + 1)), f"{tag} of the reference: {list(want)}"
        assert list(got) == list(range(first_step, steps + 1)), f"{tag}: steps {list(got)}"
        assert same(got, {s: want[s] for s in got}), f"{tag}: {got} != {want}"
    assert data_order(out) == data_order(ref), "the rows consumed at each step"
    done, ref_done = summary(out), summary(ref)
    assert done["finished"] is True and done["step"] == steps
    assert same(done["final_metrics"]["eval/loss"], ref_done["final_metrics"]["eval/loss"])
    got_weights, want_weights = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert got_weights.keys() == want_weights.keys()
    for name, want in want_weights.items():
        if rel is None:
            assert torch.equal(got_weights[name], want), name
        else:
            torch.testing.assert_close(got_weights[name], want, rtol=10 * rel, atol=rel, msg=name)


# ---- the shared runs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("reliability")
    train_file = root / "train44.jsonl"
    train_file.write_text("".join((SORT / "train.jsonl").read_text().splitlines(keepends=True)[:44]))
    return Setup(train_file, root / "cache")


@pytest.fixture(scope="module")
def reference(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted single-process run every resumed one is compared with."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = attempt(setup, out)
    assert done.returncode == 0, done.tail()
    assert steps_of_checkpoints(out) == [9, 12]  # the last step is checkpointed; keep_last=2 pruned 3 and 6
    rows = [r["rows"] for r in data_order(out)]
    first, second = sum(rows[:5], []), sum(rows[5:10], [])  # epochs: steps 1-5, 6-10 (4 pairs dropped each)
    assert len(set(first)) == len(set(second)) == 40 and first != second, "each epoch is a new permutation"
    return out


# ---- 1. SIGKILL, then resume ---------------------------------------------------------------------


def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(
    setup: Setup, reference: Path, tmp_path: Path
) -> None:
    # Between checkpoints (after the first), so that the killed attempt logged steps the resume redoes.
    k = random.Random(1).choice([k for k in range(SAVE + 1, STEPS) if k % SAVE])
    last_checkpoint = k // SAVE * SAVE
    out = tmp_path / "run"
    killed = attempt(setup, out, faults={"ORPO_KILL_AT_STEP": str(k)})
    assert killed.returncode == -signal.SIGKILL, killed.tail()
    assert len(data_order(out)) == k and steps_of_checkpoints(out)[-1] == last_checkpoint, f"k={k}"
    assert summary(out)["finished"] is False and summary(out)["step"] == last_checkpoint

    resumed = attempt(setup, out, "resume_from=latest")
    assert resumed.returncode == 0, resumed.tail()
    assert resumed.resumed_from() == last_checkpoint, f"k={k}"
    # The killed attempt logged past its checkpoint; TensorBoard shows the resumed attempt's steps there.
    assert logged_per_attempt(out, "train/loss") == [
        list(range(1, k + 1)),
        list(range(last_checkpoint + 1, STEPS + 1)),
    ], f"k={k}"
    assert_same_run(out, reference)


# ---- 2. SIGTERM, then resume ---------------------------------------------------------------------


def wait_for(condition: Any, proc: subprocess.Popen, what: str, timeout: float = 120.0, every: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(every)


def rank_pid(proc: subprocess.Popen, rank: int) -> int:
    """The process of `rank` among those `accelerate launch` started."""
    import psutil  # accelerate's dependency

    for child in psutil.Process(proc.pid).children(recursive=True):
        if child.environ().get("RANK") == str(rank) and "LOCAL_RANK" in child.environ():
            return child.pid
    raise AssertionError(f"no process of rank {rank} under {proc.pid}")


def interrupt(
    cmd: list[str],
    out: Path,
    logs: Path,
    after_steps: int,
    rank: int | None = None,
    faults: dict[str, str] | None = None,
) -> Attempt:
    """Start `cmd`; once it has recorded `after_steps` steps, SIGTERM it (or only its process of `rank`)."""
    order = out / "data_order.jsonl"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "w") as stdout, open(logs / "stderr", "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(**(faults or {})), stdout=stdout, stderr=stderr)
    try:
        wait_for(lambda: order.exists() and order.read_text().count("\n") >= after_steps, proc, "training")
        target = proc.pid if rank is None else rank_pid(proc, rank)
        os.kill(target, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Attempt(proc.returncode, (logs / "stdout").read_text(), (logs / "stderr").read_text())


def assert_stopped_with_a_checkpoint(out: Path, stopped: Attempt, after_steps: int) -> int:
    """The run stopped after a step past `after_steps`, sealed a checkpoint of it, and said so; returns the step."""
    match = re.search(
        r"stopped: a stop signal \(SIGTERM/SIGUSR1\) reached this rank: stopped after step (\d+) and saved (\S+);",
        stopped.stderr,
    )
    assert match, stopped.tail()
    step = int(match.group(1))
    assert after_steps <= step < STEPS, stopped.tail()
    checkpoint = checkpoints_dir(out) / f"step_{step}"
    assert Path(match.group(2)) == checkpoint
    verify(checkpoint)
    assert read_trainer_state(checkpoint)["progress"]["step"] == step
    assert steps_of_checkpoints(out)[-1] == step and not staging_dirs(out)
    assert summary(out)["finished"] is False and summary(out)["step"] == step
    assert summary(out)["stop_reason"] == "preempted" and summary(out)["exit_code"] == 75
    assert len(data_order(out)) == step
    assert not (out / "model.safetensors").exists(), "a stopped run saves a checkpoint, not a final model"
    return step


@pytest.mark.parametrize("signals", [1, 2], ids=["one_sigterm", "two_sigterms"])
def test_sigterm_at_a_random_moment_checkpoints_exits_75_and_resumes_exactly(
    setup: Setup, reference: Path, tmp_path: Path, signals: int
) -> None:
    """The real entry point (train_orpo.py) stops after the step it is in, seals a checkpoint of that
    step and exits with EXIT_PREEMPTED. A second SIGTERM, which the process sends itself while it
    writes that checkpoint (every file written, the manifest not yet), changes nothing."""
    after_steps = random.Random(signals).randint(1, 6)
    out = tmp_path / "run"
    script, faults = (TRAINER, None) if signals == 1 else (WRAPPER, {"ORPO_SIGTERM_WHILE_SAVING": "1"})
    cmd = [sys.executable, script, *setup.args(out)]
    stopped = interrupt(cmd, out, tmp_path / "logs", after_steps, faults=faults)
    assert stopped.returncode == train_orpo.EXIT_PREEMPTED == 75, stopped.tail()
    step = assert_stopped_with_a_checkpoint(out, stopped, after_steps)
    if signals == 2:
        assert f"fault: SIGTERM while sealing .tmp-step_{step}" in stopped.stderr, stopped.tail()
    if script == TRAINER:  # the wrapper skips the plots
        assert (out / "learning_curves.png").read_bytes().startswith(b"\x89PNG")

    resumed = attempt(setup, out, "resume_from=latest")
    assert resumed.returncode == 0, resumed.tail()
    assert resumed.resumed_from() == step
    assert_same_run(out, reference)


@pytest.fixture(scope="module")
def sigterm_to_rank_1(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Attempt, int]:
    """A 2-process DDP run whose rank 1 alone gets SIGTERM (rank 0 never does)."""
    root = tmp_path_factory.mktemp("sigterm_ddp")
    out, after_steps = root / "run", random.Random(4).randint(1, 6)
    cmd = [*launcher("ddp"), TRAINER, *setup.args(out, *TWO_PROCESSES)]
    return out, interrupt(cmd, out, root / "logs", after_steps, rank=1), after_steps


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(
    sigterm_to_rank_1: tuple[Path, Attempt, int],
) -> None:
    out, stopped, after_steps = sigterm_to_rank_1
    assert stopped.returncode != 0, stopped.tail()
    codes = dict(re.findall(r"rank\s*:\s*(\d) \(local_rank: \d\)\n\s*exitcode\s*:\s*(-?\d+)", stopped.stderr))
    assert codes.get("1") == "75" and codes.get("0", "75") in ("75", "-15"), stopped.tail()
    step = assert_stopped_with_a_checkpoint(out, stopped, after_steps)
    assert len(re.findall(rf"stopped after step {step} and saved", stopped.stderr)) == 2, "both ranks, same step"
    states = sorted(p.name for p in (checkpoints_dir(out) / f"step_{step}").glob("random_states_*.pkl"))
    assert states == ["random_states_0.pkl", "random_states_1.pkl"]


def test_every_rank_says_why_it_stopped(sigterm_to_rank_1: tuple[Path, Attempt, int]) -> None:
    _, stopped, _ = sigterm_to_rank_1
    assert "reached this rank" in stopped.stderr and "reached another rank" in stopped.stderr, stopped.tail()
    assert "None" not in stopped.stderr.split("stopped:", 1)[1].splitlines()[0], stopped.tail()


# ---- 3. two processes, ZeRO-2: SIGKILL of one rank, then resume ----------------------------------


def test_zero2_two_processes_killed_then_resumed_match_uninterrupted(setup: Setup, tmp_path: Path) -> None:
    k = random.Random(3).choice([4, 5])
    overrides = (*TWO_PROCESSES, "max_steps=6")
    ref, out = tmp_path / "uninterrupted", tmp_path / "run"
    done = attempt(setup, ref, *overrides, launcher=launcher("zero2"))
    assert done.returncode == 0 and "x 2 processes" in done.stdout, done.tail()

    killed = attempt(
        setup, out, *overrides, faults={"ORPO_KILL_AT_STEP": str(k), "ORPO_KILL_RANK": "1"}, launcher=launcher("zero2")
    )
    assert killed.returncode != 0, killed.tail()
    assert re.search(r"rank\s*: 1 .*\n\s*exitcode\s*: -9 ", killed.stderr), killed.tail()
    assert steps_of_checkpoints(out) == [3], f"k={k}"
    verify(checkpoints_dir(out) / "step_3")
    shards = sorted(p.name for p in (checkpoints_dir(out) / "step_3").rglob("*optim_states.pt"))
    assert len(shards) == 2, shards

    resumed = attempt(setup, out, *overrides, "resume_from=latest", launcher=launcher("zero2"))
    assert resumed.returncode == 0, resumed.tail()
    assert resumed.resumed_from() == 3
    assert_same_run(out, ref, steps=6, rel=1e-6)


# ---- 4. a kill while a checkpoint is sealed or pruned ---------------------------------------------


@pytest.mark.parametrize(
    ("where", "save_number", "resumes_at"),
    [("manifest", 2, 3), ("rename", 2, 3), ("prune", 3, 9)],
    ids=["half_written", "before_rename", "while_pruning"],
)
def test_kill_while_saving_resumes_from_the_newest_complete_checkpoint(
    setup: Setup, reference: Path, tmp_path: Path, where: str, save_number: int, resumes_at: int
) -> None:
    """manifest: step 6's staging dir has a file cut in half and no manifest; rename: it is complete
    but not renamed into place; prune: step 9 was sealed, step 3 is half deleted. Either way the
    resume takes the newest complete checkpoint and the run ends as if nothing had happened."""
    out = tmp_path / "run"
    killed = attempt(setup, out, faults={"ORPO_KILL_IN": where, "ORPO_KILL_SAVE_NUMBER": str(save_number)})
    assert killed.returncode == -signal.SIGKILL, killed.tail()
    staging = checkpoints_dir(out) / ".tmp-step_6"
    if where == "manifest":
        assert steps_of_checkpoints(out) == [3] and staging.is_dir() and not (staging / "manifest.json").exists()
    elif where == "rename":
        assert steps_of_checkpoints(out) == [3] and staging.is_dir()
        verify(staging)  # written whole: only the rename was missing
    else:
        assert steps_of_checkpoints(out) == [3, 6, 9] and not staging_dirs(out)
        with pytest.raises(CheckpointError, match="step_3"):
            verify(checkpoints_dir(out) / "step_3")
        verify(checkpoints_dir(out) / "step_9")

    resumed = attempt(setup, out, "resume_from=latest")
    assert resumed.returncode == 0, resumed.tail()
    assert resumed.resumed_from() == resumes_at
    assert f"checkpoints/step_{resumes_at} at step" in resumed.stdout
    assert_same_run(out, reference)
    assert not staging_dirs(out), "a later save clears a half-written checkpoint"


# ---- 5. a truncated file in a complete checkpoint ------------------------------------------------


def test_truncated_checkpoint_file_is_refused_by_name_and_latest_falls_back(
    setup: Setup, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(checkpoints_dir(reference), checkpoints_dir(out))
    shutil.copy(reference / "data_order.jsonl", out / "data_order.jsonl")
    newest = checkpoints_dir(out) / "step_12"
    weights = newest / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)

    named = attempt(setup, out, f"resume_from={newest}", script=TRAINER)
    assert named.returncode == 1, named.tail()
    assert f"error: {weights} is {size // 2} bytes, the manifest says {size}: truncated." in named.stderr
    assert weights.stat().st_size == size // 2, "the refused checkpoint is left as it was"
    assert not (out / "tensorboard").exists(), "nothing trained"

    latest = attempt(setup, out, "resume_from=latest")
    assert latest.returncode == 0, latest.tail()
    assert f"skipping checkpoint {newest}: {weights} is {size // 2} bytes" in latest.stderr, latest.tail()
    assert latest.resumed_from() == 9
    assert_same_run(out, reference, first_step=10)
    verify(newest)  # saved again at step 12, whole


# ---- 6. non-finite steps under DDP ----------------------------------------------------------------


def step_digests(directory: Path) -> dict[int, set[str]]:
    """Step -> the digests the ranks wrote of their own parameter storage after that step."""
    found: dict[int, set[str]] = {}
    for path in directory.glob("rank*-step*.sha256"):
        found.setdefault(int(path.stem.split("-step")[1]), set()).add(f"{path.name[:5]}:{path.read_text()}")
    return found


@pytest.mark.parametrize(
    ("backend", "fault"),
    [
        ("ddp", "ORPO_INF_STEPS"),
        ("zero2", "ORPO_INF_STEPS"),
        ("zero3", "ORPO_INF_STEPS"),
        ("zero2", "ORPO_NAN_LOSS_STEPS"),
    ],
    ids=["ddp-inf-grad", "zero2-inf-grad", "zero3-inf-grad", "zero2-nan-loss-only"],
)
def test_non_finite_step_on_one_rank_is_skipped_on_every_rank(
    setup: Setup, tmp_path: Path, backend: str, fault: str
) -> None:
    """A fault on rank 1 at step 3: an infinite gradient (before the all-reduce or reduce-scatter), or
    a NaN added to the backpropagated loss only (its gradients stay finite). Both ranks skip that
    update: no parameter of either rank changes at step 3, the learning rate does not advance, the
    run goes on, and both end with the same weights. Under DeepSpeed the engine steps inside
    backward, deciding on its own gradient norm: it must skip the same update."""
    out = tmp_path / "run"
    done = attempt(
        setup,
        out,
        *TWO_PROCESSES,
        "max_steps=5",
        "save_steps=0",
        faults={
            fault: "3",
            "ORPO_INF_RANK": "1",
            "ORPO_WEIGHTS_DIGEST": str(tmp_path / "digests"),
            "ORPO_STEP_DIGESTS": str(tmp_path / "steps"),
        },
        launcher=launcher(backend),
    )
    assert done.returncode == 0 and "x 2 processes" in done.stdout, done.tail()
    assert re.search(r"step 3: non-finite loss \S+ or grad norm (inf|nan): update skipped", done.stdout), done.tail()
    assert summary(out)["finished"] is True and summary(out)["skipped_steps"] == 1
    assert logged(out, "train/skipped_steps") == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    assert not math.isfinite(logged(out, "train/grad_norm")[3])
    assert all(math.isfinite(v) for v in logged(out, "train/loss").values())
    after = step_digests(tmp_path / "steps")
    assert sorted(after) == [1, 2, 3, 4] and all(len(after[s]) == 2 for s in after), after
    assert after[3] == after[2], "the skipped step changed a parameter"
    assert after[4] != after[3] and after[2] != after[1], "an applied step left the parameters alone"
    # The schedule steps only on applied updates: step 4 runs at step 3's learning rate.
    cfg = load_config(TINY_CONFIG, ["max_steps=5"])
    warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps)
    applied_before = [0, 1, 2, 2, 3]  # updates applied before steps 1..5
    expected = [cfg.learning_rate * lr_lambda(n, warmup, 5, cfg.lr_scheduler) for n in applied_before]
    assert list(logged(out, "train/lr").values()) == pytest.approx(expected, rel=1e-6)
    digests = {p.name: p.read_text() for p in (tmp_path / "digests").iterdir()}
    assert len(digests) == 2 and len(set(digests.values())) == 1, digests
    final = load_file(out / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())


@pytest.fixture(scope="module")
def nonfinite_stop(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Attempt]:
    """max_skipped_steps=2 and infinite gradients on rank 1 at steps 3 and 4: the run stops at 4."""
    out = tmp_path_factory.mktemp("nonfinite") / "run"
    stopped = attempt(
        setup,
        out,
        *TWO_PROCESSES,
        "max_steps=6",
        "save_steps=2",
        "max_skipped_steps=2",
        faults={"ORPO_INF_STEPS": "3,4", "ORPO_INF_RANK": "1"},
        launcher=launcher("ddp"),
    )
    return out, stopped


def test_max_skipped_steps_in_a_row_stop_with_76_and_the_last_good_state(
    nonfinite_stop: tuple[Path, Attempt],
) -> None:
    out, stopped = nonfinite_stop
    assert stopped.returncode != 0, stopped.tail()
    # Both ranks stop with EXIT_NONFINITE; the launcher tears down a rank still exiting when the
    # other is gone (SIGTERM), after every rank has passed the checkpoint's last barrier.
    codes = dict(re.findall(r"rank\s*:\s*(\d) \(local_rank: \d\)\n\s*exitcode\s*:\s*(-?\d+)", stopped.stderr))
    assert set(codes) == {"0", "1"} and "76" in codes.values() and set(codes.values()) <= {"76", "-15"}, codes
    assert train_orpo.EXIT_NONFINITE == 76
    assert (
        "stopped: 2 optimizer steps in a row had a non-finite loss or gradient (max_skipped_steps=2); "
        f"stopped at step 4. The last good state is in {checkpoints_dir(out) / 'step_4'}."
    ) in stopped.stderr
    assert steps_of_checkpoints(out) == [2, 4]
    verify(checkpoints_dir(out) / "step_4")
    assert read_trainer_state(checkpoints_dir(out) / "step_4")["progress"]["skipped_steps"] == 2
    # Steps 3 and 4 applied nothing: the checkpoint of step 4 holds step 2's weights, bit for bit.
    at_2, at_4 = (load_file(checkpoints_dir(out) / f"step_{s}" / "model.safetensors") for s in (2, 4))
    assert all(torch.equal(at_2[name], at_4[name]) for name in at_2)
    assert summary(out)["finished"] is False and summary(out)["step"] == 4 and summary(out)["skipped_steps"] == 2


def test_the_stop_reason_reaches_the_scheduler(nonfinite_stop: tuple[Path, Attempt]) -> None:
    """`accelerate launch` turns any failing child into exit status 1, so the code the trainer exits
    with (76 here) is also written where a job script can read it: run_summary.json."""
    out, stopped = nonfinite_stop
    assert stopped.returncode != 0, stopped.tail()
    saved = summary(out)
    assert saved["stop_reason"] == "non_finite" and saved["exit_code"] == train_orpo.EXIT_NONFINITE


def test_every_rank_names_the_checkpoint_when_stopping_on_non_finite_steps(
    nonfinite_stop: tuple[Path, Attempt],
) -> None:
    _, stopped = nonfinite_stop
    assert "The last good state is in None" not in stopped.stderr
    assert "The last good state is in" in stopped.stderr and "checkpoints/step_" in stopped.stderr, stopped.tail()


# ---- 7. bad input fails before any model is loaded, and loses nothing ------------------------------


def main_fails(out: Path, *overrides: str, error: type[Exception] = ConfigError) -> str:
    """Run train_orpo.main in this process; it must raise `error` within seconds; returns the message."""
    started = time.monotonic()
    with pytest.raises(error) as raised:
        train_orpo.main(
            load_config(TINY_CONFIG, [f"output_dir={out}", f"data_cache_dir={out.parent / 'cache'}", *overrides])
        )
    assert time.monotonic() - started < 30
    return str(raised.value)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_unknown_config_key_names_the_nearest(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="Unknown config key 'save_step' in the command line. Did you mean 'save_steps'"
    ):
        load_config(TINY_CONFIG, [f"output_dir={tmp_path}", "save_step=3"])


def test_missing_data_file(no_model: None, tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    message = main_fails(tmp_path / "out", f"dataset={missing}", "eval_split=null", error=DataError)
    assert message == f"Data file '{missing}' does not exist."


@pytest.mark.parametrize(
    "overwrite",
    ["false", "true"],
)
def test_output_dir_that_cannot_be_written(no_model: None, tmp_path: Path, overwrite: str) -> None:
    (tmp_path / "a_file").write_text("not a directory")
    out = tmp_path / "a_file" / "out"
    message = main_fails(out, f"overwrite={overwrite}")
    assert message.startswith(f"output_dir '{out}' cannot be used: it is not writable")


def test_finished_run_is_left_alone(no_model: None, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name in ("run_summary.json", "model.safetensors"):
        shutil.copy(reference / name, out / name)
    before = digest_tree(out)
    message = main_fails(out, "overwrite=false")
    assert "already holds a finished run" in message and "overwrite=true" in message
    assert digest_tree(out) == before


def test_unfinished_run_is_not_restarted_without_resume_from(no_model: None, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(checkpoints_dir(reference), checkpoints_dir(out))
    before = digest_tree(out)
    message = main_fails(out, "overwrite=false")
    assert "holds checkpoints of an unfinished run" in message and "Pass resume_from=latest" in message
    assert digest_tree(out) == before
    for _, path in complete_checkpoints(out):
        verify(path)


def test_too_many_rejected_rows_name_the_top_reasons(no_model: None, tmp_path: Path) -> None:
    good = [json.loads(line) for line in (SORT / "train.jsonl").read_text().splitlines()[:10]]
    same = [{**r, "rejected": r["chosen"]} for r in good]  # identical_responses
    empty = [{**r, "chosen": r["chosen"][:-1] + [{"role": "assistant", "content": " "}]} for r in good[:5]]
    path = write_jsonl(tmp_path / "mostly_bad.jsonl", good + same + empty)  # rows 10-19, 20-24 bad
    message = main_fails(tmp_path / "out", f"dataset={path}", "eval_split=null", error=DataError)
    assert message.startswith("60% of the 25 rows of split 'train' were skipped, more than max_skipped_fraction=0.5.")
    assert "Top reasons: identical_responses: 10 rows (e.g. row 10); empty_response: 5 rows (e.g. row 20)." in message


# ---- 8. malformed rows are counted and skipped; unreadable files are refused ------------------------


def answers(prompt: list[dict[str, Any]], chosen: Any, rejected: Any) -> dict[str, Any]:
    """A conversational row: the prompt's messages, then each answer."""
    return {
        "chosen": [*prompt, {"role": "assistant", "content": chosen}],
        "rejected": [*prompt, {"role": "assistant", "content": rejected}],
    }


LONG_PROMPT = [{"role": "user", "content": "sort: " + " ".join("9876543210" * 8)}]


def malformed_corpus(good: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """`good` with a bad row of each kind after every 20th row, and a pair whose prompt is longer than
    max_length last (kept, its prompt cut to its end); and the rows each reason must count."""
    row = good[0]
    prompt, answer = row["chosen"][:-1], row["chosen"][-1]["content"]
    bad = [
        ({"prompt": row["prompt"], "chosen": row["chosen"]}, "missing_field"),  # no `rejected` column
        ({**row, "rejected": None}, "missing_field"),
        (answers(prompt, 7, "1"), "non_string_content"),
        (answers([{"role": "robot", "content": row["prompt"]}], answer, "1"), "unknown_role"),
        (answers(prompt, "", "1"), "empty_response"),
        (answers(prompt, " \n\t ", "1"), "empty_response"),
        (answers(prompt, answer, answer), "identical_responses"),
    ]
    rows: list[dict[str, Any]] = []
    for i, kept in enumerate(good):
        rows.append(kept)
        if i % 20 == 19 and i // 20 < len(bad):
            rows.append(bad[i // 20][0])
    skipped: dict[str, int] = {}
    for _, reason in bad:
        skipped[reason] = skipped.get(reason, 0) + 1
    return rows + [answers(LONG_PROMPT, "0 1", "1 0")], skipped


@pytest.fixture
def own_signal_handlers() -> Iterator[None]:
    """A run in this process installs its SIGTERM/SIGUSR1 handlers; give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_malformed_rows_are_counted_and_skipped_and_training_runs(own_signal_handlers: None, tmp_path: Path) -> None:
    good = [json.loads(line) for line in (SORT / "train.jsonl").read_text().splitlines()[:200]]
    rows, skipped = malformed_corpus(good)
    assert sum(skipped.values()) == 7 and len(rows) == 208
    path = write_jsonl(tmp_path / "malformed.jsonl", rows)
    out, cache = tmp_path / "out", tmp_path / "cache"
    cfg = load_config(
        TINY_CONFIG,
        [
            f"output_dir={out}",
            f"data_cache_dir={cache}",
            f"dataset={path}",
            "eval_split=null",
            "max_steps=3",
            "logging_steps=1",
            "global_batch_size=8",
            "per_device_batch_size=4",
        ],
    )
    reset_accelerate()
    done = train_orpo.main(cfg)
    reset_accelerate()
    assert done["finished"] and done["plan"]["train_pairs"] == len(good) + 1
    assert summary(out)["skipped_rows"] == {"train": skipped, "eval": {}}
    losses = logged(out, "train/loss")
    assert list(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())

    tokenizer = load_tokenizer(cfg)
    split = load_split(str(path), "train", tokenizer, cfg.max_length, cfg.max_prompt_length, cache_dir=str(cache))
    assert split.skipped == skipped and split.num_rows == len(rows)
    lengths = (split.offsets[1:] - split.offsets[:-1]).reshape(-1, 2)
    prompts = split.prompt_lens.reshape(-1, 2)
    assert (lengths - prompts > 0).all(), "no kept pair has an empty response"
    assert (lengths <= cfg.max_length).all()
    long_prompt = tokenizer.apply_chat_template(LONG_PROMPT, add_generation_prompt=True, tokenize=False)
    assert len(tokenizer(long_prompt, add_special_tokens=False)["input_ids"]) > cfg.max_length
    assert split.row_index[-1] == len(rows) - 1 and prompts[-1].tolist() == [cfg.max_prompt_length] * 2


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("latin1.jsonl", '{"prompt": "caf\xe9"}\n'.encode("latin-1"), "not UTF-8 text (byte 15: invalid continuation"),
        ("empty.jsonl", b"", "is empty: expected preference rows"),
        ("rows.csv", b"prompt,chosen,rejected\nq,a,b\n", "cannot read .csv files; expected .jsonl, .json, .parquet"),
    ],
)
def test_unreadable_data_file_is_refused_before_any_model(
    no_model: None, tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    got = main_fails(tmp_path / "out", f"dataset={path}", "eval_split=null", error=DataError)
    assert got.startswith(str(path)) and message in got, got
