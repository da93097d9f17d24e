"""Leaving the process: every rank exits with the run's own code, and nothing written is lost.

Why this file exists (issue 18). Under CPU load, about one 2-process ZeRO-3 run in 40 finished,
saved everything, and then had rank 1 die with `terminate called without an active exception`
(SIGABRT, exit -6), so the launcher reported a finished run as failed. gdb on the core file showed
the interpreter's own teardown (`Py_FinalizeEx -> PyGC_Collect`) on the main thread while a gloo
worker thread released a tensor (`c10::TensorImpl::decref_pyobject`) and asked for the GIL. A thread
that asks for the GIL of a finalising interpreter is ended with `pthread_exit`, whose forced unwind
crosses a `noexcept` C++ frame: `std::terminate`.

So the gloo threads must be gone before the interpreter finalises. They are joined when the last
reference to their process group is dropped, and destroying the groups in order
(`release_process_groups`) does that when nothing else holds them. But torch itself keeps them: a
2-process gloo run that wraps even a bare `nn.Linear` in DistributedDataParallel still has its
`gloo_tcp_loop` and `pt_gloo_runloop` threads after `destroy_process_group()`, `del model` and
`gc.collect()` (measured with torch 2.13; the same run without DDP has none left). Those threads
cannot be joined from Python.

The last resort, then: when communication threads are still alive at the very end, the process
leaves with `os._exit(code)`, which skips the interpreter's finalisation and so the race. Only after
the exit handlers have run (trackers, logging), the standard streams are flushed, and every file this
run wrote under the output directory is fsynced. A process without such threads exits normally.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
from pathlib import Path

from orpo.checkpoint import fsync_folders, fsync_path
from orpo.distributed import launched

COMM_THREAD_PREFIXES = ("gloo", "pt_gloo", "pt_nccl")


def comm_threads() -> list[str]:
    """Names of this process's native communication threads still alive (gloo's, torch's NCCL watchdog)."""
    names = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended while we looked
            continue
    return sorted(n for n in names if n.startswith(COMM_THREAD_PREFIXES))


def release_process_groups() -> None:
    """Drop this process's references to its process groups, DeepSpeed's first, then the default one.

    Call only when every rank has finished its collectives (a run that ended normally or stopped
    together): destroying a group whose worker still waits on a peer would wait with it.
    """
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:  # module-level references DeepSpeed keeps after its engine is destroyed
        for name, value in vars(groups).items():
            if name.startswith("_") and name.endswith("_GROUP"):
                setattr(groups, name, {} if isinstance(value, dict) else None)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def sync_outputs(output_dir: Path, since: float) -> None:
    """fsync every file under `output_dir` changed since `since` (a time.time()), and their folders."""
    if not output_dir.is_dir():
        return
    changed = [p for p in output_dir.rglob("*") if p.is_file() and p.stat().st_mtime >= since]
    for path in changed:
        fsync_path(path)
    fsync_folders(changed, output_dir)


def leave(code: int, output_dir: Path, started: float, released: bool) -> None:
    """End the process with `code`. `released`: release_process_groups() may run (see its docstring).

    On a launched run each rank's last line says how it left, so a log shows every rank got there.
    """
    if released:
        release_process_groups()
    left = comm_threads()
    if launched():
        rank = os.environ.get("RANK", "0")
        how = f", skipping interpreter teardown ({len(left)} communication threads still alive)" if left else ""
        sys.stderr.flush()  # then the line in one write(2): ranks share the launcher's stderr, and print's
        os.write(2, f"rank {rank}: exit {code}{how}\n".encode())  # separate newline let two lines interleave
    if not left:
        sys.exit(code)
    # The last resort described above: everything Python would flush at exit, flushed now.
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to save there
            pass
    sync_outputs(output_dir, started)
    os._exit(code)
