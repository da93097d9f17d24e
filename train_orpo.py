"""ORPO training (Hong et al. 2024): one loss for SFT and preference alignment, no reference model.

    # the offline demo: a tiny model on the shipped sorting task, on the CPU (or `make demo`)
    python train_orpo.py --config configs/tiny.yaml

    # the published recipe on one GPU: Mistral-7B, UltraFeedback, QLoRA, 2,000 steps x 64 pairs
    accelerate launch train_orpo.py

    # any recipe, with overrides
    accelerate launch train_orpo.py --config configs/mistral7b_qlora.yaml learning_rate=5e-6 max_steps=500

The loop reads top to bottom: config and plan, data (checked before any model is loaded), model,
then optimizer steps of `accumulation` micro-batches each, with evaluation, logging to TensorBoard
under `output_dir/tensorboard`, and the final save. The loss is normalised over the global batch
(see orpo/loss.py), so a step's gradient does not depend on how the batch is split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from orpo.chat import log_samples, sample_prompts
from orpo.checkpoint import (
    CheckpointError,
    Progress,
    base_config_fingerprint,
    base_weights_sha256,
    check_base,
    check_layout,
    check_max_steps,
    checkpoint_sizes,
    checkpoints_dir,
    clear_staging,
    deepspeed_state_kwargs,
    expected_checkpoint_bytes,
    finalize,
    find_resume_checkpoint,
    install_model_hooks,
    megabytes,
    process_layout,
    read_trainer_state,
    restore_missing_rng,
    resume_key,
    staging_dir,
)
from orpo.collator import PackedPairCollator, PairCollator, SharedPairCollator, mean_computed_tokens
from orpo.config import BatchPlan, ConfigError, TrainConfig, load_config, plan_batches, to_dict
from orpo.data import DataError, PreferenceSplit, describe_skipped, load_split, nll_token_count
from orpo.distributed import (
    check_engine_agrees,
    compile_plugin,
    compiled_regions,
    configure_deepspeed,
    deepspeed_offloads_optimizer,
    init_processes,
)
from orpo.forward import check_prefix_sharing, evaluate, forward_orpo, resolve_head, to_device, use_prefix_sharing
from orpo.guards import (
    EXIT_CODES,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    RunStopped,
    StopRequest,
    check_output_dir,
    check_same_data,
    check_skipped_fraction,
    check_trackers,
    clear_for_overwrite,
    poison_if_non_finite,
    release_output_locks,
)
from orpo.metrics import FlopsModel, MetricSums, device_peak_tflops, mean_of, prefixed, window_memory
from orpo.model import (
    ModelInfo,
    load_model,
    load_tokenizer,
    malloc_in_use,
    mixed_precision_choice,
    require_cuda,
    resolve_attention,
    resolve_dtype,
    resolve_mixed_precision,
    save_trained,
)
from orpo.optim import build_optimizer, build_scheduler, lr_lambda
from orpo.report import write_report
from orpo.sampling import global_batches, pair_lengths
from orpo.teardown import leave


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe; defaults are the Mistral-7B QLoRA recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def load_data(cfg: TrainConfig, tokenizer: Any, split: str) -> PreferenceSplit:
    return load_split(
        cfg.dataset,
        split,
        tokenizer,
        cfg.max_length,
        cfg.max_prompt_length,
        cfg.data_num_proc,
        cfg.data_cache_dir,
        cfg.data_format,
        cfg.column_map,
    )


def plan_lines(
    cfg: TrainConfig,
    plan: BatchPlan,
    info: ModelInfo,
    mixed_precision: str,
    train_data: PreferenceSplit,
    eval_indices: np.ndarray | None,
    checkpoint_line: str = "",
    schedule_line: str = "",
    computed_per_pair: float | None = None,
) -> list[str]:
    """What rank 0 prints before the first step: what will run, and how big each step is.
    `computed_per_pair`: with prefix sharing, the tokens a pair puts through the model (its shared
    prefix once), printed beside the tokens the pairs hold."""
    epoch_steps = len(train_data) // plan.global_batch
    checkpointing = "on" if cfg.gradient_checkpointing else "off"
    if eval_indices is None:
        evaluation = "off"
    else:
        evaluation = f"every {cfg.eval_steps} steps and at the end" if cfg.eval_steps else "at the end"
        evaluation += ", and at the start" if cfg.eval_at_start else ""
        evaluation += f", on {len(eval_indices)} pairs of {cfg.eval_split!r}"
    return [
        f"model        {info.description}",
        f"mode         {cfg.mode}: {info.describe_params()}",
        f"precision    weights {info.weights or info.dtype}, mixed precision {mixed_precision} "
        f"({mixed_precision_choice(cfg)[1]}), "
        f"attention {info.attention}{info.attention_note}, gradient checkpointing {checkpointing}",
        f"host malloc  {malloc_line()}",
        f"batch        {plan.describe()}",
        f"steps        {cfg.max_steps} = {cfg.max_steps / epoch_steps:.2f} epochs of {len(train_data):,} pairs "
        f"({epoch_steps} steps each)",
        f"per step     {plan.global_batch} pairs, ~{plan.global_batch * train_data.mean_tokens_per_pair():,.0f} tokens"
        + (
            f" ({plan.global_batch * computed_per_pair:,.0f} computed with prefix sharing, "
            f"{1 - computed_per_pair / train_data.mean_tokens_per_pair():.0%} fewer)"
            if computed_per_pair is not None
            else ""
        ),
        f"optimizer    {cfg.optim}, lr {cfg.learning_rate:g}, {cfg.lr_scheduler} after {plan.warmup_steps} warmup "
        f"steps, clip {cfg.max_grad_norm:g}, lambda {cfg.orpo_lambda:g}",
        *([f"schedule     {schedule_line}"] if schedule_line else []),
        f"eval         {evaluation}",
        *([f"checkpoints  {checkpoint_line}"] if checkpoint_line else []),
        f"output       {cfg.output_dir}",
    ]


def malloc_line() -> str:
    """The plan's allocator line: which malloc runs, and the measured alternative when it is glibc's."""
    name = malloc_in_use()
    if name != "glibc":
        return f"{name} (preloaded)"
    return (
        "glibc (LD_PRELOAD=libtcmalloc_minimal.so.4 measured 0.71x its peak RSS at 1.24x its speed on the CPU; "
        "README: Speed and memory)"
    )


def data_order_until(path: Path, step: int) -> list[str]:
    """The lines of data_order.jsonl for steps up to `step` (what the checkpoint resumed from has
    trained). A line that does not parse is dropped: a kill while appending leaves the last one half
    written, and a record must not stop a resume."""
    kept = []
    for line in path.read_text().split("\n") if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    return kept


def checkpoint_plan(cfg: TrainConfig, model: torch.nn.Module, deepspeed: bool) -> str:
    """The plan's checkpoint line: how often, and how big each one will be."""
    if not cfg.save_steps:
        return "off (save_steps=0): a stopped run cannot be resumed, a finished one cannot be extended"
    full = cfg.mode == "full"
    count, model_bytes, optimizer_bytes = expected_checkpoint_bytes(model, cfg.optim, full, deepspeed)
    what = "all" if full else "trainable (adapter) only, no frozen base:"
    return (
        f"every {cfg.save_steps} steps and at the last, keep {cfg.keep_last}; "
        f"~{megabytes(model_bytes + optimizer_bytes)} each = model part {what} {count:,} params = "
        f"{megabytes(model_bytes)} + optimizer state "
        f"~{megabytes(optimizer_bytes)} ({cfg.optim}{', DeepSpeed fp32 master copy' if deepspeed else ''})"
    )


def schedule_plan(cfg: TrainConfig, saved_schedule: dict[str, int], step: int, warmup_steps: int) -> str:
    """How the learning-rate schedule continues when a resumed run has another max_steps than the one
    its checkpoint was trained for. The warmup steps stay those of the checkpoint (they have run);
    the decay is recomputed for the new max_steps and continues from the current step: the learning
    rate at step s is the one a run started with this max_steps and these warmup steps would use
    (HF Trainer also recomputes the schedule for the new max_steps, warmup included)."""
    if saved_schedule.get("max_steps", cfg.max_steps) == cfg.max_steps:
        return ""
    shape = (cfg.lr_scheduler, cfg.min_lr_ratio, cfg.decay_ratio)
    old = cfg.learning_rate * lr_lambda(step - 1, warmup_steps, saved_schedule["max_steps"], *shape)
    new = cfg.learning_rate * lr_lambda(step, warmup_steps, cfg.max_steps, *shape)
    return (
        f"resumed at step {step}: max_steps {saved_schedule['max_steps']} -> {cfg.max_steps}; {cfg.lr_scheduler} "
        f"recomputed to end at step {cfg.max_steps}, warmup kept at {warmup_steps} steps; lr {old:.3g} at step "
        f"{step} -> {new:.3g} at step {step + 1}"
    )


def flat_hparams(cfg: TrainConfig) -> dict[str, Any]:
    """TensorBoard's hparams take scalars and strings only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in to_dict(cfg).items()}


def stop_before_training(
    accelerator: Accelerator, cfg: TrainConfig, out: Path, stop: StopRequest, step: int, started: float, where: str
) -> RunStopped:
    """A stop signal came before the first optimizer step of this attempt: nothing has been trained
    since step `step` (a checkpoint of it exists, or it is 0), so no checkpoint is written and a
    requeued `resume_from=latest` continues from that checkpoint, or starts over. run_summary.json
    says why, for the requeue script."""
    if accelerator.is_main_process:
        summary = {
            "finished": False,
            "step": step,
            "config": to_dict(cfg),
            "stop_reason": "preempted",
            "exit_code": EXIT_PREEMPTED,
            "stopped_at": where,
            "wall_seconds": time.time() - started,
        }
        write_report(out, summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    since = f"since step {step}, its checkpoint is the state to resume" if step else "yet, so no checkpoint was written"
    return RunStopped(
        f"a stop signal (SIGTERM/SIGUSR1) reached {'this rank' if stop.signal else 'another rank'} before step "
        f"{step + 1} ({where}): nothing was trained {since}; resume_from=latest "
        + ("continues from it." if step else "starts over."),
        EXIT_PREEMPTED,
    )


# ---- the run -------------------------------------------------------------------------------------


def main(cfg: TrainConfig) -> dict[str, Any]:
    try:
        return train(cfg)
    finally:
        release_output_locks()  # a clean end, a stop or an error: this process no longer writes there


def train(cfg: TrainConfig) -> dict[str, Any]:
    started = time.time()
    # From the first second: a SIGTERM/SIGUSR1 while tokenising, loading or evaluating at the start
    # is recorded and acted on at the next safe point below (exit 75), never the default kill (143).
    stop = StopRequest()
    require_cuda(cfg)  # before anything is downloaded or loaded: no silent CPU training
    state, cpu_only = init_processes()
    plan = plan_batches(cfg, state.num_processes)
    out = check_output_dir(cfg)
    check_trackers(cfg)
    state.wait_for_everyone()
    accelerator = Accelerator(
        cpu=cpu_only,
        gradient_accumulation_steps=plan.accumulation,
        mixed_precision=resolve_mixed_precision(cfg),
        log_with=cfg.report_to,
        project_dir=str(out),
        dynamo_plugin=compile_plugin(cfg),
    )
    configure_deepspeed(accelerator, cfg, plan)
    say = accelerator.print
    set_seed(cfg.seed)

    # ---- data, checked before any model is loaded
    tokenizer = load_tokenizer(cfg)
    with accelerator.main_process_first():  # rank 0 tokenises and caches, the others read the cache
        train_data = load_data(cfg, tokenizer, cfg.train_split)
        eval_data = load_data(cfg, tokenizer, cfg.eval_split) if cfg.eval_split else None
    say(f"train data   {describe_skipped(train_data)}")
    check_skipped_fraction(train_data, cfg.train_split, cfg.max_skipped_fraction)
    if eval_data is not None:
        say(f"eval data    {describe_skipped(eval_data)}")
        check_skipped_fraction(eval_data, cfg.eval_split, cfg.max_skipped_fraction)
    lengths = pair_lengths(train_data) if cfg.group_by_length else None
    batches = global_batches(len(train_data), plan.global_batch, cfg.seed, lengths, accelerator.num_processes)
    eval_indices = None
    if eval_data is not None:
        order = np.random.default_rng(cfg.seed).permutation(len(eval_data))
        eval_indices = np.sort(order[: cfg.eval_max_samples])
    eval_collator = PairCollator(tokenizer.pad_token_id, cfg.nll_on_prompt)
    # The attention the model will be loaded with, to refuse prefix_sharing=true with one that takes no
    # 4D mask before any model is loaded.
    check_prefix_sharing(cfg, resolve_attention(cfg.attn_implementation, resolve_dtype(cfg))[0])
    if stop.agreed(accelerator):
        raise stop_before_training(accelerator, cfg, out, stop, 0, started, "after loading the data")

    # ---- the checkpoint to resume from, verified before any model is loaded
    progress_state = Progress()
    resume_path = None
    if cfg.resume_from:
        found: list[Any] = [None, None]  # rank 0 verifies (hashing once), then tells every rank
        if accelerator.is_main_process:
            try:
                found[0] = find_resume_checkpoint(out, cfg.resume_from)
            except CheckpointError as err:
                found[1] = str(err)
        resume_path, error = broadcast_object_list(found)
        if error:
            raise CheckpointError(error)
        if resume_path is None:
            say("resume       resume_from=latest: no checkpoint yet, starting from step 0")
    # What the checkpoint must agree with, checked before the model loads: the base an adapter was
    # trained on (its weights are checked once loaded), the process layout (DeepSpeed shards), the
    # steps already trained. per_device_batch_size and the process count without DeepSpeed may change.
    adapter = cfg.mode != "full"
    base = base_config_fingerprint(cfg.model_name_or_path) if adapter else None
    plugin = accelerator.state.deepspeed_plugin
    now_layout = process_layout(accelerator.num_processes, plugin.zero_stage if plugin is not None else None)
    saved: dict[str, Any] = {}
    if resume_path is not None:
        resume_path = Path(resume_path)
        saved = read_trainer_state(resume_path)
        check_same_data(saved.get("train_data"), train_data.source, resume_path)
        if adapter:
            check_base(saved.get("base"), base, resume_path)
        check_layout(saved.get("layout"), now_layout, resume_path)
        check_max_steps(saved["progress"]["step"], cfg.max_steps, resume_path)
        if saved["resume_key"] != resume_key(cfg):
            changed = {
                k: (v, saved["resume_key"].get(k))
                for k, v in resume_key(cfg).items()
                if saved["resume_key"].get(k) != v
            }
            raise ConfigError(
                f"Cannot resume {resume_path}: these settings changed since it was saved (now, then): {changed}."
            )

    if stop.agreed(accelerator):
        step = read_trainer_state(resume_path)["progress"]["step"] if resume_path is not None else 0
        raise stop_before_training(accelerator, cfg, out, stop, step, started, "after verifying the checkpoint")

    # ---- model, optimizer, schedule
    model, info = load_model(cfg, accelerator.device)
    if adapter:
        base["weights_sha256"] = base_weights_sha256(model)
        if resume_path is not None:
            check_base(saved.get("base"), base, resume_path)
    # A resumed run keeps the warmup its checkpoint was trained with (see schedule_plan).
    saved_schedule = saved.get("schedule", {})
    plan = dataclasses.replace(plan, warmup_steps=saved_schedule.get("warmup_steps", plan.warmup_steps))
    optimizer = build_optimizer(cfg, model, offload=deepspeed_offloads_optimizer(accelerator))
    scheduler = build_scheduler(cfg, optimizer, plan.warmup_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Checkpoints hold what trains (orpo/checkpoint.py: trained_state), under DeepSpeed too.
    install_model_hooks(accelerator, full=not adapter)
    engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
    save_kwargs, load_kwargs = deepspeed_state_kwargs(engine.engine, not adapter) if engine else ({}, {})
    head, head_note = resolve_head(cfg, model, accelerator.mixed_precision)
    packing = cfg.padding_free is True or (cfg.padding_free == "auto" and info.attention == "flash_attention_2")
    collator = PackedPairCollator(cfg.nll_on_prompt) if packing else eval_collator
    sharing, sharing_note = use_prefix_sharing(cfg, info.attention, packing, accelerator.device)
    if sharing:  # evaluation too (padded): the same metrics, the prompt computed once
        collator = SharedPairCollator(tokenizer.pad_token_id, cfg.nll_on_prompt, packed=packing)
        eval_collator = SharedPairCollator(tokenizer.pad_token_id, cfg.nll_on_prompt)
    accelerator.register_for_checkpointing(scheduler)
    flops = FlopsModel(info.total_params, full=cfg.mode == "full")
    peak_tflops = device_peak_tflops(accelerator.device)

    checkpoint_line = checkpoint_plan(cfg, accelerator.unwrap_model(model), plugin is not None)
    schedule_line = schedule_plan(cfg, saved_schedule, saved["progress"]["step"], plan.warmup_steps) if saved else ""
    say(
        "\n".join(
            plan_lines(
                cfg,
                plan,
                info,
                accelerator.mixed_precision,
                train_data,
                eval_indices,
                checkpoint_line,
                schedule_line,
                mean_computed_tokens(train_data) if sharing else None,
            )
        )
    )
    layout = "padding-free (packed rows)" if packing else "padded to each micro-batch's longest"
    compiled = compiled_regions(model)
    compile_note = f"; {compiled} regions compiled (torch.compile)" if compiled else ""
    say(
        f"forward      {layout}{', grouped by length' if cfg.group_by_length else ''}; prefix sharing {sharing_note}; "
        f"{head_note}{compile_note}"
    )
    plan_record = {
        **dataclasses.asdict(plan),
        "processes": accelerator.num_processes,
        "mode": cfg.mode,
        "trainable_params": info.trainable_params,
        "total_params": info.total_params,
        "attention": info.attention,
        "attention_note": info.attention_note,
        "head": head_note,
        "prefix_sharing": sharing_note,
        "compiled_regions": compiled,
        "dtype": str(info.dtype),
        "mixed_precision": accelerator.mixed_precision,
        "train_pairs": len(train_data),
        "eval_pairs": 0 if eval_indices is None else len(eval_indices),
    }
    if resume_path is not None:
        accelerator.load_state(str(resume_path), **load_kwargs)
        progress_state = Progress(**saved["progress"])
        # accelerate restores its micro-step counter, which decides when gradients synchronise; it
        # counted the checkpoint's micro-batches. Count this run's: another per_device_batch_size or
        # number of processes (same global batch) changes the micro-batches per step.
        accelerator.step = progress_state.step * plan.accumulation
        if restore_missing_rng(resume_path, accelerator.process_index):
            print(f"rank {accelerator.process_index}: no RNG state in {resume_path}: took rank 0's", file=sys.stderr)
        # The optimizer's restored learning rate is the checkpoint schedule's; set this run's (the
        # same unless max_steps changed, see schedule_plan).
        for group, base_lr, factor in zip(
            optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        for _ in range(progress_state.step):  # the data position: the same seeded batches, skipped
            next(batches)
        say(f"resumed      from {resume_path} at step {progress_state.step}")
    if stop.agreed(accelerator):
        raise stop_before_training(accelerator, cfg, out, stop, progress_state.step, started, "after loading the model")
    clear_for_overwrite(cfg, out)  # every input has been checked: the first write of this run follows
    accelerator.wait_for_everyone()
    # purge_step hides what an earlier attempt logged from this step on: after its last checkpoint,
    # or everything when this attempt starts from step 0 (a run killed before its first checkpoint).
    tb_kwargs = {"purge_step": progress_state.step + 1 if progress_state.step else 0}
    accelerator.init_trackers("tensorboard", config=flat_hparams(cfg), init_kwargs={"tensorboard": tb_kwargs})
    data_order = out / "data_order.jsonl"
    if cfg.record_data_order and accelerator.is_main_process:
        data_order.write_text("".join(ln + "\n" for ln in data_order_until(data_order, progress_state.step)))

    prompts = sample_prompts(cfg, eval_data if eval_data is not None else train_data)

    def run_eval(step: int) -> dict[str, float]:
        metrics = evaluate(
            model, accelerator, eval_data, eval_indices, eval_collator, cfg.eval_batch_size, cfg.orpo_lambda, head
        )
        accelerator.log(prefixed("eval", metrics), step=step)
        with torch.compiler.set_stance("force_eager"):  # a growing KV cache would recompile the layers
            log_samples(accelerator, model, tokenizer, prompts, cfg.sample_max_new_tokens, step)
        say(
            f"eval @ {step}: loss {metrics['loss']:.4f}, rewards/accuracies {metrics['rewards/accuracies']:.3f}, "
            f"margins {metrics['rewards/margins']:.4f}"
        )
        return metrics

    def summarize(finished: bool) -> dict[str, Any]:
        p = progress_state
        return {
            "finished": finished,
            "step": p.step,
            "config": to_dict(cfg),
            "plan": plan_record,
            "final_metrics": p.final,
            "skipped_rows": {"train": train_data.skipped, "eval": eval_data.skipped if eval_data is not None else {}},
            "skipped_steps": p.skipped_steps,
            "wall_seconds": p.wall_seconds_before + time.time() - started,
            "tokens_per_s": p.train_tokens / p.train_seconds if p.train_seconds else 0.0,
        }

    def save_checkpoint(stop_reason: str | None = None) -> Path:
        """Every rank writes its state into a staging dir; rank 0 seals and renames it (orpo/checkpoint.py).
        Returns the checkpoint's path (the same on every rank)."""
        if accelerator.is_main_process:
            clear_staging(out)
        accelerator.wait_for_everyone()
        saved_state = {
            "progress": dataclasses.asdict(progress_state),
            "resume_key": resume_key(cfg),
            "base": base,
            "layout": now_layout,
            "schedule": {"max_steps": cfg.max_steps, "warmup_steps": plan.warmup_steps},
        }
        saved_state["train_data"] = train_data.source  # the data's sha256, checked on resume
        saved_state["progress"]["wall_seconds_before"] = summarize(False)["wall_seconds"]
        accelerator.save_state(str(staging_dir(out, progress_state.step)), **save_kwargs)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            path = finalize(out, progress_state.step, saved_state, cfg.keep_last)
            size = checkpoint_sizes(path)
            say(
                f"checkpoint   {path.name}: {megabytes(size['total'])} written (model part {megabytes(size['model'])}, "
                f"optimizer {megabytes(size['optimizer'])}, other {megabytes(size['other'])})"
            )
            summary = summarize(finished=False)
            if stop_reason:  # `accelerate launch` turns every failing exit into 1: say why here too
                summary["stop_reason"] = stop_reason
                summary["exit_code"] = EXIT_CODES[stop_reason]
            write_report(out, summary)
        accelerator.wait_for_everyone()
        return checkpoints_dir(out) / f"step_{progress_state.step}"

    # ---- training
    p = progress_state
    if eval_indices is not None and cfg.eval_at_start and p.step == 0:
        p.final.update(prefixed("eval", run_eval(0)))
        p.first_eval_accuracy = p.final["eval/rewards/accuracies"]
    if stop.agreed(accelerator):
        raise stop_before_training(accelerator, cfg, out, stop, p.step, started, "after the evaluation at the start")
    model.train()
    scale = plan.accumulation * accelerator.num_processes  # undo accelerate's / accumulation and DDP's mean
    per_rank = plan.global_batch // accelerator.num_processes
    steps_per_epoch = len(train_data) // plan.global_batch
    progress = tqdm(
        initial=p.step,
        total=cfg.max_steps,
        disable=not accelerator.is_main_process,
        desc="train",
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )
    while p.step < cfg.max_steps:
        step = p.step + 1
        step_started = time.time()
        _, indices = next(batches)
        num_nll_tokens = nll_token_count(train_data, indices, cfg.nll_on_prompt)
        mine = indices[accelerator.process_index * per_rank : (accelerator.process_index + 1) * per_rank]
        sums = MetricSums(accelerator.device)
        for start in range(0, per_rank, plan.micro_batch):
            batch = to_device(
                collator([train_data[i] for i in mine[start : start + plan.micro_batch]]), accelerator.device
            )
            with accelerator.accumulate(model):  # autocast comes with accelerator.prepare(model)
                share = forward_orpo(model, batch, cfg.orpo_lambda, num_nll_tokens, plan.global_batch, sums, head)
                accelerator.backward(poison_if_non_finite(share.loss) * scale)
        assert accelerator.sync_gradients, "the last micro-batch of a step must synchronise gradients"
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        metrics = sums.reduce(accelerator, cfg.orpo_lambda)
        lr = scheduler.get_last_lr()[0]
        # The loss is reduced over ranks and the norm is of the synchronised gradient: every rank
        # takes the same decision. fp16's scaler must see an overflow to lower its scale (it skips
        # that update itself). Under DeepSpeed the engine has already skipped it (a non-finite loss
        # was backpropagated as NaN gradients) and optimizer.step/scheduler.step are no-ops.
        finite = math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)
        check_engine_agrees(accelerator, finite, step)
        if finite or accelerator.scaler is not None:
            optimizer.step()
        if finite:
            scheduler.step()
            p.skipped_in_a_row = 0
        else:
            p.skipped_steps += 1
            p.skipped_in_a_row += 1
            say(f"step {step}: non-finite loss {metrics['loss']} or grad norm {grad_norm}: update skipped")
        optimizer.zero_grad(set_to_none=True)
        metrics.update(lr=lr, grad_norm=grad_norm, epoch=step / steps_per_epoch, seconds=time.time() - step_started)
        p.window.append(metrics)
        p.step = step
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}", refresh=False)
        if cfg.record_data_order and accelerator.is_main_process:
            with open(data_order, "a") as f:
                f.write(json.dumps({"step": step, "rows": [int(train_data.row_index[i]) for i in indices]}) + "\n")

        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            logged = mean_of(p.window)
            seconds, tokens = sum(m["seconds"] for m in p.window), sum(m["tokens"] for m in p.window)
            p.train_seconds += seconds
            p.train_tokens += tokens
            logged.update(
                tokens_per_s=tokens / seconds,
                pairs_per_s=sum(m["pairs"] for m in p.window) / seconds,
                **window_memory(accelerator),  # peak since the last window, max over ranks
                skipped_steps=p.skipped_steps,
            )
            if peak_tflops:
                logged["mfu"] = (
                    logged["tokens_per_s"] * flops.per_token() / (peak_tflops * 1e12 * accelerator.num_processes)
                )
            for key in ("pairs", "tokens", "seconds"):
                logged.pop(key)
            accelerator.log(prefixed("train", logged), step=step)
            p.final.update(prefixed("train", logged))
            p.window = []
        if eval_indices is not None and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == cfg.max_steps):
            p.final.update(prefixed("eval", run_eval(step)))
        if p.skipped_in_a_row >= cfg.max_skipped_steps:
            path = save_checkpoint("non_finite")
            accelerator.end_training()
            raise RunStopped(
                f"{p.skipped_in_a_row} optimizer steps in a row had a non-finite loss or gradient (max_skipped_steps="
                f"{cfg.max_skipped_steps}); stopped at step {step}. The last good state is in {path}. Lower the "
                "learning rate, check the data, or use bf16 instead of fp16.",
                EXIT_NONFINITE,
            )
        stopping = stop.agreed(accelerator)
        # The last step is checkpointed too, so that resume_from=latest with a larger max_steps continues it.
        if stopping or (cfg.save_steps and (step % cfg.save_steps == 0 or step == cfg.max_steps)):
            path = save_checkpoint("preempted" if stopping else None)
        if stopping:
            accelerator.end_training()
            raise RunStopped(
                f"a stop signal (SIGTERM/SIGUSR1) reached {'this rank' if stop.signal else 'another rank'}: "
                f"stopped after step {step} and saved {path}; resume with resume_from=latest.",
                EXIT_PREEMPTED,
            )
    progress.close()

    # ---- the result
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    summary = summarize(finished=True)
    if accelerator.is_main_process:
        save_trained(accelerator.unwrap_model(model), tokenizer, out, state_dict)
        write_report(out, summary)
        say(
            f"saved {'adapter' if cfg.mode != 'full' else 'model'} and run_summary.json to {out} "
            f"({summary['wall_seconds']:.0f} s, {summary['tokens_per_s']:,.0f} tokens/s)"
        )
        if "eval/rewards/accuracies" in p.final:
            start = f"{p.first_eval_accuracy:.3f} before training -> " if p.first_eval_accuracy is not None else ""
            end = p.final["eval/rewards/accuracies"]
            say(f"held-out eval/rewards/accuracies: {start}{end:.3f} after {cfg.max_steps} steps")
        say(f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    # Leave together, then tear down in order: DeepSpeed's engine (free_memory destroys it and drops the
    # prepared model and optimizer), the trackers, the process group. What torch still holds after that
    # is handled where the process ends (orpo/teardown.py).
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    accelerator.end_training()
    return summary


def cli() -> None:
    """The command line: parse, train, and end the process with the run's exit code (orpo/teardown.py)."""
    started = time.time()
    try:
        config = parse_args()
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    code, together = 0, True  # together: every rank ended at the same point, so groups can be released
    try:
        main(config)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        code, together = 1, False
    except RunStopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        code = err.exit_code
    except KeyboardInterrupt:
        traceback.print_exc()
        code, together = 130, False
    except SystemExit as err:  # a library's sys.exit: its code, through the same exit
        if err.code is not None and not isinstance(err.code, int):
            print(err.code, file=sys.stderr)
        code, together = err.code if isinstance(err.code, int) else int(err.code is not None), False
    except BaseException:  # a bug: its traceback, then the same careful exit as every other end
        traceback.print_exc()
        code, together = 1, False
    leave(code, Path(config.output_dir), started, released=together)


if __name__ == "__main__":
    cli()
