"""Merge a trained LoRA/QLoRA adapter into its base model and save a plain transformers model.

    python -m orpo.export --adapter runs/mistral7b-orpo-qlora --output runs/mistral7b-orpo-merged
    python -m orpo.export --adapter OUT --output MERGED --dtype bf16 --push-to-hub me/mistral-7b-orpo

The base named in the adapter's adapter_config.json (`base_model_name_or_path`, or `--base`) is
loaded un-quantised in `--dtype` (`auto`: the dtype its checkpoint was saved in), the adapter is
applied with PEFT and merged into the weights (W + scale * B @ A), and the result is saved as
safetensors with the tokenizer the run saved beside the adapter. A QLoRA adapter is merged the same
way, into the full-precision base: merging into NF4 weights would round the update away and leave a
model only bitsandbytes can load. MERGED then loads with plain
`AutoModelForCausalLM.from_pretrained(MERGED)`: no PEFT, no bitsandbytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
FULL_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class ExportError(ValueError):
    """An export that cannot run; the message says what was found and what to do."""


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's adapter_config.json; a directory without one is refused, saying what it holds."""
    if not adapter_dir.is_dir():
        raise ExportError(f"Adapter directory {str(adapter_dir)!r} does not exist.")
    config_file = adapter_dir / "adapter_config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text())
    if (adapter_dir / "config.json").is_file() and any((adapter_dir / f).is_file() for f in FULL_MODEL_FILES):
        raise ExportError(
            f"{adapter_dir} holds a full model (config.json and weights), not a LoRA adapter: it is already "
            "merged, nothing to export. Load it with AutoModelForCausalLM.from_pretrained, or chat with "
            f"`python -m orpo.chat {adapter_dir}`."
        )
    found = sorted(p.name for p in adapter_dir.iterdir())
    raise ExportError(
        f"{adapter_dir} has no adapter_config.json, so it is not a PEFT adapter (found {found or 'nothing'}). "
        "Point --adapter at the output_dir of a mode=lora or mode=qlora run."
    )


def resolve_base(adapter_config: dict[str, Any], adapter_dir: Path, base: str | None) -> str:
    base = base or adapter_config.get("base_model_name_or_path")
    if not base:
        raise ExportError(
            f"{adapter_dir}/adapter_config.json names no base_model_name_or_path: pass the base with --base."
        )
    return base


def resolve_dtype(name: str, base_config: Any) -> torch.dtype:
    """`auto`: the dtype the base checkpoint was saved in (float32 when it does not say)."""
    if name != "auto":
        return DTYPES[name]
    saved = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if saved in _NAMES else torch.float32


def check_output_dir(output_dir: Path, adapter_dir: Path, overwrite: bool) -> None:
    if output_dir.resolve() == adapter_dir.resolve() or output_dir.resolve() in adapter_dir.resolve().parents:
        raise ExportError(f"--output {output_dir} would replace the adapter {adapter_dir}: pick another directory.")
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"--output {output_dir} exists and is not a directory.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ExportError(
            f"--output {output_dir} exists and is not empty: pick another directory, or pass --overwrite to replace it."
        )


def load_merged(
    adapter_dir: str | Path, dtype: str = "auto", base: str | None = None
) -> tuple[torch.nn.Module, Any, str]:
    """(merged model, tokenizer, base name): the base loaded un-quantised in `dtype`, the adapter merged in."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    base = resolve_base(read_adapter_config(adapter_dir), adapter_dir, base)
    base_config = AutoConfig.from_pretrained(base)
    if getattr(base_config, "quantization_config", None):
        method = base_config.quantization_config
        method = method.get("quant_method", method) if isinstance(method, dict) else method
        raise ExportError(
            f"The base {base!r} is a quantised checkpoint ({method}): merging into quantised weights loses the "
            "update. Pass the full-precision model the quantised one was made from with --base."
        )
    torch_dtype = resolve_dtype(dtype, base_config)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    has_tokenizer = any((adapter_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if has_tokenizer else base)
    return merged, tokenizer, base


def export_merged(
    adapter_dir: str | Path,
    output_dir: str | Path,
    dtype: str = "auto",
    base: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Merge the adapter into its base and save model (safetensors) and tokenizer to `output_dir`.

    Written to a temporary sibling directory first, then moved into place, so an interrupted export
    never leaves a half-written model where a complete one is expected."""
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if dtype != "auto" and dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}.")
    read_adapter_config(adapter_dir)  # refuse a wrong directory before touching the output
    check_output_dir(output_dir, adapter_dir, overwrite)
    merged, tokenizer, base = load_merged(adapter_dir, dtype, base)
    staging = output_dir.parent / f".{output_dir.name}.tmp{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    params = sum(p.numel() for p in merged.parameters())
    dtype_name = _NAMES.get(next(merged.parameters()).dtype, "?")
    print(f"merged {adapter_dir} into {base} ({params:,} parameters, {dtype_name}) -> {output_dir}")
    return output_dir


def push_to_hub(output_dir: Path, repo_id: str, private: bool) -> None:
    """Upload the merged model and tokenizer as saved (needs the network and `hf auth login`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(output_dir, dtype="auto").push_to_hub(repo_id, private=private)
    AutoTokenizer.from_pretrained(output_dir).push_to_hub(repo_id, private=private)
    print(f"pushed {output_dir} to https://huggingface.co/{repo_id}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, type=Path, help="a lora/qlora run's output_dir")
    parser.add_argument("--output", required=True, type=Path, help="directory for the merged model")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES], help="dtype of the merged weights (auto: the base's)"
    )
    parser.add_argument("--base", help="base model to merge into (default: adapter_config.json's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload the merged model to this hub repo")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    try:
        out = export_merged(args.adapter, args.output, args.dtype, args.base, args.overwrite)
    except ExportError as err:
        sys.exit(f"error: {err}")
    if args.push_to_hub:
        push_to_hub(out, args.push_to_hub, args.private)
    return out


if __name__ == "__main__":
    main()
