"""Prefix sharing (orpo.collator.SharedPairCollator): each pair as one sequence [shared prefix, chosen
rest, rejected rest] with a 4D mask. The layout written out by hand; what every scored token can see
equals its unshared sequence's prefix; on the tiny Llama the losses, metrics and gradients equal the
unshared padded path (float32, 1e-5), padded and packed, chunked head and full logits; end-to-end runs
and 2-process DDP / ZeRO-3 runs give the unshared single-process steps; and a mask that lets the
rejected tokens see the chosen ones moves the numbers (so the equivalence can fail).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from orpo.collator import (
    CHOSEN,
    IGNORE_INDEX,
    PAD,
    PREFIX,
    REJECTED,
    PairCollator,
    SharedPairCollator,
    SharedTargets,
    shared_attention_mask,
    shared_prefix_len,
)
from orpo.config import ConfigError, load_config
from orpo.forward import check_prefix_sharing, policy_forward
from orpo.logprobs import output_projection
from orpo.loss import PolicyLogps
from tests.conftest import ROOT, TINY, TINY_CONFIG, reset_accelerate, train_tiny
from tests.test_collator import PAIRS, pair
from tests.test_multiprocess import COMMON, assert_same_steps, assert_same_weights, run_launched
from tests.test_packing import orpo_step, padded_path, tiny_model
from tests.test_train import _scalars

P, C, R, X = PREFIX, CHOSEN, REJECTED, PAD


# ---- the layout, by hand -------------------------------------------------------------------------

# PAIRS (tests/test_collator.py): chosen [10 11 | 12 13 14], [10 30 31 | 32 33 34 35];
# rejected [10 11 | 20], [10 30 31 | 40 41]. Shared prefixes: 2 and 3 tokens (here the prompts).
SHARED_IDS = [[10, 11, 12, 13, 14, 20, 3, 3, 3], [10, 30, 31, 32, 33, 34, 35, 40, 41]]
SHARED_POSITIONS = [[0, 1, 2, 3, 4, 2, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6, 3, 4]]
BRANCH = [[P, P, C, C, C, R, X, X, X], [P, P, P, C, C, C, C, R, R]]


def test_shared_layout() -> None:
    batch = SharedPairCollator(pad_token_id=3)(PAIRS)
    assert batch["input_ids"].tolist() == SHARED_IDS
    assert batch["position_ids"].tolist() == SHARED_POSITIONS
    assert batch["branch"].tolist() == BRANCH
    assert batch["block_ids"].tolist() == [[0] * 6 + [-1] * 3, [1] * 9]
    # (flat position of the predicting hidden state, target, sequence): chosen 0, chosen 1, rejected 0, 1.
    entries = list(
        zip(
            batch["score_positions"].tolist(),
            batch["score_targets"].tolist(),
            batch["score_sequence"].tolist(),
            strict=True,
        )
    )
    assert entries == [
        (1, 12, 0), (2, 13, 0), (3, 14, 0),  # chosen 0: its tokens 2..4, predicted by positions 1..3
        (1, 20, 2),  # rejected 0: its token 2 is predicted by the last prefix position, as chosen 0's
        (11, 32, 1), (12, 33, 1), (13, 34, 1), (14, 35, 1),  # row 1 starts at flat index 9
        (11, 40, 3), (16, 41, 3),  # rejected 1: token 3 from the prefix's end (11), token 4 from its own 40 (16)
    ]  # fmt: skip
    assert batch["score_in_nll"].tolist() == [True] * 3 + [False] + [True] * 4 + [False] * 2
    assert batch["score_num_response"] == 10
    assert int(batch["num_pairs"]) == 2 and int(batch["num_nll_tokens"]) == 7
    assert int(batch["num_tokens"]) == 20, "the real tokens of the pairs, as without sharing"
    assert int(batch["num_computed_tokens"]) == 20 - 2 - 3
    assert batch["row_index"].tolist() == [7, 9]


def test_shared_packed_layout_and_mask() -> None:
    batch = SharedPairCollator(pad_token_id=3, packed=True)(PAIRS)
    assert batch["input_ids"].tolist() == [SHARED_IDS[0][:6] + SHARED_IDS[1]]
    assert batch["position_ids"].tolist() == [SHARED_POSITIONS[0][:6] + SHARED_POSITIONS[1]]
    assert batch["score_positions"].tolist()[4:] == [8, 9, 10, 11, 8, 13]  # the second pair starts at 6
    mask = shared_attention_mask(batch["block_ids"], batch["branch"], "sdpa")
    assert mask.shape == (1, 1, 15, 15) and mask.dtype == torch.bool
    sees = [[int(k) for k in torch.nonzero(row).flatten()] for row in mask[0, 0]]
    assert sees[5] == [0, 1, 5], "rejected 0's token sees the prompt and itself, not chosen 0's 12 13 14"
    assert sees[4] == [0, 1, 2, 3, 4]
    assert sees[6] == [6], "pair 1 starts afresh: the packed mask is block-diagonal"
    assert sees[14] == [6, 7, 8, 13, 14]
    additive = shared_attention_mask(batch["block_ids"], batch["branch"], "eager", torch.float32)
    assert torch.equal(additive == 0, mask) and additive.min() == torch.finfo(torch.float32).min


def test_shared_prefix_is_the_common_token_prefix_capped_to_leave_a_token_each() -> None:
    assert shared_prefix_len([1, 2, 3, 4], [1, 2, 5]) == 2
    assert shared_prefix_len([1, 2, 3, 4], [1, 2, 3]) == 2, "r is a prefix of c: r keeps its last token"
    assert shared_prefix_len([1, 2], [1, 2]) == 1
    assert shared_prefix_len([7], [7, 8]) == 0
    assert shared_prefix_len([1, 2, 3, 9], [1, 2, 3, 8]) == 3, "past a prompt too: the responses begin alike"


def random_pairs(seed: int, count: int = 8) -> list[dict]:
    """Pairs of every awkward kind: responses of different lengths, responses that begin alike (the
    shared prefix runs into them), prompt lengths that differ between chosen and rejected (a merged
    boundary token), one sequence a prefix of the other, one-token responses, one-token prompts."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(count):
        prompt = rng.integers(4, 300, size=rng.integers(1, 7)).tolist()
        common = rng.integers(4, 300, size=rng.integers(0, 3)).tolist()  # the responses' common start
        chosen = prompt + common + rng.integers(4, 300, size=rng.integers(1, 8)).tolist()
        rejected = prompt + common + rng.integers(4, 300, size=rng.integers(1, 8)).tolist()
        pc = pr = len(prompt)
        if i % 4 == 1 and len(prompt) > 1:  # the template merged the prompt's last token into the rejected response
            rejected[len(prompt) - 1] = 301
            pr = len(prompt) - 1
        if i % 4 == 2:
            rejected = chosen[: len(prompt) + 1]
        pairs.append(pair(chosen, pc, rejected, pr, row_index=i))
    return pairs


def _unshared_entries(pairs: list[dict], nll_on_prompt: bool) -> Counter:
    """(sequence, target, in L_SFT, what the predicting position sees) for every scored token, unshared."""
    entries: Counter = Counter()
    b = len(pairs)
    for i, e in enumerate(pairs):
        sides = ((i, e["chosen_ids"], e["chosen_prompt_len"]), (b + i, e["rejected_ids"], e["rejected_prompt_len"]))
        for seq, ids, plen in sides:
            for t in range(1, len(ids)):
                response, nll = t >= max(plen, 1), seq < b and (t >= max(plen, 1) or nll_on_prompt)
                if response or nll:
                    context = tuple((int(tok), pos) for pos, tok in enumerate(ids[:t]))
                    entries[(seq if response else -1, int(ids[t]), nll, context)] += 1
    return entries


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_every_scored_token_sees_exactly_its_unshared_prefix(packed: bool, nll_on_prompt: bool) -> None:
    """The exactness argument, checked on the layout itself: for each scored entry, the (token, position
    id) pairs the mask lets its predicting position see are those of the unshared sequence before the
    target, and the multiset of (sequence, target, in L_SFT) is the unshared one. Causal attention
    with RoPE then computes the same hidden state."""
    pairs = random_pairs(1, 12)
    batch = SharedPairCollator(pad_token_id=3, nll_on_prompt=nll_on_prompt, packed=packed)(pairs)
    mask = shared_attention_mask(batch["block_ids"], batch["branch"], "sdpa")[:, 0]
    width = batch["input_ids"].shape[1]
    ids, positions = batch["input_ids"].flatten(), batch["position_ids"].flatten()
    got: Counter = Counter()
    columns = (batch[f"score_{k}"].tolist() for k in ("positions", "targets", "sequence", "in_nll"))
    for flat, target, seq, nll in zip(*columns, strict=True):
        row, q = divmod(flat, width)
        seen = [row * width + int(k) for k in torch.nonzero(mask[row, q]).flatten()]
        visible = sorted((int(positions[k]), int(ids[k])) for k in seen)
        got[(seq, target, nll, tuple((tok, pos) for pos, tok in visible))] += 1
    assert got == _unshared_entries(pairs, nll_on_prompt)
    padded = PairCollator(3, nll_on_prompt)(pairs)
    for key in ("num_pairs", "num_nll_tokens", "num_tokens", "row_index"):
        assert torch.equal(batch[key], padded[key]), key
    assert int(batch["num_computed_tokens"]) == int(padded["num_tokens"]) - sum(
        shared_prefix_len(e["chosen_ids"], e["rejected_ids"]) for e in pairs
    )


# ---- on the tiny Llama ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs_of_every_kind(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Real pairs of the shipped data (the sorting task's responses begin alike, so the shared prefix
    runs into them), two of them with prompts truncated by the budget, plus the random awkward ones."""
    from transformers import AutoTokenizer

    from orpo.data import load_split

    tokenizer = AutoTokenizer.from_pretrained(TINY)
    cache = str(tmp_path_factory.mktemp("cache"))
    data = load_split(str(ROOT / "data" / "sort_prefs"), "train", tokenizer, 64, 48, cache_dir=cache)
    lengths = np.diff(data.offsets)[0::2]
    real = [data[i] for i in (int(np.argmin(lengths)), int(np.argmax(lengths)), 0, 1)]
    budget = load_split(str(ROOT / "data" / "sort_prefs"), "train", tokenizer, 30, 12, cache_dir=cache)
    truncated = [budget[i] for i in range(len(budget)) if budget[i]["chosen_prompt_len"] == 12][:2]
    assert len(truncated) == 2, "want prompts cut to max_prompt_length"
    assert any(shared_prefix_len(e["chosen_ids"], e["rejected_ids"]) > e["chosen_prompt_len"] for e in real)
    return real + truncated + random_pairs(2, 6)


def shared_path(model: torch.nn.Module, pairs: list[dict], nll_on_prompt: bool, packed: bool, head: str):
    """The trainer's own policy_forward on a SharedPairCollator batch; head 'logits' or 'chunked'."""
    from orpo.forward import LMHead

    batch = SharedPairCollator(3, nll_on_prompt, packed=packed)(pairs)
    lm_head = None if head == "logits" else LMHead(*output_projection(model), None)
    policy = policy_forward(model, batch, lm_head)
    return (PolicyLogps(*(t.detach() for t in policy)), *orpo_step(model, policy, batch))


def assert_same(got: tuple, want: tuple) -> None:
    (got_policy, got_loss, got_grads), (want_policy, want_loss, want_grads) = got, want
    for name, g, w in zip(PolicyLogps._fields, got_policy, want_policy, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name, w in want_grads.items():
        torch.testing.assert_close(got_grads[name], w, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("head", ["logits", "chunked"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_shared_forward_matches_unshared(
    pairs_of_every_kind: list[dict], nll_on_prompt: bool, packed: bool, head: str
) -> None:
    model = tiny_model()
    want = padded_path(model, pairs_of_every_kind, nll_on_prompt)
    assert_same(shared_path(model, pairs_of_every_kind, nll_on_prompt, packed, head), want)


@pytest.mark.parametrize("variant", ["eager", "gradient_checkpointing", "lora"])
def test_shared_forward_matches_unshared_with(pairs_of_every_kind: list[dict], variant: str) -> None:
    """eager attention (an additive float mask), gradient checkpointing (the mask reaches every layer's
    recompute), LoRA (PEFT's wrapper passes the mask through)."""
    model = tiny_model("lora" if variant == "lora" else "full")
    if variant == "eager":
        model.set_attn_implementation("eager")
    if variant == "gradient_checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    want = padded_path(model, pairs_of_every_kind, nll_on_prompt=True)
    assert_same(shared_path(model, pairs_of_every_kind, True, packed=False, head="chunked"), want)


def test_rejected_seeing_chosen_moves_the_numbers(
    pairs_of_every_kind: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rejected-cannot-see-chosen rule is what the equivalence rests on: drop it and the rejected
    log-probs move while the chosen ones stay (so the exactness tests can fail)."""
    import orpo.forward

    model = tiny_model()
    want, _, _ = padded_path(model, pairs_of_every_kind, nll_on_prompt=False)

    def leaky(block_ids: torch.Tensor, branch: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
        return shared_attention_mask(block_ids, torch.where(branch == REJECTED, CHOSEN, branch), implementation, dtype)

    monkeypatch.setattr(orpo.forward, "shared_attention_mask", leaky)
    got, _, _ = shared_path(model, pairs_of_every_kind, False, packed=False, head="chunked")
    torch.testing.assert_close(got.chosen_logps, want.chosen_logps, rtol=1e-5, atol=1e-5)
    assert (got.rejected_logps - want.rejected_logps).abs().max() > 1e-3


def test_shared_targets_of_a_batch_need_no_device_sync() -> None:
    batch = SharedPairCollator(3)(PAIRS)
    shared = SharedTargets.of_batch(batch)
    assert isinstance(shared.num_response, int) and shared.pairs == 2
    assert (batch["score_sequence"][shared.num_response :] == -1).all()
    assert IGNORE_INDEX not in batch["score_targets"].tolist()


# ---- the config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["flash_attention_2", "flex_attention"])
def test_prefix_sharing_with_an_attention_that_takes_no_4d_mask_is_refused(attention: str) -> None:
    with pytest.raises(ConfigError, match=f"prefix_sharing=true .*attn_implementation={attention}"):
        load_config(TINY_CONFIG, ["prefix_sharing=true", f"attn_implementation={attention}"])
    load_config(TINY_CONFIG, ["prefix_sharing=auto", f"attn_implementation={attention}"])  # auto: off with it
    with pytest.raises(ConfigError, match="prefix_sharing must be auto, true or false"):
        load_config(TINY_CONFIG, ["prefix_sharing=yes please"])


def test_auto_attention_that_resolves_to_flash_is_refused_before_the_model_loads(
    tmp_path: Path, no_model: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """attn_implementation=auto picks flash_attention_2 where flash-attn runs; with prefix_sharing=true
    that is an error naming it, raised before any model is loaded (the no_model fixture)."""
    import train_orpo

    monkeypatch.setattr(train_orpo, "resolve_attention", lambda requested, dtype: ("flash_attention_2", ""))
    cfg = load_config(
        TINY_CONFIG, [f"output_dir={tmp_path}", f"data_cache_dir={tmp_path / 'cache'}", "prefix_sharing=true"]
    )
    with pytest.raises(ConfigError, match=r"would use flash_attention_2 \(attn_implementation=auto\)"):
        train_orpo.main(cfg)
    check_prefix_sharing(cfg, "sdpa")  # fine with sdpa


# ---- end to end ----------------------------------------------------------------------------------

STEP_TAGS = ("train/loss", "train/nll_loss", "train/or_loss", "train/grad_norm", "train/logps/chosen")


@pytest.mark.parametrize(
    "variant",
    [(), ("padding_free=true",), ("padding_free=true", "chunked_head=false", "nll_on_prompt=true")],
    ids=["padded", "packed", "packed_full_logits_nll_on_prompt"],
)
def test_training_with_prefix_sharing_gives_the_same_steps(tmp_path: Path, variant: tuple[str, ...]) -> None:
    """The trainer with prefix_sharing=true follows prefix_sharing=false step by step (losses, gradient
    norms, log-probs within 1e-5), and its evaluation (shared too) gives the same metrics."""
    common = (
        "max_steps=3",
        "logging_steps=1",
        "eval_steps=0",
        "eval_at_start=false",
        "eval_max_samples=40",
        "global_batch_size=16",
        "per_device_batch_size=4",
        *variant,
    )
    want = train_tiny(tmp_path / "ref", *common, "prefix_sharing=false")
    got = train_tiny(tmp_path / "got", *common, "prefix_sharing=true")
    assert want["plan"]["prefix_sharing"] == "off (prefix_sharing=false)"
    assert got["plan"]["prefix_sharing"] == "on (prefix_sharing=true)"
    for tag in STEP_TAGS:
        g, w = _scalars(tmp_path / "got", tag), _scalars(tmp_path / "ref", tag)
        assert [s for s, _ in g] == [1, 2, 3], tag
        assert [v for _, v in g] == pytest.approx([v for _, v in w], rel=1e-5, abs=1e-7), tag
    for tag in ("eval/loss", "eval/logps/chosen", "eval/logps/rejected", "eval/rewards/margins"):
        assert got["final_metrics"][tag] == pytest.approx(want["final_metrics"][tag], rel=1e-5, abs=1e-7), tag
    g, w = _scalars(tmp_path / "got", "train/tokens_per_s"), _scalars(tmp_path / "ref", "train/tokens_per_s")
    assert len(g) == len(w) == 3, "tokens_per_s counts the pairs' real tokens either way"


@pytest.fixture(scope="module")
def unshared_reference(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> tuple[Path, dict]:
    """tests/test_multiprocess.py's single-process run (8 pairs as 2 x 4 accumulation), without sharing."""
    import train_orpo

    out = tmp_path_factory.mktemp("single_unshared")
    reset_accelerate()
    overrides = [f"output_dir={out}", f"model_name_or_path={tiny_base}", f"data_cache_dir={out.parent / 'cache'}"]
    summary = train_orpo.main(load_config(TINY_CONFIG, [*overrides, *COMMON, "prefix_sharing=false"]))
    reset_accelerate()
    return out, summary


@pytest.mark.parametrize("config", ["ddp", "zero3"])
def test_two_processes_with_prefix_sharing_match_one(
    config: str, tmp_path: Path, tiny_base: Path, unshared_reference: tuple[Path, dict]
) -> None:
    """2 processes with prefix sharing (DDP; ZeRO-3, whose head is called chunk by chunk) reproduce the
    single-process run without it: steps, final weights, eval metrics (tests/test_multiprocess.py)."""
    ref_out, ref = unshared_reference
    out = tmp_path / config
    summary = run_launched(config, out, tiny_base, "prefix_sharing=true", "head_chunk_size=16")
    assert summary["plan"]["prefix_sharing"] == "on (prefix_sharing=true)"
    assert ref["plan"]["prefix_sharing"] == "off (prefix_sharing=false)"
    assert_same_steps(out, ref_out)
    assert_same_weights(out, ref_out)
    for tag in ("eval/loss", "eval/logps/chosen", "eval/rewards/accuracies"):
        assert summary["final_metrics"][tag] == pytest.approx(ref["final_metrics"][tag], rel=1e-5), tag
