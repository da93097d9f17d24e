"""How a process ends (orpo/teardown.py): the run's own exit code, and nothing written is lost, also
when communication threads that cannot be joined force the exit that skips interpreter teardown.

The multi-process side (every rank's last line, launcher exit 0, outputs complete) is checked on
every launched run in tests/test_multiprocess.py; bench/teardown_stress.py repeats it under load.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# A child that writes to stdout and to a file without flushing either, then leaves through
# orpo.teardown.leave. With a thread named like gloo's, leave must take the os._exit path, which
# would drop both buffers if it did not flush them first.
CHILD = """
import ctypes, sys, threading, time
from pathlib import Path
from orpo.teardown import comm_threads, leave

out, code, fake = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
if fake:
    ready = threading.Event()
    def gloo_like():
        ctypes.CDLL(None).prctl(15, b"pt_gloo_runloop", 0, 0, 0)  # PR_SET_NAME, as torch names its threads
        ready.set()
        time.sleep(3600)
    threading.Thread(target=gloo_like, daemon=True).start()
    ready.wait()
print("threads:", comm_threads())
sys.stdout.write("unflushed stdout")
log = open(out / "log.txt", "w")  # left open and unflushed on purpose
log.write("unflushed file")
import atexit; atexit.register(log.close)
leave(code, out, 0.0, released=True)
"""


@pytest.mark.parametrize("fake_comm_thread", [False, True], ids=["normal-exit", "os-exit"])
@pytest.mark.parametrize("code", [0, 75])
def test_leave_keeps_the_exit_code_and_everything_written(tmp_path: Path, fake_comm_thread: bool, code: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), WORLD_SIZE="2", RANK="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), str(code), str(int(fake_comm_thread))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == code, proc.stderr
    assert ("'pt_gloo_runloop'" in proc.stdout) == fake_comm_thread, proc.stdout
    assert proc.stdout.endswith("unflushed stdout"), proc.stdout
    assert (tmp_path / "log.txt").read_text() == "unflushed file"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rank 1: exit {code}"), proc.stderr
    assert ("skipping interpreter teardown (1 communication threads" in last) == fake_comm_thread, last


def test_leave_is_silent_on_a_single_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), "3", "0"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 3 and "rank " not in proc.stderr, proc.stderr
