"""Loading the tokenizer and the model (full, LoRA, QLoRA), and saving what was trained."""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orpo.config import TrainConfig

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


def load_tokenizer(cfg: TrainConfig) -> Any:
    """The tokenizer, with a chat template and a pad token.

    Pad: the tokenizer's own, else its unk token, else EOS. Padding is masked by position
    (attention mask and labels), never by token id, so an EOS used as pad still counts in the loss.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
    if cfg.chat_template is not None:
        tok.chat_template = cfg.chat_template
    elif not tok.chat_template:
        tok.chat_template = ZEPHYR_TEMPLATE
    if tok.eos_token_id is None:
        raise ValueError(f"Tokenizer {cfg.tokenizer_path!r} has no EOS token; responses must end with one.")
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token_id is not None else tok.eos_token
    return tok


def resolve_dtype(cfg: TrainConfig) -> torch.dtype:
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    if cfg.mode == "full" or not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_mixed_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_attention(requested: str, dtype: torch.dtype) -> str:
    """flash_attention_2 when installed and usable (Ampere+ GPU, half precision), else sdpa."""
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attn_implementation=flash_attention_2 needs flash-attn: `make install-gpu`, or use sdpa.")
        return requested
    usable = (
        importlib.util.find_spec("flash_attn") is not None
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability()[0] >= 8
        and dtype in (torch.float16, torch.bfloat16)
    )
    return "flash_attention_2" if usable else "sdpa"


@dataclass(frozen=True)
class ModelInfo:
    description: str  # where the weights came from
    attention: str
    dtype: torch.dtype
    trainable_params: int
    total_params: int
    weights: str = ""  # what the weights are stored as, for the plan (NF4 is not its compute dtype)

    def describe_params(self) -> str:
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        return f"{self.trainable_params:,} trainable of {self.total_params:,} ({share:.2f}%)"


def load_model(cfg: TrainConfig, device: torch.device | None = None) -> tuple[torch.nn.Module, ModelInfo]:
    """The model to train: full, LoRA on a frozen base, or LoRA on an NF4 base (QLoRA)."""
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    dtype = resolve_dtype(cfg)
    attention = resolve_attention(cfg.attn_implementation, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention}
    if cfg.random_init:
        warn_if_real_weights(cfg.model_name_or_path)
        if cfg.mode == "qlora":
            raise ValueError("random_init with mode=qlora is not supported: save the random model, then load it.")
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model_name_or_path), **kwargs)
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
        model = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, **kwargs)
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
    return model, ModelInfo(source, attention, dtype, trainable, total, weights)


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
