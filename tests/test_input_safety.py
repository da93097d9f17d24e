"""Nothing is lost before every input has been checked, one live run per output directory, and a
resume is refused when its inputs changed (issue 10, items 5 and 6)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import orpo.guards as guards
from orpo.checkpoint import CheckpointError, find_resume_checkpoint, write_manifest
from orpo.config import ConfigError
from orpo.data import DataError
from orpo.model import ModelLoadError
from tests.conftest import ROOT, train_tiny
from tests.test_reliability import SORT, digest_tree

HOLD_LOCK = (
    "import sys; from pathlib import Path; import orpo.guards as guards; "
    "guards.lock_output_dir(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read(); "
    "guards.release_output_locks()"
)


@pytest.fixture
def own_signal_handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def old_run(out: Path) -> dict[str, str]:
    """A finished run's files, as a previous run left them; returns their digests."""
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"old events")
    (out / "checkpoints" / "step_3").mkdir(parents=True)
    (out / "checkpoints" / "step_3" / "trainer_state.json").write_text("{}")
    (out / "run_summary.json").write_text(json.dumps({"finished": True, "step": 300}))
    (out / "data_order.jsonl").write_text('{"step": 1, "rows": [0]}\n')
    (out / "model.safetensors").write_bytes(b"old weights")
    return digest_tree(out)


# ---- overwrite=true deletes only after every input has been checked ------------------------------


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("dataset={tmp}/trian.jsonl", DataError),  # a typo in the data set
        ("tokenizer_name_or_path={tmp}/no_tokenizer", ModelLoadError),  # was a bare OSError before issue 11
        ("model_name_or_path={tmp}/no_model", ModelLoadError),  # tokenizer fine, no model there
    ],
    ids=["dataset", "tokenizer", "model"],
)
def test_overwrite_with_a_bad_input_loses_nothing(
    own_signal_handlers: None, tmp_path: Path, bad: str, error: type[Exception]
) -> None:
    """Before this change check_output_dir deleted tensorboard/, checkpoints/ and run_summary.json first."""
    out = tmp_path / "out"
    before = old_run(out)
    (tmp_path / "no_model").mkdir()
    extra = ["tokenizer_name_or_path=assets/tiny", "random_init=false"] if "model_name" in bad else []
    with pytest.raises(error):
        train_tiny(out, "overwrite=true", bad.format(tmp=tmp_path), *extra, "eval_split=null")
    after = digest_tree(out)
    after.pop("run.lock")
    assert after == before


def test_overwrite_deletes_the_old_run_once_everything_has_loaded(own_signal_handlers: None, tmp_path: Path) -> None:
    out = tmp_path / "out"
    old_run(out)
    done = train_tiny(out, "overwrite=true", "max_steps=2", "eval_split=null", "logging_steps=1", "save_steps=0")
    assert done["finished"] and json.loads((out / "run_summary.json").read_text())["step"] == 2
    assert not (out / "checkpoints").exists() and not (out / "data_order.jsonl").exists()
    assert b"old events" not in b"".join(p.read_bytes() for p in (out / "tensorboard").rglob("*") if p.is_file())


# ---- the lock ------------------------------------------------------------------------------------


def hold_lock(out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_a_second_run_on_a_live_runs_directory_is_refused_naming_its_holder(no_model: None, tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = old_run(out)
    holder = hold_lock(out)
    try:
        with pytest.raises(ConfigError) as refused:
            train_tiny(out, "overwrite=true", "resume_from=latest")
        message = str(refused.value)
        assert f"output_dir '{out}' is in use by a live run (host {socket.gethostname()}, pid {holder.pid}, " in message
        assert "started 20" in message and str(out / "run.lock") in message
        after = digest_tree(out)
        assert after.pop("run.lock") and after == before
    finally:
        holder.communicate("")  # it ends cleanly: its lock body is emptied
    assert (out / "run.lock").read_text() == ""
    with pytest.raises(AssertionError, match="model loaded"):  # now free: the run goes on to the model
        train_tiny(out, "overwrite=true", "eval_split=null")


def test_a_stale_lock_of_a_killed_run_is_taken_over(
    no_model: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    holder = hold_lock(out)
    holder.kill()  # SIGKILL: no clean-up, the body stays; the kernel drops the flock
    holder.wait()
    assert json.loads((out / "run.lock").read_text())["pid"] == holder.pid
    with pytest.raises(AssertionError, match="model loaded"):
        train_tiny(out, "eval_split=null")
    printed = capsys.readouterr().out
    assert (
        f"output dir   took over the lock of a run that is gone (host {socket.gethostname()}, pid {holder.pid}, "
        in printed
    )


def test_without_flock_the_holders_pid_decides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A file system with no flock (ENOLCK): this host's live pid refuses, a dead one is taken over,
    another host's holder cannot be checked and is refused."""

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(guards.fcntl, "flock", no_flock)
    out = tmp_path / "out"
    out.mkdir()
    lock = out / "run.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        here = socket.gethostname()
        lock.write_text(json.dumps({"host": here, "pid": sleeper.pid, "started": "then"}))
        with pytest.raises(ConfigError, match=f"locked by a run \\(host {here}, pid {sleeper.pid}, started then\\)"):
            guards.lock_output_dir(out)
        lock.write_text(json.dumps({"host": "node-17", "pid": sleeper.pid, "started": "then"}))
        with pytest.raises(ConfigError, match="on another host, which this file system \\(no flock\\) cannot check"):
            guards.lock_output_dir(out)
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.write_text(json.dumps({"host": here, "pid": sleeper.pid, "started": "then"}))
    try:
        note = guards.lock_output_dir(out)
        assert note and f"pid {sleeper.pid}" in note
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    finally:
        guards.release_output_locks()


# ---- resuming: the data must be the same; a damaged record or manifest is tolerated ---------------


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 4-step run on a 24-row file with checkpoints, its summary removed as by a kill after them."""
    root = tmp_path_factory.mktemp("stopped")
    data = root / "train.jsonl"
    data.write_text("".join((SORT / "train.jsonl").read_text().splitlines(keepends=True)[:24]))
    out = root / "run"
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        train_tiny(out, *run_args(data), "max_steps=4")
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    (out / "run_summary.json").unlink()
    return data, out


def run_args(data: Path) -> list[str]:
    return [
        f"dataset={data}",
        "eval_split=null",
        "save_steps=2",
        "logging_steps=1",
        "global_batch_size=8",
        "per_device_batch_size=4",
        "record_data_order=true",
    ]


def copy_run(stopped_run: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    data, out = stopped_run
    shutil.copy(data, tmp_path / data.name)
    shutil.copytree(out, tmp_path / "run")
    return tmp_path / data.name, tmp_path / "run"


def test_resume_over_changed_data_is_refused_before_the_model_loads(
    no_model: None, stopped_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """The README promised it; before this change the resume went on (to the model) over other rows."""
    _, out = copy_run(stopped_run, tmp_path)
    data = stopped_run[0]  # the path the checkpoint was saved with, its content changed for this test
    original = data.read_text()
    rows = original.splitlines(keepends=True)
    try:
        data.write_text("".join(rows[1:] + rows[:1]))  # the same rows in another order: another sha256
        with pytest.raises(ConfigError) as refused:
            train_tiny(out, *run_args(data), "max_steps=4", "resume_from=latest")
    finally:
        data.write_text(original)
    message = str(refused.value)
    assert f"the training data {data.resolve()} changed since that checkpoint was saved (sha256 " in message
    assert "Restore the data the run started with" in message


def test_resume_over_the_same_data_goes_on(no_model: None, stopped_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, out = copy_run(stopped_run, tmp_path)
    with pytest.raises(AssertionError, match="model loaded"):
        train_tiny(out, *run_args(stopped_run[0]), "max_steps=4", "resume_from=latest")


def test_a_half_written_last_line_of_data_order_is_tolerated(
    own_signal_handlers: None, stopped_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """Before this change json.loads of the partial line failed every resume."""
    _, out = copy_run(stopped_run, tmp_path)
    order = out / "data_order.jsonl"
    order.write_text(order.read_text() + '{"step": 5, "rows": [3, 1')  # a kill in the middle of an append
    done = train_tiny(out, *run_args(stopped_run[0]), "max_steps=4", "resume_from=latest")
    assert done["finished"]
    steps = [json.loads(line)["step"] for line in order.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "manifest",
    [
        [],
        {"files": []},
        {"files": {"trainer_state.json": 5}},
        {"files": {"trainer_state.json": {}}},
        {"files": {"trainer_state.json": {"size": "2", "sha256": "x"}}},
        {"other": 1},
    ],
    ids=["list", "files_list", "entry_int", "entry_empty", "size_str", "no_files"],
)
def test_a_malformed_manifest_makes_that_checkpoint_skipped(tmp_path: Path, manifest: Any) -> None:
    """Valid JSON of the wrong shape: before this change TypeError/KeyError/AttributeError escaped verify."""
    for step in (3, 6):
        path = tmp_path / "checkpoints" / f"step_{step}"
        path.mkdir(parents=True)
        (path / "trainer_state.json").write_text(json.dumps({"step": step}))
        write_manifest(path)
    bad = tmp_path / "checkpoints" / "step_6"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=f"skipping checkpoint {bad}: {bad / 'manifest.json'} is not a valid manifest"):
        assert find_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoints" / "step_3"
    with pytest.raises(CheckpointError, match="is not a valid manifest"):
        find_resume_checkpoint(tmp_path, str(bad))


def test_the_lock_holder_body_names_host_pid_and_start(tmp_path: Path) -> None:
    try:
        assert guards.lock_output_dir(tmp_path) is None
        body = json.loads((tmp_path / "run.lock").read_text())
        assert (body["host"], body["pid"]) == (socket.gethostname(), os.getpid())
        assert body["started"].startswith(time.strftime("%Y-%m-%dT"))
    finally:
        guards.release_output_locks()
    assert (tmp_path / "run.lock").read_text() == ""
