"""Stress check for issue 18: does every finished 2-process run exit 0?

    .venv/bin/python bench/teardown_stress.py --engines ddp,zero2,zero3 --runs 30 --load 2

Runs the tiny recipe (5 steps, evaluation and the final save, like the reliability tests) under
`accelerate launch` with 2 CPU processes over gloo, `--runs` times per engine, while `--load`
busy-looping processes compete for the CPU. Counts the launcher's exit codes, and for each failure
which rank died and how (a SIGABRT shows as exit -6 in the launcher's report, with "terminate called
without an active exception" on stderr). Not a test and not timed: it counts.

The failure it hunts is rare and load-dependent (1 in 40 ZeRO-3 runs with --faults, measured): after
the run has saved everything, a gloo worker thread frees a tensor during interpreter finalisation,
takes the GIL, and Python 3.11 ends that thread with pthread_exit, whose forced unwind reaches a
noexcept C++ frame: std::terminate (seen in gdb on a core kept with --cores).
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_multiprocess import free_port, launch_args  # noqa: E402

RUN = (
    "--config",
    "configs/tiny.yaml",
    "dataset=data/sort_prefs",
    "max_steps=5",
    "save_steps=0",
    "logging_steps=1",
    "eval_steps=0",
    "eval_at_start=false",
    "eval_max_samples=40",
    "num_sample_prompts=0",
    "global_batch_size=8",
    "per_device_batch_size=2",
)


def burn(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def one_run(engine: str, out: Path, cache: Path, core_dir: Path | None, faults: bool) -> tuple[int, str]:
    cmd = [
        *launch_args(engine, 2, free_port()),
        "tests/fault_injection.py" if faults else "train_orpo.py",
        *RUN,
        f"output_dir={out}",
        f"data_cache_dir={cache}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORPO_") and k != "WORLD_SIZE"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", ORPO_SKIP_PLOTS="1", HF_HUB_OFFLINE="1")
    if faults:  # as tests/test_reliability.py's non-finite case: a tensor hook on rank 1, digests every step
        env.update(
            ORPO_INF_STEPS="3",
            ORPO_INF_RANK="1",
            ORPO_WEIGHTS_DIGEST=str(out.parent / f"{out.name}-digests"),
            ORPO_STEP_DIGESTS=str(out.parent / f"{out.name}-steps"),
        )
    if core_dir is not None:  # a failing rank leaves a core file (core_pattern "core": in its cwd) for gdb
        env["PYTHONFAULTHANDLER"] = "1"
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_CORE, (-1, -1))) if core_dir else None,
    )
    if core_dir is not None:
        for core in ROOT.glob("core*"):
            if core.is_file():
                core_dir.mkdir(parents=True, exist_ok=True)
                core.rename(core_dir / f"{out.name}.{core.name}")
    return proc.returncode, proc.stdout[-2000:] + "\n--- stderr\n" + proc.stderr[-4000:]


def classify(returncode: int, log: str, out: Path) -> str:
    if returncode == 0:
        left = sum(f"rank {r}: exit 0" in log for r in (0, 1))  # each rank's last line (orpo/teardown.py)
        return "exit 0" if left == 2 else f"exit 0, but only {left} of 2 ranks wrote their last line"
    finished = (out / "run_summary.json").is_file() and json.loads((out / "run_summary.json").read_text())["finished"]
    aborted = "terminate called without an active exception" in log
    signal_exit = re.search(r"exit code:\s*(-?\d+)", log)
    what = f"exit {returncode}"
    what += f" (rank exit {signal_exit.group(1)})" if signal_exit else ""
    what += ", std::terminate" if aborted else ""
    return what + (", after the run finished and saved" if finished else ", run unfinished")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="ddp,zero2,zero3")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--load", type=int, default=2, help="busy-looping processes beside each run")
    parser.add_argument("--keep-logs", type=Path, help="write each failing run's log here")
    parser.add_argument("--faults", action="store_true", help="the reliability test's inf-gradient fault on rank 1")
    parser.add_argument("--cores", type=Path, help="core dumps on; a failing rank's core file is moved here (for gdb)")
    args = parser.parse_args()

    counts: dict[str, collections.Counter] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for engine in args.engines.split(","):
            counts[engine] = collections.Counter()
            for i in range(args.runs):
                out = Path(tmp) / f"{engine}-{i}"
                burners = [
                    multiprocessing.Process(target=burn, args=(time.time() + 600,), daemon=True)
                    for _ in range(args.load)
                ]
                for b in burners:
                    b.start()
                started = time.time()
                try:
                    code, log = one_run(engine, out, cache, args.cores, args.faults)
                finally:
                    for b in burners:
                        b.terminate()
                what = classify(code, log, out)
                counts[engine][what] += 1
                print(f"{engine} run {i + 1}/{args.runs}: {what} ({time.time() - started:.0f} s)", flush=True)
                if code != 0 and args.keep_logs:
                    args.keep_logs.mkdir(parents=True, exist_ok=True)
                    (args.keep_logs / f"{engine}-{i}.log").write_text(log)
    print("\nengine  runs  outcomes")
    for engine, counter in counts.items():
        print(f"{engine:7} {sum(counter.values()):4}  " + "; ".join(f"{k}: {v}" for k, v in counter.most_common()))


if __name__ == "__main__":
    main()
