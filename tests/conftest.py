"""Shared fixtures: offline, tiny models built from the shipped config, fresh accelerate state."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "assets" / "tiny"
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run where CUDA is usable and are skipped, with the reason, elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: torch {torch.__version__} sees none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; each in-process run needs fresh ones."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def train_tiny(out: Path, *overrides: str) -> dict[str, Any]:
    """train_orpo.main on configs/tiny.yaml in this process, writing to `out` (data cache beside it)."""
    import train_orpo
    from orpo.config import load_config

    reset_accelerate()
    cfg = load_config(TINY_CONFIG, [f"output_dir={out}", f"data_cache_dir={out.parent / 'cache'}", *overrides])
    try:
        return train_orpo.main(cfg)
    finally:
        reset_accelerate()


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fails the test if a model would be loaded: bad input must be refused before that."""
    import train_orpo

    def load_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("model loaded")

    monkeypatch.setattr(train_orpo, "load_model", load_model)
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama saved to disk with the tiny tokenizer: a local 'pretrained' model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_base")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(path)
    return path
