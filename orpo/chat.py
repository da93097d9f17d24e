"""Talk to a trained model: one answer, or a conversation on the terminal.

    python -m orpo.chat runs/tiny --prompt "sort: 3 1 2"          # one answer, printed
    python -m orpo.chat runs/mistral7b-orpo-qlora                 # interactive: /exit or Ctrl-D ends it
    python -m orpo.chat MERGED --system "Be brief." --temperature 0.7

OUT is a run's output_dir: an adapter (adapter_config.json: its base, un-quantised, plus the
adapter) or a full model (config.json), with the tokenizer the run saved. Prompts are rendered with
the tokenizer's chat template (`add_generation_prompt=True`) and encoded exactly as the trainer
encoded prompts (one BOS), so the model sees what it was trained on. Decoding is greedy unless
`--temperature` is above 0, and stops at EOS or the template's end-of-turn token. The interactive
mode keeps the conversation; when it outgrows the model's context, its oldest tokens are dropped.

`generate_samples` is the same generation for a batch of prompts, for logging samples while training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from orpo.config import TrainConfig
from orpo.data import PairTokenizer, PreferenceSplit
from orpo.model import auto_compute_dtype

if TYPE_CHECKING:
    from accelerate import Accelerator

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ChatError(ValueError):
    """A model directory that cannot be chatted with; the message says what was found."""


# ---- loading -------------------------------------------------------------------------------------


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: float32 on the CPU, bfloat16 on GPUs that have it natively (sm80+), else float16."""
    if name != "auto":
        return _DTYPES[name]
    return auto_compute_dtype(device.type)  # the trainer's rule: one decision for both


def load_chat_tokenizer(path: str | Path) -> Any:
    """The tokenizer with the trainer's fallbacks: the Zephyr template when it has none, a pad token."""
    from transformers import AutoTokenizer

    from orpo.model import ZEPHYR_TEMPLATE

    tok = AutoTokenizer.from_pretrained(path)
    if not tok.chat_template:
        tok.chat_template = ZEPHYR_TEMPLATE
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token_id is not None else tok.eos_token
    return tok


def load_for_chat(
    path: str | Path, base: str | None = None, dtype: str = "auto", device: str | torch.device | None = None
) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode on `device`, tokenizer) from a run's output_dir: adapter or full model."""
    import json

    from transformers import AutoModelForCausalLM

    path = Path(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, device)
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = base or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ChatError(f"{path}/adapter_config.json names no base_model_name_or_path: pass --base.")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype), path)
        tokenizer = load_chat_tokenizer(path if has_tokenizer else base)
    elif (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tokenizer = load_chat_tokenizer(path if has_tokenizer else base or path)
    else:
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "no such directory"
        raise ChatError(
            f"{path} holds neither an adapter (adapter_config.json) nor a model (config.json): found {found}. "
            "Point at a run's output_dir or a merged model."
        )
    return model.to(device).eval(), tokenizer


# ---- generating ----------------------------------------------------------------------------------


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt's ids exactly as the trainer encodes prompts: template with the generation prompt,
    one BOS when the tokenizer uses one."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return _pair_tokenizer(tokenizer).encode(text)


def _pair_tokenizer(tokenizer: Any) -> PairTokenizer:
    return PairTokenizer(tokenizer, max_length=2, max_prompt_length=1)  # only its encoding and end-of-turn rules


def _fit_context(
    encoded: list[list[int]], limit: int | None, max_new_tokens: int, bos: int | None
) -> tuple[list[list[int]], int]:
    """Prompts and answer budget that fit the model's context (`limit` positions): the answer gets
    what the longest prompt leaves, but at least min(max_new_tokens, limit // 4) tokens; prompts
    longer than that allows lose their oldest tokens (BOS kept), as the trainer cuts long prompts."""
    longest = max(len(ids) for ids in encoded)
    if limit is None or longest + max_new_tokens <= limit:
        return encoded, max_new_tokens
    new = max(min(max_new_tokens, max(limit // 4, 1)), limit - longest)
    keep = limit - new
    fitted = []
    for ids in encoded:
        head = ids[:1] if bos is not None and ids[:1] == [bos] else []
        fitted.append(ids if len(ids) <= keep else head + ids[len(ids) - (keep - len(head)) :])
    return fitted, new


def generate_samples(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int,
    temperature: float = 0.0,
) -> list[str]:
    """The model's answer to each prompt (a message list), decoded without special tokens.

    One left-padded batch, greedy (or sampled at `temperature` > 0), stopping at EOS or the
    template's end-of-turn token, within the model's context (see `_fit_context`). Runs in eval mode
    under no_grad and puts the model back in the mode it was in. Pass the unwrapped model
    (`accelerator.unwrap_model(model)`), not a DDP wrapper; under ZeRO-3 every rank must call it.
    """
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    return generate_from_ids(model, tokenizer, encoded, max_new_tokens, temperature)


def generate_from_ids(
    model: torch.nn.Module,
    tokenizer: Any,
    encoded: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    synced_gpus: bool = False,
) -> list[str]:
    """`generate_samples` for prompts already tokenised (e.g. a training split's prompt tokens).
    `synced_gpus`: every rank runs the same number of forwards (needed under ZeRO-3)."""
    from transformers import GenerationConfig

    pair_tokenizer = _pair_tokenizer(tokenizer)
    terminators = sorted(pair_tokenizer.terminators)
    limit = getattr(model.config, "max_position_embeddings", None)
    encoded, max_new_tokens = _fit_context(encoded, limit, max_new_tokens, tokenizer.bos_token_id)
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=None,
        top_k=None,
        eos_token_id=terminators,
        pad_token_id=pad,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config, synced_gpus=synced_gpus
            )
    finally:
        model.train(was_training)
    answers = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in pair_tokenizer.terminators), len(row))
        answers.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return answers


def sample_prompts(cfg: TrainConfig, data: PreferenceSplit) -> list[list[int]]:
    """A fixed, seeded set of prompts (as tokenised for training) to answer at every evaluation."""
    chosen = np.random.default_rng(cfg.seed + 1).permutation(len(data))[: cfg.num_sample_prompts]
    return [data[int(i)]["chosen_ids"][: data[int(i)]["chosen_prompt_len"]].tolist() for i in sorted(chosen)]


def log_samples(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    step: int,
) -> None:
    """Greedy answers to the sample prompts, as TensorBoard text. Under ZeRO-3 every rank generates
    (each forward gathers parameters collectively); otherwise rank 0 alone."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    zero3 = is_deepspeed_zero3_enabled()
    if not prompts or not (accelerator.is_main_process or zero3):
        return
    answers = generate_from_ids(accelerator.unwrap_model(model), tokenizer, prompts, max_new_tokens, synced_gpus=zero3)
    if accelerator.is_main_process:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            text = f"**prompt**\n\n```\n{tokenizer.decode(prompt)}\n```\n\n**answer**\n\n```\n{answer}\n```"
            writer.add_text(f"samples/{i}", text, step)
        writer.flush()


# ---- the command line ----------------------------------------------------------------------------


def interact(
    model: torch.nn.Module, tokenizer: Any, system: str | None, max_new_tokens: int, temperature: float
) -> list[str]:
    """Read user turns from stdin until EOF or /exit (/reset starts over), answering each with the
    whole conversation as the prompt. Answers go to stdout, everything else to stderr."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    answers = []
    print("chat: one message per line; /reset starts over, /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        answer = generate_samples(model, tokenizer, [history], max_new_tokens, temperature)[0]
        history.append({"role": "assistant", "content": answer})
        answers.append(answer)
        print(answer, flush=True)
    return answers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a run's output_dir (adapter or full model) or a merged model")
    parser.add_argument("--prompt", help="answer this one message and exit (default: interactive)")
    parser.add_argument("--system", help="system message opening the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    parser.add_argument("--base", help="base model of an adapter (default: adapter_config.json's)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES], help="auto: fp32 on CPU, bf16 on GPU")
    args = parser.parse_args(argv)
    if args.max_new_tokens <= 0 or args.temperature < 0:
        parser.error("--max-new-tokens must be > 0 and --temperature >= 0")
    return args


def main(argv: list[str] | None = None) -> list[str]:
    """The answers printed (one with --prompt, one per turn otherwise)."""
    args = parse_args(argv)
    try:
        model, tokenizer = load_for_chat(args.model, args.base, args.dtype)
    except ChatError as err:
        sys.exit(f"error: {err}")
    if args.prompt is None:
        return interact(model, tokenizer, args.system, args.max_new_tokens, args.temperature)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    answer = generate_samples(model, tokenizer, [messages], args.max_new_tokens, args.temperature)[0]
    print(answer)
    return [answer]


if __name__ == "__main__":
    main()
