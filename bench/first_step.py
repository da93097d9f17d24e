"""Where the first optimizer step's extra time goes (issue 20 item 3): our trainer under torch.profiler,
one profile per optimizer step, and the operators whose self time differs most between step 1 and
the mean of the later steps.

    # a bench case's assets first (the same pair repeated: every step has the same shapes)
    .venv-bench/bin/python bench/bench_orpo.py --cases cpu-smollm2-lora-fp32 --same-pair true --prepare-only
    .venv/bin/python bench/first_step.py --assets runs/bench/assets-<key> --steps 3 mixed_precision=no

Trailing key=value items are our trainer's overrides, on top of the bench case's (bench_orpo.ours_argv).
The profiler adds its own overhead to every step alike; compare the steps with each other, not with
the bench's step times.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", required=True, help="a bench case's assets directory (model/, pairs.jsonl)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (the first one and the rest)")
    parser.add_argument("--top", type=int, default=15, help="operators to list")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    import torch
    from bench_orpo import PRESETS, Case, ours_argv
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import train_orpo

    assets = Path(args.assets).resolve()
    case = Case(name="first-step", **{**PRESETS["cpu-smollm2-lora-fp32"], "warmup": 1, "steps": args.steps - 1})
    out = assets.parent / "first-step-run"
    argv = ours_argv(case, assets, out, assets.parent) + args.overrides

    profiles: list[dict[str, float]] = []
    walls: list[float] = []
    state: dict[str, object] = {}

    def start() -> None:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        prof.__enter__()
        state.update(prof=prof, started=time.perf_counter())

    def stop() -> None:
        prof = state.pop("prof")
        prof.__exit__(None, None, None)
        walls.append(time.perf_counter() - state.pop("started"))
        totals: dict[str, float] = defaultdict(float)
        for event in prof.key_averages():
            totals[event.key] += event.self_cpu_time_total / 1e6
        profiles.append(dict(totals))

    def first_forward(*_: object) -> None:
        hook.remove()
        start()

    def after_step(*_: object) -> None:
        stop()
        if len(walls) < args.steps:
            start()

    hook = torch.nn.modules.module.register_module_forward_pre_hook(first_forward)
    register_optimizer_step_post_hook(after_step)
    train_orpo.main(train_orpo.parse_args(argv))

    first, later = profiles[0], profiles[1:]
    mean_later = {k: sum(p.get(k, 0.0) for p in later) / len(later) for k in set().union(*later)}
    print(f"step wall s (profiled): {', '.join(f'{w:.2f}' for w in walls)}")
    print(f"{'operator':<48} {'step 1 s':>9} {'later s':>9} {'extra s':>9}")
    keys = sorted(set(first) | set(mean_later), key=lambda k: first.get(k, 0) - mean_later.get(k, 0), reverse=True)
    for key in keys[: args.top]:
        a, b = first.get(key, 0.0), mean_later.get(key, 0.0)
        print(f"{key[:48]:<48} {a:9.3f} {b:9.3f} {a - b:9.3f}")
    print(f"{'all operators':<48} {sum(first.values()):9.3f} {sum(mean_later.values()):9.3f}")


if __name__ == "__main__":
    main()
