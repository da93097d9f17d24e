"""Padding-free packing (orpo.collator.PackedPairCollator): the layout written out by hand, and on the tiny
Llama the packed forward gives the padded forward's log-probs, ORPO loss and parameter gradients.

The equivalence rests on transformers building a block-diagonal causal mask from the restarts of
`position_ids` when attention_mask is None and there is no KV cache; the last tests show that without
those conditions the sequences see each other and the numbers change (so the equivalence test can fail).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orpo.collator import IGNORE_INDEX, PackedPairCollator, PairCollator
from orpo.logprobs import output_projection, packed_policy_logps, policy_logps_from_hidden
from orpo.loss import PolicyLogps, orpo_loss, policy_logps
from tests.conftest import ROOT, TINY
from tests.test_collator import PAIRS, pair

X = IGNORE_INDEX


# ---- the layout, by hand -------------------------------------------------------------------------

# PAIRS (tests/test_collator.py): chosen [10 11 | 12 13 14], [10 30 31 | 32 33 34 35];
# rejected [10 11 | 20], [10 30 31 | 40 41]  ("|" ends the prompt).
PACKED_IDS = [10, 11, 12, 13, 14, 10, 30, 31, 32, 33, 34, 35, 10, 11, 20, 10, 30, 31, 40, 41]
POSITIONS = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0, 1, 2, 3, 4]
PACKED_LABELS = [X, X, 12, 13, 14, X, X, X, 32, 33, 34, 35, X, X, 20, X, X, X, 40, 41]


def test_packed_layout() -> None:
    batch = PackedPairCollator()(PAIRS)
    assert "attention_mask" not in batch  # the mask comes from position_ids
    assert batch["input_ids"].tolist() == [PACKED_IDS]
    assert batch["position_ids"].tolist() == [POSITIONS]
    assert batch["labels"].tolist() == [PACKED_LABELS]
    assert batch["nll_labels"].tolist() == [PACKED_LABELS[:12] + [X] * 8]  # the chosen sequences only
    assert batch["seq_lens"].tolist() == [5, 7, 3, 5]
    assert batch["cu_seqlens"].tolist() == [0, 5, 12, 15, 20] and batch["cu_seqlens"].dtype == torch.int32
    assert int(batch["num_pairs"]) == 2 and int(batch["num_tokens"]) == 20 and int(batch["num_nll_tokens"]) == 7
    assert batch["row_index"].tolist() == [7, 9]
    for key in ("input_ids", "position_ids", "labels", "nll_labels"):
        assert batch[key].dtype == torch.long


def test_packed_nll_on_prompt_scores_every_chosen_token_but_each_first() -> None:
    batch = PackedPairCollator(nll_on_prompt=True)(PAIRS)
    assert batch["nll_labels"].tolist() == [[X, 11, 12, 13, 14, X, 30, 31, 32, 33, 34, 35] + [X] * 8]
    assert int(batch["num_nll_tokens"]) == 4 + 6
    assert batch["labels"].tolist() == [PACKED_LABELS]


def test_first_token_of_a_sequence_is_never_a_target() -> None:
    """With no prompt, the first token is still -100: the previous sequence's last token must not predict it."""
    batch = PackedPairCollator(nll_on_prompt=True)([pair([5, 6], 0, [7, 8, 9], 0, row_index=0)])
    assert batch["labels"].tolist() == [[X, 6, X, 8, 9]]
    assert batch["nll_labels"].tolist() == [[X, 6, X, X, X]]


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_packed_holds_the_padded_batch_without_its_padding(nll_on_prompt: bool) -> None:
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(6):
        prompt = rng.integers(4, 50, size=rng.integers(1, 6)).tolist()
        chosen, rejected = (prompt + rng.integers(4, 50, size=rng.integers(1, 9)).tolist() for _ in range(2))
        pairs.append(pair(chosen, len(prompt), rejected, len(prompt), row_index=i))
    padded = PairCollator(0, nll_on_prompt)(pairs)
    packed = PackedPairCollator(nll_on_prompt)(pairs)
    real = padded["attention_mask"].bool()
    assert packed["input_ids"][0].tolist() == padded["input_ids"][real].tolist()
    assert packed["labels"][0].tolist() == padded["labels"][real].tolist()
    chosen_tokens = int(real[:6].sum())
    assert packed["nll_labels"][0, :chosen_tokens].tolist() == padded["nll_labels"][real[:6]].tolist()
    assert (packed["nll_labels"][0, chosen_tokens:] == X).all()
    assert packed["seq_lens"].tolist() == real.sum(1).tolist()
    for key in ("num_pairs", "num_nll_tokens", "num_tokens", "row_index"):
        assert torch.equal(packed[key], padded[key]), key


# ---- on the tiny Llama with real pairs -----------------------------------------------------------


@pytest.fixture(scope="module")
def real_pairs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Six pairs of the shipped data, picked to have different lengths (so padding is real)."""
    from transformers import AutoTokenizer

    from orpo.data import load_split

    tokenizer = AutoTokenizer.from_pretrained(TINY)
    data = load_split(
        str(ROOT / "data" / "sort_prefs"), "train", tokenizer, 64, 48, cache_dir=str(tmp_path_factory.mktemp("cache"))
    )
    lengths = np.diff(data.offsets)[0::2]
    picked = [int(np.argmin(lengths)), int(np.argmax(lengths)), 0, 1, 2, 3]
    assert lengths[picked].min() < lengths[picked].max()
    return [data[i] for i in picked]


def tiny_model(mode: str = "full") -> torch.nn.Module:
    """The tiny Llama in float32, or wrapped by PEFT with LoRA on q/v (B made non-zero, so adapters matter)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(TINY), attn_implementation="sdpa", dtype=torch.float32
    )
    if mode == "full":
        return model
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def orpo_step(
    model: torch.nn.Module, policy: PolicyLogps, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = orpo_loss(*policy, int(batch["num_nll_tokens"]), int(batch["num_pairs"]), 0.5)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def padded_path(model: torch.nn.Module, pairs: list[dict], nll_on_prompt: bool):
    batch = PairCollator(3, nll_on_prompt)(pairs)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    policy = policy_logps(logits, batch["labels"], batch["nll_labels"])
    return (PolicyLogps(*(t.detach() for t in policy)), *orpo_step(model, policy, batch))


def packed_path(model: torch.nn.Module, pairs: list[dict], nll_on_prompt: bool, head: str, **forward: bool):
    """head 'logits': full logits -> packed_policy_logps; 'chunked': hidden states -> chunked head."""
    batch = PackedPairCollator(nll_on_prompt)(pairs)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False, **forward}
    if head == "logits":
        logits = model(**inputs).logits
        policy = packed_policy_logps(logits, batch["labels"], batch["nll_labels"], batch["seq_lens"])
    else:
        out = model(**inputs, output_hidden_states=True, logits_to_keep=torch.empty(0, dtype=torch.long))
        weight, bias = output_projection(model)
        policy = policy_logps_from_hidden(
            out.hidden_states[-1], weight, batch["labels"], batch["nll_labels"], bias, seq_lens=batch["seq_lens"]
        )
    return (PolicyLogps(*(t.detach() for t in policy)), *orpo_step(model, policy, batch))


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("head", ["logits", "chunked"])
@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_packed_forward_matches_padded(real_pairs: list[dict], nll_on_prompt: bool, head: str, mode: str) -> None:
    model = tiny_model(mode)
    want_policy, want_loss, want_grads = padded_path(model, real_pairs, nll_on_prompt)
    got_policy, got_loss, got_grads = packed_path(model, real_pairs, nll_on_prompt, head)
    for name, got, want in zip(PolicyLogps._fields, got_policy, want_policy, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) == (8 if mode == "lora" else 21)
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    ("forward", "why"),
    [
        ({"use_cache": True}, "with a KV cache transformers builds a plain causal mask over the whole row"),
        ({"position_ids": None}, "positions 0..L-1: one long sequence, and RoPE sees shifted positions"),
        ({"attention_mask": "ones"}, "an explicit all-ones mask overrides the packed mask"),
    ],
)
def test_without_the_block_diagonal_mask_the_sequences_leak(real_pairs: list[dict], forward: dict, why: str) -> None:
    """The conditions the equivalence depends on are real: break one and the log-probs move."""
    model = tiny_model()
    want, _, _ = padded_path(model, real_pairs, nll_on_prompt=False)
    batch = PackedPairCollator()(real_pairs)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False, **forward}
    if inputs.get("attention_mask") == "ones":
        inputs["attention_mask"] = torch.ones_like(batch["input_ids"])
    with torch.no_grad():
        logits = model(**inputs).logits
    got = packed_policy_logps(logits, batch["labels"], batch["nll_labels"], batch["seq_lens"])
    # The first chosen sequence sees nothing before it, so only later sequences can change.
    torch.testing.assert_close(got.chosen_logps[0], want.chosen_logps[0], rtol=1e-5, atol=1e-5)
    assert (got.rejected_logps - want.rejected_logps).abs().max() > 1e-3, why
