"""Build the offline demo's assets: a byte-level BPE tokenizer, a 2-layer Llama config and a
synthetic preference data set, all deterministic. The outputs are committed; rerun only to change them.

    python scripts/make_tiny_assets.py

The task is one a tiny model can learn in a minute on a CPU and that a random model gets right half
the time: given a short list of digits, sort it ("sort: 7 2 9 4" -> "2 4 7 9") or name its largest
("max: 7 2 9 4" -> "9"). The rejected answer is a plausible wrong one: the sorted list with two
neighbours swapped, or the second-largest digit.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "assets" / "tiny"
DATA_DIR = ROOT / "data" / "sort_prefs"
SPECIAL = ["<s>", "</s>", "<unk>", "<pad>"]
# Zephyr-style: the prompt ends with "<|assistant|>\n", each turn is closed by EOS then a newline.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SYSTEM_PROMPTS = ["You are a careful assistant.", "Answer with digits only."]


def make_pair(rng: random.Random) -> dict:
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 6))]
    while len(set(digits)) < 2:
        digits = [rng.randrange(10) for _ in range(rng.randint(3, 6))]
    task = rng.choice(["sort", "max"])
    if task == "sort":
        answer = sorted(digits)
        wrong = list(answer)
        i = rng.choice([k for k in range(len(wrong) - 1) if wrong[k] != wrong[k + 1]])
        wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    else:
        distinct = sorted(set(digits))
        answer, wrong = [distinct[-1]], [distinct[-2]]
    question = f"{task}: {' '.join(map(str, digits))}"
    prompt = [{"role": "user", "content": question}]
    if rng.random() < 0.25:
        prompt = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + prompt
    say = lambda xs: " ".join(map(str, xs))  # noqa: E731
    return {
        "prompt": question,
        "chosen": prompt + [{"role": "assistant", "content": say(answer)}],
        "rejected": prompt + [{"role": "assistant", "content": say(wrong)}],
    }


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL + ["<|system|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama/Mistral, the tokenizer adds BOS itself, while the chat template writes one too:
    # the data pipeline must end up with exactly one.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main() -> None:
    rng = random.Random(1234)
    train = [make_pair(rng) for _ in range(4000)]
    test = [make_pair(rng) for _ in range(400)]
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with open(DATA_DIR / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    corpus = []
    for row in train:
        for m in row["chosen"] + row["rejected"][-1:]:
            corpus.append(f"<|{m['role']}|>\n{m['content']}\n")
    tokenizer = build_tokenizer(corpus)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(MODEL_DIR)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.save_pretrained(MODEL_DIR)
    print(f"wrote {MODEL_DIR} (vocab {len(tokenizer)}) and {DATA_DIR} ({len(train)} train, {len(test)} test pairs)")


if __name__ == "__main__":
    main()
