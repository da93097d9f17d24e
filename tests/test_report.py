"""orpo/report.py: learning curves from TensorBoard scalars written here with SummaryWriter."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from orpo import report
from orpo.report import read_scalars, write_learning_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_scalars(log_dir: Path, series: dict[str, list[tuple[int, float]]]) -> None:
    writer = SummaryWriter(log_dir=str(log_dir))
    for tag, points in series.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def check_png(path: Path, size: tuple[int, int]) -> list[str]:
    """A valid PNG of this size; returns the panel titles from its metadata."""
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size
        assert image.text["Title"] == "ORPO learning curves"
        return image.text["Description"].split("\n")


TRAIN_EVAL = {
    "train/loss": [(10, 3.0), (20, 2.0), (30, 1.5)],
    "eval/loss": [(0, 3.2), (30, 1.6)],
    "train/nll_loss": [(10, 2.5), (20, 1.8), (30, 1.3)],
    "eval/nll_loss": [(0, 2.6), (30, 1.4)],
    "train/or_loss": [(10, 0.5), (20, 0.2), (30, 0.2)],
    "eval/or_loss": [(0, 0.6), (30, 0.2)],
    "train/rewards/accuracies": [(10, 0.5), (20, 0.8), (30, 0.9)],
    "eval/rewards/accuracies": [(0, 0.5), (30, 0.95)],
    "train/rewards/margins": [(10, 0.0), (20, 0.5), (30, 1.0)],
    "eval/rewards/margins": [(0, 0.0), (30, 1.1)],
    "train/lr": [(10, 1e-3), (20, 5e-4), (30, 0.0)],
}


def test_all_panels_are_drawn(tmp_path: Path) -> None:
    write_scalars(tmp_path / "tensorboard" / "tensorboard", TRAIN_EVAL)  # accelerate nests a run directory
    out = write_learning_curves(tmp_path / "tensorboard", tmp_path / "report" / "curves.png")
    assert out == tmp_path / "report" / "curves.png"
    titles = check_png(out, (3 * 400, 2 * 300))  # 3 panels a row, 4 x 3 inches each at 100 dpi
    assert titles == ["loss", "nll_loss", "or_loss", "rewards/accuracies", "rewards/margins"]


def test_missing_series_are_skipped(tmp_path: Path) -> None:
    """No eval at all, and no or_loss or margins logged: three panels of train curves, one row."""
    series = {k: v for k, v in TRAIN_EVAL.items() if k.startswith("train/") and "or_loss" not in k}
    series.pop("train/rewards/margins")
    write_scalars(tmp_path / "tb", series)
    titles = check_png(write_learning_curves(tmp_path / "tb", tmp_path / "curves.png"), (3 * 400, 300))
    assert titles == ["loss", "nll_loss", "rewards/accuracies"]


def test_a_single_eval_point_gets_a_panel(tmp_path: Path) -> None:
    write_scalars(tmp_path / "tb", {"eval/rewards/margins": [(300, 2.25)]})
    titles = check_png(write_learning_curves(tmp_path / "tb", tmp_path / "curves.png"), (400, 300))
    assert titles == ["rewards/margins"]


def test_nothing_to_draw_is_an_error_naming_what_was_found(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no scalars"):
        write_learning_curves(tmp_path, tmp_path / "curves.png")
    write_scalars(tmp_path / "tb", {"train/lr": [(1, 1e-3)]})
    with pytest.raises(ValueError, match=r"found \['train/lr'\]"):
        write_learning_curves(tmp_path / "tb", tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


def test_read_scalars_merges_event_files_and_keeps_the_latest_value_of_a_step(tmp_path: Path) -> None:
    write_scalars(tmp_path / "tb" / "first", {"train/loss": [(1, 3.0), (2, 2.5)], "eval/loss": [(2, 2.7)]})
    time.sleep(0.01)  # the second run's wall times are later
    write_scalars(tmp_path / "tb" / "second", {"train/loss": [(2, 2.4), (3, 2.0)]})
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(1, 3.0), (2, pytest.approx(2.4)), (3, 2.0)]
    assert scalars["eval/loss"] == [(2, pytest.approx(2.7))]


def test_command_line_writes_next_to_the_run(tmp_path: Path) -> None:
    write_scalars(tmp_path / "tensorboard", TRAIN_EVAL)
    assert report.main([str(tmp_path)]) == tmp_path / "learning_curves.png"
    check_png(tmp_path / "learning_curves.png", (1200, 600))
    with pytest.raises(SystemExit, match="does not exist"):
        report.main([str(tmp_path / "nowhere")])
