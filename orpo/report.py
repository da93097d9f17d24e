"""The run report: learning curves drawn from a run's TensorBoard scalars into one PNG.

    python -m orpo.report runs/tiny                   # writes runs/tiny/learning_curves.png
    python -m orpo.report runs/tiny --output curves.png

One panel per metric (loss, nll_loss, or_loss, rewards/accuracies, rewards/margins), train and eval
against the optimizer step. A metric with no series logged is left out; a series with one point (an
eval at the end only) is drawn as a marker. The panel titles are written into the PNG's metadata
(`Description`: one title per line) so the file says what it shows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

PANELS = ("loss", "nll_loss", "or_loss", "rewards/accuracies", "rewards/margins")
SPLITS = ("train", "eval")
COLUMNS = 3
PANEL_INCHES = (4.0, 3.0)  # width, height of one panel
DPI = 100


def read_scalars(tensorboard_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under `tensorboard_dir` (event files searched recursively), as sorted
    (step, value) points. A step logged twice (a restarted run writing into the same directory)
    keeps its latest value."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    latest: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)  # tag -> step -> (wall_time, value)
    for path in sorted(Path(tensorboard_dir).rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={SCALARS: 0})  # 0: keep every point
        events.Reload()
        for tag in events.Tags().get("scalars", []):
            for e in events.Scalars(tag):
                if e.step not in latest[tag] or e.wall_time >= latest[tag][e.step][0]:
                    latest[tag][e.step] = (e.wall_time, e.value)
    return {tag: sorted((step, value) for step, (_, value) in points.items()) for tag, points in latest.items()}


def write_learning_curves(tensorboard_dir: Path, out_png: Path) -> Path:
    """Draw the learning curves of the run logged under `tensorboard_dir` into `out_png`.

    The figure is PANEL_INCHES per panel, COLUMNS panels a row, at DPI; the titles of the panels
    drawn are in the PNG's `Description` metadata. No event file or none of the metrics: an error."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed (Agg canvas)

    tensorboard_dir, out_png = Path(tensorboard_dir), Path(out_png)
    scalars = read_scalars(tensorboard_dir)
    panels = [name for name in PANELS if any(f"{split}/{name}" in scalars for split in SPLITS)]
    if not panels:
        found = sorted(scalars) or "no scalars (no event files?)"
        raise ValueError(
            f"No learning curves to draw under {tensorboard_dir}: expected train/ or eval/ series of "
            f"{', '.join(PANELS)}; found {found}."
        )
    rows = math.ceil(len(panels) / COLUMNS)
    columns = min(len(panels), COLUMNS)
    figure = Figure(figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax, name in zip(axes, panels, strict=False):
        for split, style in (("train", {"linewidth": 1.2}), ("eval", {"marker": "o", "markersize": 3})):
            points = scalars.get(f"{split}/{name}")
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=split, **style)
        if name == "rewards/accuracies":
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, format="png", metadata={"Title": "ORPO learning curves", "Description": "\n".join(panels)})
    return out_png


def write_report(out: Path, summary: dict[str, Any]) -> None:
    """run_summary.json and learning_curves.png (rank 0), at checkpoints and at the end."""
    (out / "run_summary.json").write_text(json.dumps(summary, indent=2))
    try:
        write_learning_curves(out / "tensorboard", out / "learning_curves.png")
    except ValueError:  # nothing logged yet
        pass


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run's output_dir (holding tensorboard/)")
    parser.add_argument("--output", type=Path, help="PNG to write; default RUN_DIR/learning_curves.png")
    args = parser.parse_args(argv)
    tensorboard_dir = args.run_dir / "tensorboard"
    if not tensorboard_dir.is_dir():
        sys.exit(f"error: {tensorboard_dir} does not exist: point at a run's output_dir.")
    try:
        out = write_learning_curves(tensorboard_dir, args.output or args.run_dir / "learning_curves.png")
    except ValueError as err:
        sys.exit(f"error: {err}")
    print(f"learning curves: {out}")
    return out


if __name__ == "__main__":
    main()
