"""The one training config: a dataclass whose defaults are the published Mistral-7B QLoRA recipe.

A run's config is the defaults, then a YAML file (`--config configs/x.yaml`), then `key=value`
overrides, each layer checked: an unknown key names the nearest valid one, a wrong type names the
type expected. `plan()` derives what the user does not set (gradient accumulation, warmup steps).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orpo.data import DATA_FORMATS

MODES = ("full", "lora", "qlora")
SCHEDULERS = ("linear", "cosine", "constant", "cosine_with_min_lr", "warmup_stable_decay")
OPTIMIZERS = ("adamw_torch", "paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flash_attention_2", "flex_attention", "eager")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")


class ConfigError(ValueError):
    """A config that cannot run; the message says what was found and what is expected."""


@dataclass
class TrainConfig:
    # ---- model -------------------------------------------------------------------------------
    model_name_or_path: str = "mistralai/Mistral-7B-v0.1"
    """Hub name or local directory of the base model."""
    tokenizer_name_or_path: str | None = None
    """Hub name or local directory of the tokenizer; defaults to `model_name_or_path`."""
    random_init: bool = False
    """Build the model from `model_name_or_path`'s config.json with random (seeded) weights instead
    of loading its weights: for the offline demo, tests and benchmarks."""
    mode: str = "qlora"
    """`full` fine-tuning, `lora` adapters on a frozen base, or `qlora` (LoRA on an NF4 4-bit base)."""
    dtype: str = "auto"
    """Dtype of the base weights. `auto`: float32 for `full` (mixed precision autocasts) and on the
    CPU; bfloat16 on GPUs that have it, else float16, for `lora`/`qlora` (QLoRA's compute dtype)."""
    mixed_precision: str = "auto"
    """Autocast: `auto` is what the hardware computes natively: bf16 on GPUs of compute capability >= 8,
    fp16 (with a GradScaler) on older GPUs, bf16 on CPUs with AMX or AVX512-BF16, else `no` (float32).
    The plan line `precision` says which and why. Or `no`, `bf16`, `fp16`."""
    attn_implementation: str = "auto"
    """`auto` picks flash_attention_2 when flash-attn loads (transformers' check plus its CUDA extension)
    and the GPU supports it, else sdpa (the plan says why). Or `sdpa`, `flash_attention_2`,
    `flex_attention` (torch's FlexAttention), `eager`."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (non-reentrant autograd)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that get LoRA adapters."""
    padding_free: str | bool = "auto"
    """Pack each micro-batch's sequences into one row with restarting position ids, so no pad token
    is computed. `auto`: on with flash_attention_2 (varlen attention), off otherwise (SDPA then builds
    a [L, L] mask over the packed row and does more work than padding does)."""
    prefix_sharing: str | bool = "auto"
    """Run each pair as one sequence [prompt, chosen, rejected] (exactly: the longest common token
    prefix of the two sequences), so the prompt's forward and backward run once: the rejected tokens
    take the positions they have after the prompt and a 4D attention mask keeps them from seeing the
    chosen ones. Same losses and gradients. Needs sdpa or eager attention (`true` with
    flash_attention_2 or flex_attention is an error); `auto`: on where it was measured faster (the
    plan says which). Works padded and with `padding_free`."""
    chunked_head: bool = True
    """Compute response log-probs chunk by chunk from the last hidden states and the LM head, only
    at the positions the loss scores, never building [tokens, vocab] logits. A LoRA head or a ZeRO-3
    partitioned one is called chunk by chunk; models that post-process their logits (softcapping)
    fall back to full logits, with a note in the plan."""
    head_chunk_size: int | None = None
    """Positions per chunk of the chunked head; None: 512, or fewer where their float32 logits would
    pass 256 MiB. Smaller saves memory on big vocabularies, at some speed."""
    group_by_length: bool = True
    """Order the pairs of each global batch by length so micro-batches hold similar lengths (less
    padding). The step's pairs, and so its gradient, are the same as without it."""
    torch_compile: bool = False
    """torch.compile the model by regions (accelerate's regional compilation: the decoder layers
    share one compiled graph; the embedding, final norm and head are compiled apart), inductor,
    dynamic shapes. Costs compile time at the start, changes float rounding slightly; sample
    generation stays eager. Off by default: on the CPU it was measured slower (bench/RESULTS.md)."""
    chat_template: str | None = None
    """Jinja chat template to use; None keeps the tokenizer's, and a tokenizer without one gets
    the Zephyr template (`<|user|>` / `<|assistant|>` turns ended by EOS), as the recipe used."""

    # ---- data --------------------------------------------------------------------------------
    dataset: str = "HuggingFaceH4/ultrafeedback_binarized"
    """Hub name, or a local .json / .jsonl / .parquet file or a directory holding `<split>.<ext>`."""
    train_split: str = "train_prefs"
    """Split used for training."""
    eval_split: str | None = "test_prefs"
    """Split used for evaluation; None disables evaluation."""
    max_length: int = 1024
    """Budget of prompt + longest response, in tokens."""
    max_prompt_length: int = 512
    """Prompts longer than this keep their last `max_prompt_length` tokens (BOS kept)."""
    data_format: str = "auto"
    """Format of the rows: `auto` detects it per row; `conversational` (chosen/rejected message
    lists, as UltraFeedback-binarized or Capybara), `plain` (prompt or question, chosen, rejected
    strings, optional system, as orca_dpo_pairs) or `hh` (Anthropic HH transcripts) forces one; rows
    in another shape are skipped as format_mismatch."""
    column_map: dict[str, str] | None = None
    """Renames the data's columns to the names the trainer reads (prompt, chosen, rejected, system),
    e.g. {response_j: chosen, response_k: rejected}; applied before the format is detected."""
    data_num_proc: int = 0
    """Processes that tokenise; 0 picks one per core for large data sets, 1 for small ones."""
    data_cache_dir: str | None = None
    """Where tokenised data sets are cached; None uses ~/.cache/orpo."""

    # ---- optimisation ------------------------------------------------------------------------
    max_steps: int = 2000
    """Optimizer steps."""
    global_batch_size: int = 64
    """Pairs per optimizer step, over all micro-batches and processes."""
    per_device_batch_size: int = 2
    """Pairs per micro-batch on each process (each pair is two sequences in the forward)."""
    learning_rate: float = 8e-6
    """Peak learning rate."""
    lr_scheduler: str = "linear"
    """Decay after warmup: `linear` (to 0), `cosine` (to 0), `constant`, `cosine_with_min_lr` (cosine to
    `min_lr_ratio` x the peak) or `warmup_stable_decay` (constant, then a cosine to `min_lr_ratio` x the
    peak over the last `decay_ratio` of the steps). After warmup, each is transformers' schedule of the
    same name (tests/test_config.py compares them)."""
    warmup_ratio: float = 0.1
    """Share of `max_steps` spent warming the learning rate up linearly from 0."""
    min_lr_ratio: float = 0.0
    """cosine_with_min_lr and warmup_stable_decay: the learning rate they decay to, as a share of the peak."""
    decay_ratio: float = 0.1
    """warmup_stable_decay: share of `max_steps` spent decaying, at the end (the rest after warmup is stable)."""
    optim: str = "paged_adamw_8bit"
    """`adamw_torch`, or bitsandbytes' `paged_adamw_8bit`, `adamw_8bit`, `paged_adamw_32bit`."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    orpo_lambda: float = 0.1
    """Weight of the odds-ratio term (TRL's `beta`)."""
    nll_on_prompt: bool = False
    """Add the chosen sequence's prompt tokens to L_SFT (TRL's and the paper's code default). Off:
    L_SFT covers the chosen response only."""
    seed: int = 42
    """Seeds the weights of a random init, LoRA init, data order and dropout."""

    # ---- evaluation, logging, saving ---------------------------------------------------------
    output_dir: str = "runs/mistral7b-orpo-qlora"
    """Where TensorBoard logs, checkpoints, the final model and run_summary.json go."""
    overwrite: bool = False
    """Allow writing into an output_dir that already holds a finished run."""
    eval_steps: int = 250
    """Evaluate every this many optimizer steps (and at the end); 0 evaluates at the end only."""
    eval_max_samples: int = 256
    """Evaluate on at most this many pairs of the eval split (a fixed, seeded subset)."""
    eval_at_start: bool = False
    """Also evaluate before the first step, to see where training starts from."""
    per_device_eval_batch_size: int = 0
    """Pairs per eval micro-batch; 0 means per_device_batch_size."""
    num_sample_prompts: int = 4
    """Eval prompts (a fixed, seeded set) answered greedily at every evaluation with the current
    weights and logged to TensorBoard as text (`samples/<i>`); 0 disables."""
    sample_max_new_tokens: int = 128
    """Bound on the length of each sample answer."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Trackers: `tensorboard` (always on: the report and samples read it) and optionally `wandb`,
    imported only when listed."""
    logging_steps: int = 10
    """Log training metrics averaged over this many optimizer steps."""
    save_steps: int = 500
    """Save a resumable checkpoint every this many optimizer steps; 0 disables."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are pruned only after a new one is sealed (at least 2,
    so that a crash while pruning still leaves one intact)."""
    resume_from: str | None = None
    """`latest` (the newest checkpoint under output_dir whose manifest verifies) or a checkpoint
    directory; continues exactly: same data order, learning rate, RNG."""
    max_skipped_steps: int = 10
    """Stop (after checkpointing the last good state) when this many optimizer steps in a row had a
    non-finite loss or gradient norm."""
    max_skipped_fraction: float = 0.5
    """Stop before training when more than this share of a split's rows is skipped as unusable."""
    record_data_order: bool = False
    """Write output_dir/data_order.jsonl: the source row ids of every step's global batch."""
    allow_cpu: bool = False
    """Train even where CUDA is not usable (a CPU-only torch, a driver too old for torch's CUDA, no
    GPU visible). Off: such a run is refused before anything is downloaded or loaded, with what was
    found and how to fix it. The demo and tests (configs/tiny.yaml, a 0.5M-parameter model) set it."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # .inf and .nan are YAML floats; every comparison below passes NaN
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}.")
        for name in ("output_dir", "dataset", "model_name_or_path", "train_split"):
            if not getattr(self, name).strip():  # "" is Path("."): the current directory
                raise ConfigError(f"{name} is empty; give it a value (e.g. {name}={getattr(TrainConfig, name)}).")
        if self.random_init and self.mode == "qlora":
            raise ConfigError(
                "random_init=true cannot be combined with mode=qlora: QLoRA quantises the weights as they load "
                "from disk, and random_init builds the model in memory. Use mode=lora or mode=full, or save a "
                "random model (AutoModelForCausalLM.from_config(...).save_pretrained(dir)) and set "
                "model_name_or_path=dir random_init=false."
            )
        for name, choices in (
            ("mode", MODES),
            ("lr_scheduler", SCHEDULERS),
            ("optim", OPTIMIZERS),
            ("attn_implementation", ATTN_IMPLEMENTATIONS),
            ("dtype", DTYPES),
            ("mixed_precision", MIXED_PRECISIONS),
            ("data_format", DATA_FORMATS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}.")
        if self.padding_free not in ("auto", True, False):
            raise ConfigError(f"padding_free must be auto, true or false, got {self.padding_free!r}.")
        if self.prefix_sharing not in ("auto", True, False):
            raise ConfigError(f"prefix_sharing must be auto, true or false, got {self.prefix_sharing!r}.")
        if self.prefix_sharing is True and self.attn_implementation in ("flash_attention_2", "flex_attention"):
            raise ConfigError(
                f"prefix_sharing=true needs an attention implementation that takes a 4D attention mask (sdpa, "
                f"eager); attn_implementation={self.attn_implementation} cannot keep the rejected tokens from "
                "attending to the chosen ones. Set attn_implementation=sdpa, or prefix_sharing=auto or false."
            )
        positive = (
            "max_steps",
            "global_batch_size",
            "per_device_batch_size",
            "max_length",
            "max_prompt_length",
            "logging_steps",
            "eval_max_samples",
            "lora_r",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}.")
        for name in (
            "eval_steps",
            "save_steps",
            "data_num_proc",
            "per_device_eval_batch_size",
            "num_sample_prompts",
            "sample_max_new_tokens",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                f"({self.max_length}) so that every response keeps at least one token."
            )
        if Path(self.dataset).is_file() and self.eval_split and not Path(self.eval_split).is_file():
            raise ConfigError(
                f"dataset={self.dataset!r} is a single file, the training data, so eval_split={self.eval_split!r} "
                "must be the path of another file, or null; or put <split>.jsonl files in a directory."
            )
        if "tensorboard" not in self.report_to or not set(self.report_to) <= {"tensorboard", "wandb"}:
            raise ConfigError(f"report_to must list tensorboard, optionally with wandb; got {self.report_to}.")
        if self.keep_last < 2:
            raise ConfigError(
                f"keep_last must be at least 2 (a crash while pruning must leave one), got {self.keep_last}."
            )
        if self.head_chunk_size is not None and self.head_chunk_size < 1:
            raise ConfigError(f"head_chunk_size must be >= 1 (or null for the default), got {self.head_chunk_size}.")
        if self.max_skipped_steps < 1 or not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ConfigError("max_skipped_steps must be >= 1 and max_skipped_fraction in [0, 1].")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if not 0.0 <= self.min_lr_ratio < 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1), a share of learning_rate, got {self.min_lr_ratio}.")
        if not 0.0 < self.decay_ratio <= 1.0 - self.warmup_ratio:
            raise ConfigError(
                f"decay_ratio must be in (0, 1 - warmup_ratio] = (0, {1.0 - self.warmup_ratio:g}], a share of "
                f"max_steps after the warmup, got {self.decay_ratio}."
            )
        if self.learning_rate <= 0 or self.orpo_lambda < 0 or self.max_grad_norm < 0:
            raise ConfigError("learning_rate must be > 0, orpo_lambda and max_grad_norm >= 0.")
        if self.global_batch_size % self.per_device_batch_size:
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} is not a multiple of "
                f"per_device_batch_size={self.per_device_batch_size}; "
                f"{_nearby_multiples(self.global_batch_size, self.per_device_batch_size)}."
            )

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer_name_or_path or self.model_name_or_path

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size or self.per_device_batch_size


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is split: micro_batch x accumulation x processes = global."""

    micro_batch: int
    accumulation: int
    processes: int
    global_batch: int
    warmup_steps: int

    def describe(self) -> str:
        return (
            f"{self.micro_batch} pairs/micro-batch x {self.accumulation} accumulation x "
            f"{self.processes} processes = {self.global_batch} pairs/step"
        )


def plan_batches(cfg: TrainConfig, processes: int) -> BatchPlan:
    """Derive gradient accumulation from the global batch; an uneven split is an error."""
    per_step = cfg.per_device_batch_size * processes
    if cfg.global_batch_size % per_step:
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} does not split over {processes} processes x "
            f"per_device_batch_size={cfg.per_device_batch_size} (= {per_step} pairs per micro-step); "
            f"{_nearby_multiples(cfg.global_batch_size, per_step)}, or change per_device_batch_size."
        )
    return BatchPlan(
        micro_batch=cfg.per_device_batch_size,
        accumulation=cfg.global_batch_size // per_step,
        processes=processes,
        global_batch=cfg.global_batch_size,
        warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
    )


def _nearby_multiples(value: int, step: int) -> str:
    below = value // step * step
    choices = [v for v in (below, below + step) if v > 0]
    return "global_batch_size=" + " or ".join(str(v) for v in choices) + " would divide"


# ---- loading -------------------------------------------------------------------------------------


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _unknown_key_error(key: str, where: str) -> ConfigError:
    names = list(_fields())
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(names)}."
    return ConfigError(f"Unknown config key {key!r} in {where}.{hint}")


def _check(key: str, value: Any, where: str) -> Any:
    """Check one key and its value against the field's annotation, converting where lossless."""
    if key not in _fields():
        raise _unknown_key_error(key, where)
    if key == "mixed_precision" and value is False:  # YAML 1.1 reads an unquoted `no` as False
        return "no"
    hint = typing.get_type_hints(TrainConfig)[key]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for t in allowed:
        if t is type(None) and value is None:
            return value
        origin = typing.get_origin(t) or t
        if origin is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            try:  # YAML 1.1 reads 8e-6 (no dot) as a string
                return float(value)
            except (TypeError, ValueError):
                pass
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        if origin is dict and isinstance(value, dict) and all(isinstance(v, str) for v in (*value, *value.values())):
            return value
        if origin in (str, bool) and type(value) is origin:
            return value
    expected = " or ".join("None" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{key} in {where} must be {expected}, got {value!r} ({type(value).__name__}).")


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as YAML (`lr=1e-4`, `eval_split=null`, `x=[a,b]`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"Override {text!r} is not of the form key=value.")
    try:
        return key.strip(), yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"Override {text!r}: its value is not valid YAML ({_yaml_problem(err)}).") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's problem and where, with lines and columns counted from 1."""

    def where(mark: Any) -> str:
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

    problem = getattr(err, "problem", None)
    if problem is None:
        return str(err)
    context = getattr(err, "context", None)
    started = f"{context}{where(getattr(err, 'context_mark', None))}: " if context else ""
    return f"{started}{problem}{where(getattr(err, 'problem_mark', None))}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then `key=value` overrides; every key and type checked."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {str(path)!r} does not exist.")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(err)}.") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, found {type(loaded).__name__}.")
        values.update({key: _check(key, value, str(path)) for key, value in loaded.items()})
    for text in overrides or []:
        key, value = parse_override(text)
        values[key] = _check(key, value, "the command line")
    return TrainConfig(**values)


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
