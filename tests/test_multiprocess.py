"""Real multi-process runs on the CPU (gloo) under `accelerate launch`, with the shipped launch
configs: DDP, DeepSpeed ZeRO-2 and ZeRO-3, and two 'machines' on this one. Each must reproduce the
single-process run of the same global batch step by step, which only holds if the loss is
normalised over the global batch and the metrics are reduced over ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_orpo
from orpo.config import load_config
from tests.conftest import ROOT, TINY_CONFIG, reset_accelerate
from tests.test_train import _scalars, eval_metrics_of_saved

STEPS = 3
COMMON = (
    "random_init=false",
    f"max_steps={STEPS}",
    "logging_steps=1",
    "eval_steps=0",
    "eval_at_start=false",
    "eval_max_samples=30",
    "per_device_eval_batch_size=4",
    "global_batch_size=8",
    "per_device_batch_size=2",
    # adam_epsilon=1: Adam's update is lr * g / (|g| + 1), close to SGD, so the weights after a step
    # show the gradient itself. With eps=1e-8 the update is lr * sign(g), and the few elements whose
    # gradient is ~1e-9 flip with the order of a sum (seen: 4 of 49k elements off by 1e-5 under
    # ZeRO-3), which says nothing about the normalisation this test is for.
    "adam_epsilon=1.0",
    "learning_rate=0.05",
    "warmup_ratio=0.0",
    "lr_scheduler=constant",
)
PER_STEP_TAGS = (
    "train/loss",
    "train/nll_loss",
    "train/or_loss",
    "train/grad_norm",
    "train/rewards/accuracies",
    "train/logps/chosen",
    "train/logps/rejected",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_args(config: str, processes: int, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        f"accelerate_configs/{config}.yaml",
        "--num_processes",
        str(processes),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
    ]


def trainer_args(out: Path, base: Path, *overrides: str) -> list[str]:
    return [
        "train_orpo.py",
        "--config",
        str(TINY_CONFIG),
        f"output_dir={out}",
        f"model_name_or_path={base}",
        f"data_cache_dir={out.parent / 'cache'}",
        *COMMON,
        *overrides,
    ]


def run_launched(config: str, out: Path, base: Path, *overrides: str) -> dict:
    cmd = launch_args(config, 2, free_port()) + trainer_args(out, base, *overrides)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "x 2 processes" in proc.stdout, proc.stdout[-2000:]
    assert_every_rank_left(proc.stderr, 0)
    return json.loads((out / "run_summary.json").read_text())


def assert_every_rank_left(stderr: str, code: int) -> None:
    """Each rank's last line (orpo/teardown.py) is written, with the run's exit code: no rank died on the way out."""
    left = sorted(ln.split(":")[0] for ln in stderr.splitlines() if ln.startswith("rank ") and ": exit " in ln)
    assert left == ["rank 0", "rank 1"], stderr[-3000:]
    assert all(f": exit {code}" in ln for ln in stderr.splitlines() if ln.startswith("rank ") and ": exit " in ln)


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> tuple[Path, dict]:
    """The single-process run of the same global batch (8 pairs as 2 x 4 accumulation)."""
    out = tmp_path_factory.mktemp("single")
    reset_accelerate()
    cfg = load_config(
        TINY_CONFIG,
        [f"output_dir={out}", f"model_name_or_path={tiny_base}", f"data_cache_dir={out.parent / 'cache'}", *COMMON],
    )
    summary = train_orpo.main(cfg)
    reset_accelerate()
    return out, summary


def assert_same_steps(out: Path, ref_out: Path) -> None:
    for tag in PER_STEP_TAGS:
        got, want = _scalars(out, tag), _scalars(ref_out, tag)
        assert [s for s, _ in got] == list(range(1, STEPS + 1)), tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5, abs=1e-7), tag


def assert_same_weights(out: Path, ref_out: Path, name: str = "model.safetensors") -> None:
    got, want = load_file(out / name), load_file(ref_out / name)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def only_rank0_wrote(out: Path) -> None:
    top_level_events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(top_level_events) == 1, top_level_events
    assert (out / "run_summary.json").is_file()


@pytest.mark.parametrize("config", ["ddp", "zero2", "zero3"])
def test_two_processes_match_one(config: str, tmp_path: Path, tiny_base: Path, reference: tuple[Path, dict]) -> None:
    ref_out, ref = reference
    out = tmp_path / config
    # Chunks of 16 positions: each parameter of the head serves many chunks in one backward.
    summary = run_launched(config, out, tiny_base, "save_steps=2", "head_chunk_size=16")
    assert summary["plan"]["processes"] == 2 and summary["plan"]["accumulation"] == 2
    calls_the_module = "calling the ZeRO-3-partitioned head chunk by chunk" in summary["plan"]["head"]
    assert calls_the_module == (config == "zero3"), summary["plan"]["head"]
    assert_same_steps(out, ref_out)
    assert_same_weights(out, ref_out)
    for tag in ("eval/loss", "eval/logps/chosen", "eval/rewards/accuracies"):
        assert summary["final_metrics"][tag] == pytest.approx(ref["final_metrics"][tag], rel=1e-5), tag
    only_rank0_wrote(out)
    checkpoint = out / "checkpoints" / "step_2"
    if config.startswith("zero"):  # each rank's shard of the optimizer state
        shards = sorted(p.name for p in checkpoint.rglob("*optim_states.pt"))
        assert len(shards) == 2, shards
    else:
        assert (checkpoint / "optimizer.bin").is_file()


def test_zero3_saved_model_reloads_on_one_process(tmp_path: Path, tiny_base: Path) -> None:
    """ZeRO-3 shards every parameter; the final save must gather them into one complete file that
    plain transformers loads and that scores the eval subset exactly as the trained model did. An
    eval subset that does not split evenly over the ranks must not hang the collective forwards."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "z3"
    # 9 eval pairs in batches of 4: rank 0 gets 5 (2 forwards), rank 1 gets 4 (1 forward + 1 discarded).
    summary = run_launched("zero3", out, tiny_base, "eval_max_samples=9")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert sum(p.numel() for p in reloaded.parameters()) == summary["plan"]["total_params"]
    metrics = eval_metrics_of_saved(reloaded, out, summary)
    for tag in ("logps/chosen", "logps/rejected", "loss"):
        assert metrics[tag] == pytest.approx(summary["final_metrics"][f"eval/{tag}"], rel=1e-5), tag


def test_zero3_lora_adapter_is_complete(tmp_path: Path, tiny_base: Path) -> None:
    """ZeRO-3 LoRA: the chunked head reads the frozen, partitioned head's weight gathered, and gives
    the steps of full logits; the adapter is complete and reloads on one process with the same eval
    scores."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "z3_lora"
    lora = ("mode=lora", "learning_rate=1e-2", "lora_target_modules=[q_proj, v_proj]")
    summary = run_launched("zero3", out, tiny_base, *lora, "head_chunk_size=16")  # many chunks per micro-batch
    assert "the frozen ZeRO-3 head gathered for it" in summary["plan"]["head"]
    full_logits = run_launched("zero3", tmp_path / "z3_lora_full_logits", tiny_base, *lora, "chunked_head=false")
    assert full_logits["plan"]["head"] == "full logits (chunked_head=false)"
    assert_same_steps(out, tmp_path / "z3_lora_full_logits")
    adapter = load_file(out / "adapter_model.safetensors")
    assert len(adapter) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(t.numel() > 0 for t in adapter.values())
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out)
    metrics = eval_metrics_of_saved(reloaded, out, summary)
    assert metrics["logps/chosen"] == pytest.approx(summary["final_metrics"]["eval/logps/chosen"], rel=1e-5)


def test_two_machines_train_together(tmp_path: Path, tiny_base: Path, reference: tuple[Path, dict]) -> None:
    """The multi-node template, as two `accelerate launch` runs (machine rank 0 and 1) on this host."""
    ref_out, _ = reference
    out, port = tmp_path / "nodes", free_port()
    procs = []
    for rank in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            "accelerate_configs/multinode_zero3.yaml",
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
        ]
        procs.append(
            subprocess.Popen(
                cmd + trainer_args(out, tiny_base),
                cwd=ROOT,
                env=_env(),
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert "x 2 processes" in outputs[0][0]
    assert_same_steps(out, ref_out)
    assert_same_weights(out, ref_out)


@pytest.mark.parametrize("config", ["ddp", "zero2"])
def test_qlora_two_processes_match_one(config: str, tmp_path: Path, tiny_base: Path) -> None:
    """QLoRA (NF4 base, LoRA adapters) under DDP and ZeRO-2 follows the single-process run. LoRA
    dropout is off: its random masks depend on which rank runs which micro-batch."""
    qlora = ("mode=qlora", "max_steps=2", "eval_split=null", "optim=adamw_torch", "lora_dropout=0.0")
    reset_accelerate()
    ref_out = tmp_path / "single"
    train_orpo.main(
        load_config(
            TINY_CONFIG,
            [
                f"output_dir={ref_out}",
                f"model_name_or_path={tiny_base}",
                f"data_cache_dir={tmp_path / 'cache'}",
                *COMMON,
                *qlora,
            ],
        )
    )
    reset_accelerate()
    out = tmp_path / config
    summary = run_launched(config, out, tiny_base, *qlora)
    assert summary["plan"]["mode"] == "qlora"
    for tag in ("train/loss", "train/grad_norm", "train/logps/chosen"):
        got, want = _scalars(out, tag), _scalars(ref_out, tag)
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5), tag
    assert_same_weights(out, ref_out, "adapter_model.safetensors")
