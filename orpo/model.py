"""Loading the tokenizer and the model (full, LoRA, QLoRA), and saving what was trained."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from orpo.config import ConfigError, TrainConfig

T = TypeVar("T")

# The template the recipe's Zephyr-style chat models use, for tokenizers that ship none (base models).
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ConfigError):
    """A model or tokenizer that cannot be loaded (missing, gated, offline); the message says what was
    tried and what to do. A ConfigError, so the CLI prints it without a traceback."""


# ---- the device ----------------------------------------------------------------------------------

# The oldest Linux driver each CUDA major version of a torch build runs on (NVIDIA's CUDA toolkit
# release notes, "minor version compatibility"): torch 2.13 from PyPI is built for CUDA 13.0.
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")


@dataclass(frozen=True)
class CudaReport:
    """What this machine offers torch: read before anything is loaded."""

    torch_version: str
    torch_cuda: str | None  # None: a CPU-only build of torch
    available: bool  # torch.cuda.is_available()
    driver: str | None  # the NVIDIA kernel driver's version, None when no driver is loaded
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES, when set

    def problem(self) -> str:
        """Why CUDA is not usable, and how to fix it ("" when it is)."""
        if self.available:
            return ""
        driver = self.driver or f"not loaded (no {NVIDIA_DRIVER_FILE})"
        found = (
            f"torch {self.torch_version} (torch.version.cuda={self.torch_cuda}), "
            f"torch.cuda.is_available()=False, NVIDIA driver {driver}"
        )
        if self.visible_devices is not None:
            found += f", CUDA_VISIBLE_DEVICES={self.visible_devices!r}"
        if self.torch_cuda is None:
            fix = (
                "this torch is a CPU-only build: install a CUDA build that matches the driver, e.g. "
                "`pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130` (CUDA 13.0, "
                "driver >= 580; see https://pytorch.org/get-started/locally/ for builds for older drivers)"
            )
        elif self.driver is None:
            fix = (
                "no GPU is visible: run on a machine with an NVIDIA GPU and its driver loaded (`nvidia-smi` "
                "must list it; in a container, pass the GPUs through, e.g. `docker run --gpus all`)"
            )
        else:
            major = int(self.torch_cuda.split(".")[0])
            need = MIN_DRIVER.get(major)
            have = int(self.driver.split(".")[0])
            if need is not None and have < need:
                fix = (
                    f"this torch is built for CUDA {self.torch_cuda}, which needs driver >= {need}, but the driver "
                    f"is {self.driver}: upgrade the driver, or install a torch built for an older CUDA "
                    "(https://pytorch.org/get-started/locally/)"
                )
            elif self.visible_devices is not None and not self.visible_devices.strip(", "):
                fix = "CUDA_VISIBLE_DEVICES hides every GPU: unset it or name the GPUs to use"
            else:
                fix = "the driver is loaded but no GPU answers: check `nvidia-smi` and CUDA_VISIBLE_DEVICES"
        return f"CUDA is not usable here: {found}. To fix: {fix}."


def nvidia_driver_version(path: Path = NVIDIA_DRIVER_FILE) -> str | None:
    """The loaded NVIDIA kernel driver's version ("580.95.05"), read from /proc; None without one."""
    try:
        text = path.read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+\.\d+(?:\.\d+)?)", text)
    return found.group(1) if found else None


def cuda_report() -> CudaReport:
    return CudaReport(
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        available=torch.cuda.is_available(),
        driver=nvidia_driver_version(),
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )


def require_cuda(cfg: TrainConfig, report: CudaReport | None = None) -> None:
    """Refuse to train on the CPU unless the config says `allow_cpu: true`.

    Without a usable GPU (a CPU-only torch, a driver older than torch's CUDA needs, no GPU visible)
    the recipe would otherwise load Mistral-7B on the CPU in float32 and "train" for days, and a
    multi-process launch would fall back to gloo. Called before anything is downloaded or loaded.
    The demo and the tests (configs/tiny.yaml) set allow_cpu: true: a 0.5M-parameter model.
    """
    if cfg.allow_cpu:
        return
    report = report or cuda_report()
    if not report.available:
        raise ConfigError(
            f"{report.problem()} Or, to train {cfg.model_name_or_path!r} on the CPU anyway (slow: for a 7B model, "
            "days, and float32 weights), set allow_cpu=true."
        )


# ---- loading -------------------------------------------------------------------------------------


_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def _hub_call(what: str, name: str, load: Callable[[], T]) -> T:
    """`load()`, with a missing, gated or unreachable model or tokenizer turned into a ModelLoadError
    that says what was tried and what to do (transformers raises a bare OSError)."""
    from huggingface_hub import constants

    local = Path(name).expanduser()
    # transformers raises ValueError, not OSError, for a local directory without tokenizer files
    unreadable: tuple[type[Exception], ...] = (OSError,)
    if local.is_dir() and not any((local / f).is_file() for f in _MODEL_FILES):
        unreadable = (OSError, ValueError)
    try:
        return load()
    except unreadable as err:
        if local.is_dir():
            tried = f"the local directory {str(local)!r}"
            fix = "check that it holds the files (config.json, tokenizer files, weights) save_pretrained writes"
        else:
            offline = constants.is_offline_mode()
            tried = f"{name!r}: no local directory of that name, so a hub repo, " + (
                f"with HF_HUB_OFFLINE=1 (offline: only the local cache {constants.HF_HUB_CACHE} was searched)"
                if offline
                else f"from {constants.ENDPOINT} (cache {constants.HF_HUB_CACHE})"
            )
            fix = (
                ("download it once with hub access (unset HF_HUB_OFFLINE, or `hf download " + name + "`), ")
                if offline
                else "check the name and your network, "
            ) + (
                "log in (`hf auth login`) and accept the licence on the model's hub page if it is gated, "
                "or point model_name_or_path / tokenizer_name_or_path at a local directory"
            )
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"Could not load the {what} from {tried}: {first} To fix: {fix}.") from err


def load_tokenizer(cfg: TrainConfig) -> Any:
    """The tokenizer, with a chat template and a pad token.

    Pad: the tokenizer's own, else its unk token, else EOS. Padding is masked by position
    (attention mask and labels), never by token id, so an EOS used as pad still counts in the loss.
    """
    from transformers import AutoTokenizer

    tok = _hub_call("tokenizer", cfg.tokenizer_path, lambda: AutoTokenizer.from_pretrained(cfg.tokenizer_path))
    if cfg.chat_template is not None:
        tok.chat_template = cfg.chat_template
    elif not tok.chat_template:
        tok.chat_template = ZEPHYR_TEMPLATE
    if tok.eos_token_id is None:
        raise ValueError(f"Tokenizer {cfg.tokenizer_path!r} has no EOS token; responses must end with one.")
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token_id is not None else tok.eos_token
    return tok


def native_bf16() -> bool:
    """Whether the GPU computes in bfloat16 natively: compute capability >= 8.0 (Ampere and later), or
    ROCm. Not `torch.cuda.is_bf16_supported()`, which counts emulation by default: a T4 (sm75) says
    True there, and bf16 on it is slow (no bf16 tensor cores; SDPA falls back to its math kernel)."""
    if not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    return tuple(torch.cuda.get_device_capability()) >= (8, 0)


def auto_compute_dtype(device_type: str) -> torch.dtype:
    """What `auto` means for a compute dtype, for the trainer and the chat CLI alike: float32 off
    CUDA, bfloat16 on GPUs that have it natively (`native_bf16`), else float16 (with a GradScaler)."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if native_bf16() else torch.float16


def resolve_dtype(cfg: TrainConfig) -> torch.dtype:
    """The base weights' dtype: float32 for `full` (autocast does the rest), else the compute dtype."""
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    return torch.float32 if cfg.mode == "full" else auto_compute_dtype("cuda")


def cpu_native_bf16() -> str | None:
    """The CPU's native bf16 instructions as torch's CPU backend reports them (AMX, AVX512-BF16), or None.

    oneDNN runs bf16 matmuls on these much faster than float32 (a SmolLM2-135M LoRA step: 309-333
    tokens/s under bf16 autocast against 175 in float32, issue 20); without them bf16 is emulated."""
    checks = {"AMX": torch.cpu._is_amx_tile_supported, "AVX512-BF16": torch.cpu._is_avx512_bf16_supported}
    found = [name for name, has in checks.items() if has()]
    return " and ".join(found) or None


PRELOADED_MALLOCS = ("tcmalloc", "jemalloc", "mimalloc")


def malloc_in_use(maps: str | None = None) -> str:
    """The malloc this process runs: a preloaded one (LD_PRELOAD) found among its mapped libraries
    (`maps`: the text of /proc/self/maps), else "glibc".

    On the CPU the allocator decides much of the peak RSS and even the speed: glibc keeps freed
    memory it cannot reuse, and first touches of new memory are slow. tcmalloc (Debian's
    libtcmalloc-minimal4, through LD_PRELOAD) measured 0.71x glibc's peak RSS at 1.24x its speed on a
    SmolLM2-135M LoRA step with bf16, and removed the first step's extra time in float32 (README,
    "Speed and memory"; bench/RESULTS.md). It stays optional: nothing here loads it."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return "glibc"
    return next((name for name in PRELOADED_MALLOCS if f"lib{name}" in maps), "glibc")


def mixed_precision_choice(cfg: TrainConfig) -> tuple[str, str]:
    """accelerate's mixed_precision and why: what the hardware computes natively when `auto`.

    bf16 on GPUs of compute capability >= 8 (`native_bf16`), fp16 with a GradScaler on older GPUs,
    bf16 autocast on CPUs with AMX or AVX512-BF16 (weights stay float32), float32 otherwise."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision, "as configured"
    if torch.cuda.is_available():
        if native_bf16():
            return "bf16", "auto: the GPU computes in bf16 natively"
        return "fp16", "auto: the GPU has no native bf16, fp16 with a GradScaler"
    native = cpu_native_bf16()
    if native:
        return "bf16", f"auto: bf16 autocast, the CPU has {native}"
    return "no", "auto: float32, the CPU has no native bf16 (AMX or AVX512-BF16)"


def resolve_mixed_precision(cfg: TrainConfig) -> str:
    return mixed_precision_choice(cfg)[0]


def flash_attn_problem() -> str | None:
    """Why flash_attention_2 cannot run here, or None when it can.

    Decided as transformers decides (`is_flash_attn_2_available`: the `flash-attn` distribution,
    version >= 2.3.3, CUDA present; a flash-attn-4 install, also imported as `flash_attn`, is not
    it), then by importing the compiled extension: a wheel built for another torch or CUDA installs
    fine and fails only there ("undefined symbol"), which would otherwise crash the first forward.
    """
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (`make install-gpu`)"
    from transformers.utils.import_utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        found = ", ".join(
            f"{d.metadata['Name']} {d.version}"
            for d in importlib.metadata.distributions()
            if (d.metadata["Name"] or "").lower().replace("_", "-").startswith("flash-attn")
        )
        return (
            f"transformers does not take the installed flash_attn ({found or 'no distribution metadata'}) as "
            "flash-attn 2: it needs the `flash-attn` distribution >= 2.3.3 and a CUDA torch"
        )
    try:
        importlib.import_module("flash_attn_2_cuda")
        importlib.import_module("flash_attn")
    except Exception as err:  # ImportError (undefined symbol), OSError (missing libcudart), RuntimeError
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return (
            f"flash-attn's CUDA extension does not load ({type(err).__name__}: {first}): it was built for another "
            f"torch ({torch.__version__}) or CUDA; rebuild it with `make install-gpu`"
        )
    return None


def resolve_attention(requested: str, dtype: torch.dtype) -> tuple[str, str]:
    """(attn_implementation, a note for the plan): flash_attention_2 when it loads and can run (an
    Ampere+ GPU, half precision), else sdpa, saying why. An explicit flash_attention_2 that cannot
    run is an error, raised before the model is loaded."""
    if requested != "auto":
        if requested == "flash_attention_2":
            problem = flash_attn_problem()
            if problem:
                raise ConfigError(f"attn_implementation=flash_attention_2, but {problem}. Or use sdpa.")
        return requested, ""
    problem = flash_attn_problem()
    if problem is None and not (torch.cuda.is_available() and tuple(torch.cuda.get_device_capability()) >= (8, 0)):
        problem = "flash-attn 2 needs an Ampere or newer GPU (compute capability >= 8.0)"
    if problem is None and dtype not in (torch.float16, torch.bfloat16):
        problem = f"flash-attn 2 needs float16 or bfloat16 weights, not {dtype}"
    if problem is None:
        return "flash_attention_2", ""
    installed = importlib.util.find_spec("flash_attn") is not None
    return "sdpa", f" (not flash_attention_2: {problem})" if installed else ""


@dataclass(frozen=True)
class ModelInfo:
    description: str  # where the weights came from
    attention: str
    dtype: torch.dtype
    trainable_params: int
    total_params: int
    attention_note: str = ""  # why flash_attention_2 was not chosen although flash-attn is installed
    weights: str = ""  # what the weights are stored as, for the plan (NF4 is not its compute dtype)

    def describe_params(self) -> str:
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        return f"{self.trainable_params:,} trainable of {self.total_params:,} ({share:.2f}%)"


def load_model(cfg: TrainConfig, device: torch.device | None = None) -> tuple[torch.nn.Module, ModelInfo]:
    """The model to train: full, LoRA on a frozen base, or LoRA on an NF4 base (QLoRA)."""
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    dtype = resolve_dtype(cfg)
    attention, attention_note = resolve_attention(cfg.attn_implementation, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention}
    if cfg.random_init:
        warn_if_real_weights(cfg.model_name_or_path)
        if cfg.mode == "qlora":
            raise ValueError("random_init with mode=qlora is not supported: save the random model, then load it.")
        torch.manual_seed(cfg.seed)
        config = _hub_call(
            "model config", cfg.model_name_or_path, lambda: AutoConfig.from_pretrained(cfg.model_name_or_path)
        )
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        source = f"{cfg.model_name_or_path} (config only, random init, seed {cfg.seed})"
    else:
        if cfg.mode == "qlora":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
                # ZeRO-3 shards parameters as floats: store the 4-bit data in the compute dtype.
                bnb_4bit_quant_storage=dtype if _zero3_enabled() else torch.uint8,
            )
            if not _zero3_enabled():  # ZeRO-3 places the shards itself
                kwargs["device_map"] = {"": device if device is not None else "cpu"}
        model = _hub_call(
            "model",
            cfg.model_name_or_path,
            lambda: AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, **kwargs),
        )
        source = cfg.model_name_or_path
    weights = str(dtype)
    if cfg.mode == "qlora":
        # The plan used to print the compute dtype as if it were the weights' (`weights torch.float32`).
        quant = kwargs["quantization_config"]
        weights = (
            f"NF4 4-bit{' with double quantisation' if quant.bnb_4bit_use_double_quant else ''}, stored as "
            f"{quant.bnb_4bit_quant_storage}, compute {quant.bnb_4bit_compute_dtype}; LoRA and unquantised "
            "layers (embeddings, norms, head) float32"
        )
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}
    if cfg.mode == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
    if cfg.mode in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(cfg.seed)
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    trainable = sum(_stored_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_stored_numel(p) for p in model.parameters())
    info = ModelInfo(source, attention, dtype, trainable, total, attention_note=attention_note, weights=weights)
    return model, info


def warn_if_real_weights(path: str) -> None:
    """`random_init: true` (configs/tiny.yaml sets it) reads only config.json: pointed at a directory of
    trained weights it would silently train a random model. Warn loudly (the run goes on: training a
    real architecture from scratch is legitimate, but it should never happen by accident)."""
    folder = Path(path)
    found = sorted(p.name for p in folder.glob("*.safetensors")) + sorted(p.name for p in folder.glob("*.bin"))
    if folder.is_dir() and found:
        warnings.warn(
            f"random_init=true: {path} holds trained weights ({', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}) that will NOT be loaded; the model starts from random "
            "weights built from its config.json. To train those weights, set random_init=false "
            "(configs/tiny.yaml sets it to true for the from-scratch demo).",
            UserWarning,
            stacklevel=3,
        )


def _zero3_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _stored_numel(p: torch.Tensor) -> int:
    """Parameters a tensor represents: 4-bit layers store two to a byte, ZeRO-3 keeps a shard."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None:
        return int(torch.Size(quant_state.shape).numel())
    return int(getattr(p, "ds_numel", p.numel()))


def save_trained(
    model: torch.nn.Module, tokenizer: Any, output_dir: str | Path, state_dict: dict | None = None
) -> None:
    """The adapter (LoRA/QLoRA) or the whole model, in safetensors, with the tokenizer beside it."""
    model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
