"""End to end on the tiny config (the demo's): the loop learns, normalises over the global batch,
and what it saves reloads with plain transformers / PEFT and scores exactly as the trained model did.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_orpo
from orpo.collator import PairCollator
from orpo.config import ConfigError, load_config
from orpo.data import load_split
from orpo.metrics import MetricSums
from orpo.model import load_tokenizer
from tests.conftest import ROOT, TINY_CONFIG, reset_accelerate


def run(tmp_path: Path, *overrides: str) -> dict:
    reset_accelerate()
    cfg = load_config(TINY_CONFIG, [f"output_dir={tmp_path}", f"data_cache_dir={tmp_path / 'cache'}", *overrides])
    return train_orpo.main(cfg)


def eval_metrics_of_saved(model: torch.nn.Module, out: Path, summary: dict) -> dict[str, float]:
    """Evaluate a reloaded model on the run's eval subset with the trainer's own evaluate()."""
    from accelerate import Accelerator

    reset_accelerate()
    cfg = load_config(
        TINY_CONFIG,
        [
            f"output_dir={out}",
            f"data_cache_dir={out / 'cache'}",
            *[
                f"{k}={json.dumps(v)}"
                for k, v in summary["config"].items()
                if k in ("model_name_or_path", "eval_max_samples", "seed")
            ],
        ],
    )
    tokenizer = load_tokenizer(cfg)
    data = load_split(
        cfg.dataset, cfg.eval_split, tokenizer, cfg.max_length, cfg.max_prompt_length, cache_dir=cfg.data_cache_dir
    )
    indices = np.sort(np.random.default_rng(cfg.seed).permutation(len(data))[: cfg.eval_max_samples])
    return train_orpo.evaluate(
        model,
        Accelerator(cpu=True),
        data,
        indices,
        PairCollator(tokenizer.pad_token_id),
        cfg.eval_batch_size,
        cfg.orpo_lambda,
    )


def test_tiny_demo_learns_the_task(tmp_path: Path) -> None:
    """The demo's promise: near chance before training, >= 0.90 held-out accuracy after, loss falls."""
    summary = run(tmp_path, "eval_steps=0")
    logged = summary["final_metrics"]
    events = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "TensorBoard event files are written under output_dir/tensorboard"
    start = _scalars(tmp_path, "eval/rewards/accuracies")
    assert start[0][0] == 0 and 0.35 <= start[0][1] <= 0.65, f"before training accuracy should be near chance: {start}"
    assert logged["eval/rewards/accuracies"] >= 0.90
    losses = _scalars(tmp_path, "eval/loss")
    assert losses[-1][1] < 0.2 * losses[0][1]
    train_loss = [v for _, v in _scalars(tmp_path, "train/loss")]
    assert train_loss[-1] < 0.2 * train_loss[0]
    for tag in (
        "loss",
        "nll_loss",
        "or_loss",
        "log_odds_ratio",
        "log_odds_chosen",
        "logps/chosen",
        "logps/rejected",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
    ):
        assert f"train/{tag}" in logged and f"eval/{tag}" in logged, tag
        assert _scalars(tmp_path, f"train/{tag}"), f"train/{tag} in TensorBoard"
    for tag in ("lr", "grad_norm", "tokens_per_s", "pairs_per_s", "peak_mem_gb", "skipped_steps"):
        assert _scalars(tmp_path, f"train/{tag}"), f"train/{tag} in TensorBoard"
    png = (tmp_path / "learning_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    samples = _texts(tmp_path, "samples/0")
    assert [step for step, _ in samples] == [0, 300], "a sample answer at every evaluation"
    assert "**answer**" in samples[-1][1] and ("sort:" in samples[-1][1] or "max:" in samples[-1][1])
    saved = json.loads((tmp_path / "run_summary.json").read_text())
    assert set(saved) >= {"config", "plan", "final_metrics", "skipped_rows", "wall_seconds", "tokens_per_s"}
    assert saved["plan"]["accumulation"] == 2 and saved["skipped_rows"] == {"train": {}, "eval": {}}
    assert saved["tokens_per_s"] > 0


def _texts(out: Path, tag: str) -> list[tuple[int, str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for path in sorted((out / "tensorboard").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"tensors": 0})
        acc.Reload()
        stored = f"{tag}/text_summary"  # SummaryWriter.add_text's tag
        if stored in acc.Tags().get("tensors", []):
            values += [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(stored)]
    return sorted(values)


def _scalars(out: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for path in sorted((out / "tensorboard").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            values += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(values)


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_one_step_is_the_same_however_the_global_batch_is_split(tmp_path: Path, micro: int) -> None:
    """8 pairs as micro x accumulation = 8x1 (reference), 4x2, 2x4, 1x8: same loss, gradient norm
    and parameter update after one optimizer step (float32, relative 1e-5). Per-micro-batch means
    would weight short and long responses differently and fail this. With adam_epsilon=1 the first
    Adam update is lr * g / (|g| + 1), close to SGD, so the update shows the gradient itself (with
    the usual tiny epsilon it would be lr * sign(g) and hide any scaling error)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = (
        "max_steps=1",
        "global_batch_size=8",
        "eval_split=null",
        "max_grad_norm=0",
        "learning_rate=1.0",
        "adam_epsilon=1.0",
        "warmup_ratio=0.0",
        "lr_scheduler=constant",
    )
    ref = run(tmp_path / "ref", *common, "per_device_batch_size=8")
    got = run(tmp_path / "got", *common, f"per_device_batch_size={micro}")
    assert got["plan"]["accumulation"] == 8 // micro
    for key in ("train/loss", "train/nll_loss", "train/or_loss", "train/grad_norm", "train/logps/chosen"):
        assert got["final_metrics"][key] == pytest.approx(ref["final_metrics"][key], rel=1e-5), key
    torch.manual_seed(42)  # the tiny config's random init
    init = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / "assets" / "tiny")).state_dict()
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "got" / "model.safetensors")
    for name in a:
        update_ref, update_got = a[name] - init[name], b[name] - init[name]
        assert update_ref.abs().max() > 1e-4, f"{name} should have moved"
        torch.testing.assert_close(
            update_got, update_ref, rtol=1e-5, atol=1e-5 * update_ref.abs().max().item(), msg=name
        )


def test_accumulated_gradient_equals_full_batch_gradient() -> None:
    """The trainer's forward_orpo scaled by global counts: gradients summed over 8 micro-batches of 1
    equal one batch of 8 (float32, relative 1e-5), with responses of different lengths."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = load_config(TINY_CONFIG)
    tokenizer = load_tokenizer(cfg)
    data = load_split(cfg.dataset, cfg.train_split, tokenizer, cfg.max_length, cfg.max_prompt_length)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model_name_or_path))
    collator = PairCollator(tokenizer.pad_token_id, nll_on_prompt=True)
    examples = [data[i] for i in range(8)]
    assert len({len(e["chosen_ids"]) - e["chosen_prompt_len"] for e in examples}) > 1, "want varied lengths"
    tokens = int(collator(examples)["num_nll_tokens"])

    def grads(splits: list[list[dict]]) -> torch.Tensor:
        model.zero_grad()
        for part in splits:
            out = train_orpo.forward_orpo(model, collator(part), 0.5, tokens, 8, MetricSums(torch.device("cpu")))
            out.loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole = grads([examples])
    pieces = grads([[e] for e in examples])
    assert ((pieces - whole).norm() / whole.norm()).item() < 1e-5
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())
    # The same micro-batches, each normalised by its own counts (the usual mistake), do not match.
    model.zero_grad()
    for part in [examples[:2], examples[2:]]:
        batch = collator(part)
        out = train_orpo.forward_orpo(
            model, batch, 0.5, int(batch["num_nll_tokens"]), len(part), MetricSums(torch.device("cpu"))
        )
        (out.loss * len(part) / 8).backward()
    wrong = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert ((wrong - whole).norm() / whole.norm()).item() > 1e-3


def test_lora_adapter_reloads_with_peft_and_scores_the_same(tmp_path: Path, tiny_base: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary = run(
        tmp_path,
        f"model_name_or_path={tiny_base}",
        "random_init=false",
        "mode=lora",
        "max_steps=20",
        "eval_steps=0",
        "eval_at_start=false",
        "eval_max_samples=64",
        "learning_rate=1e-2",
        "lora_target_modules=[q_proj, v_proj, up_proj]",
    )
    files = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path)
    metrics = eval_metrics_of_saved(reloaded, tmp_path, summary)
    for tag in ("logps/chosen", "logps/rejected", "nll_loss"):
        assert metrics[tag] == pytest.approx(summary["final_metrics"][f"eval/{tag}"], rel=1e-5), tag
    untrained = eval_metrics_of_saved(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path, summary)
    assert untrained["nll_loss"] > metrics["nll_loss"] * 1.05, "the adapter must have learned something"


def test_full_model_reloads_and_scores_the_same(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    summary = run(
        tmp_path,
        "max_steps=10",
        "eval_steps=0",
        "eval_at_start=false",
        "eval_max_samples=64",
        "save_steps=4",
        "keep_last=3",
    )
    # Every 4 steps and the last one (10).
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_10", "step_4", "step_8"]
    step_4 = load_file(tmp_path / "checkpoints" / "step_4" / "model.safetensors")
    final = load_file(tmp_path / "model.safetensors")
    assert not torch.equal(step_4["lm_head.weight"], final["lm_head.weight"]), "a checkpoint holds its step's weights"
    step_10 = load_file(tmp_path / "checkpoints" / "step_10" / "model.safetensors")
    assert all(torch.equal(step_10[k], final[k]) for k in final), "the last step's checkpoint holds the final weights"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    metrics = eval_metrics_of_saved(reloaded, tmp_path, summary)
    for tag in ("logps/chosen", "logps/rejected", "loss"):
        assert metrics[tag] == pytest.approx(summary["final_metrics"][f"eval/{tag}"], rel=1e-5), tag


def test_qlora_runs_two_optimizer_steps_on_cpu(tmp_path: Path, tiny_base: Path) -> None:
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary = run(
        tmp_path,
        f"model_name_or_path={tiny_base}",
        "random_init=false",
        "mode=qlora",
        "max_steps=2",
        "logging_steps=1",
        "eval_steps=0",
        "eval_at_start=false",
        "eval_max_samples=16",
        "optim=paged_adamw_8bit",
        "learning_rate=1e-2",
        "gradient_checkpointing=true",
    )
    assert summary["plan"]["mode"] == "qlora"
    assert summary["plan"]["trainable_params"] < summary["plan"]["total_params"] / 5
    losses = _scalars(tmp_path, "train/loss")
    assert [s for s, _ in losses] == [1, 2] and all(np.isfinite(v) for _, v in losses)
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b), "LoRA B starts at 0 and must have moved"
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path)
    assert reloaded is not None and not any(isinstance(m, bnb.nn.Linear4bit) for m in reloaded.modules())


def test_finished_run_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "run_summary.json").write_text("{}")
    reset_accelerate()
    cfg = load_config(TINY_CONFIG, [f"output_dir={tmp_path}", "overwrite=false"])
    with pytest.raises(ConfigError, match="already holds a finished run"):
        train_orpo.main(cfg)
    assert (tmp_path / "run_summary.json").read_text() == "{}"


def test_demo_assets_are_shipped() -> None:
    assert (ROOT / "data" / "sort_prefs" / "train.jsonl").is_file()
    assert (ROOT / "assets" / "tiny" / "config.json").is_file()


@pytest.mark.parametrize(
    "variant",
    [
        ("padding_free=true",),
        ("chunked_head=false",),
        ("group_by_length=false",),
        ("padding_free=true", "chunked_head=false", "nll_on_prompt=true"),
        ("torch_compile=true",),
    ],
    ids=["packed", "full_logits", "shuffled_order", "packed_full_logits_nll_on_prompt", "compiled_layers"],
)
def test_forward_paths_give_the_same_steps(tmp_path: Path, variant: tuple[str, ...]) -> None:
    """Packing, the chunked head, length grouping and compiled layers change how the work is done,
    never the result: the same losses and gradient norms step by step as the default (padded,
    chunked head, grouped, eager)."""
    common = ("max_steps=3", "logging_steps=1", "eval_split=null", "global_batch_size=16", "per_device_batch_size=4")
    nll = tuple(v for v in variant if v.startswith("nll_on_prompt"))
    assert run(tmp_path / "ref", *common, *nll)["plan"]["compiled_regions"] == 0
    compiled = run(tmp_path / "got", *common, *variant)["plan"]["compiled_regions"]
    # 2 decoder layers, the embedding, the final norm, the rotary embedding and the head
    assert compiled == (6 if "torch_compile=true" in variant else 0)
    for tag in ("train/loss", "train/nll_loss", "train/or_loss", "train/grad_norm", "train/logps/rejected"):
        got, want = _scalars(tmp_path / "got", tag), _scalars(tmp_path / "ref", tag)
        assert [s for s, _ in got] == [1, 2, 3]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=2e-5), tag
