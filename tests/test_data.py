"""orpo/data.py: rendering and tokenising pairs per ../shared/ORPO_SPEC.md ("Tokenisation", "Bad rows"),
reading files, the tokenisation cache, parallel tokenisation and global-batch sampling.

Every tokenizer here is local: the shipped tiny byte-level BPE (assets/tiny: adds BOS, its Zephyr-style
template writes BOS too, ends the prompt with "<|assistant|>\\n" and closes each turn with "</s>\\n"), or a
character-level BPE built by hand below, whose merges and template each test picks.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import orpo.data as data_module
from orpo.collator import PairCollator
from orpo.data import (
    DataError,
    Pair,
    PairTokenizer,
    PreferenceSplit,
    Tokenized,
    load_split,
    nll_token_count,
    normalise_row,
    read_file,
    read_rows,
    tokenize_rows,
)
from orpo.sampling import global_batches
from tests.conftest import ROOT, TINY

SORT_TRAIN = ROOT / "data" / "sort_prefs" / "train.jsonl"

# Hand-built character tokenizer: ids 0-4 are special, then one id per character, then merged tokens.
SPECIALS = ["<s>", "</s>", "<unk>", "<pad>", "<|im_end|>"]
ALPHABET = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789:!?., \n"))
# Prompt ends with "assistant:\n"; turns closed by EOS then "\n" (as the tiny template does).
EOS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)
NO_EOS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)
IM_END_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)


def char_tokenizer(
    template: str,
    merges: tuple[tuple[str, str], ...] = (),
    adds_bos: bool = False,
    im_end_special: bool = False,
) -> PreTrainedTokenizerFast:
    """A BPE over single characters with no pre-tokenizer, so a merge may span the prompt/response
    boundary. `adds_bos`: a post-processor adds "<s>"; `im_end_special`: "<|im_end|>" is registered as
    an extra special token (an end-of-turn token, like ChatML's)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + ALPHABET + [a + b for a, b in merges])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    extra: dict[str, Any] = {"extra_special_tokens": ["<|im_end|>"]} if im_end_special else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", **extra
    )
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def tiny() -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(TINY)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def render(tok: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def raw_ids(tok: Any, text: str) -> list[int]:
    """The tokenizer's own encoding of rendered text (the template writes any BOS itself)."""
    return tok(text, add_special_tokens=False)["input_ids"]


def tokenize(tok: Any, pair: Pair, max_length: int = 512, max_prompt_length: int = 256) -> Tokenized:
    out = PairTokenizer(tok, max_length, max_prompt_length)(pair)
    assert isinstance(out, Tokenized), f"pair skipped: {out}"
    return out


def sides(t: Tokenized) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of the chosen then the rejected sequence."""
    return [
        (t.chosen_ids[: t.chosen_prompt_len], t.chosen_ids[t.chosen_prompt_len :]),
        (t.rejected_ids[: t.rejected_prompt_len], t.rejected_ids[t.rejected_prompt_len :]),
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def split_arrays(split: PreferenceSplit) -> dict[str, Any]:
    return {
        "tokens": split.tokens.tolist(),
        "offsets": split.offsets.tolist(),
        "prompt_lens": split.prompt_lens.tolist(),
        "row_index": split.row_index.tolist(),
        "skipped": dict(split.skipped),
        "skipped_example": dict(split.skipped_example),
        "num_rows": split.num_rows,
        "dtypes": [a.dtype for a in (split.tokens, split.offsets, split.prompt_lens, split.row_index)],
    }


def sort_rows(n: int) -> list[dict[str, Any]]:
    with open(SORT_TRAIN) as f:
        return [json.loads(next(f)) for _ in range(n)]


# ---- masks and the boundary on a template whose prompt ends in a newline -------------------


def test_tiny_prompt_and_responses_are_the_full_chat_split_at_the_prompt(tiny: PreTrainedTokenizerFast) -> None:
    prompt = [{"role": "system", "content": "Answer with digits only."}, *user("sort: 3 1 2")]
    pair = Pair(prompt, "1 2 3", "1 3 2")
    out = tokenize(tiny, pair)
    prompt_text = render(tiny, prompt, True)
    assert prompt_text.endswith("<|assistant|>\n")
    newline = tiny.convert_tokens_to_ids("Ċ")
    for (p, r), answer in zip(sides(out), (pair.chosen, pair.rejected), strict=True):
        full = raw_ids(tiny, render(tiny, prompt + [{"role": "assistant", "content": answer}], False))
        assert full[-2:] == [tiny.eos_token_id, newline]  # the template's "</s>\n" closes the turn
        assert p + r == full[:-1]  # the full chat minus the newline after the final EOS
        assert p == raw_ids(tiny, prompt_text)
        assert tiny.decode(r) == answer + "</s>"


def test_tiny_exact_ids(tiny: PreTrainedTokenizerFast) -> None:
    """Pinned against the committed assets:
    <s> <|user|> \\n sort : ␣3 ␣1 ␣2 </s> \\n <|assistant|> \\n | 1 ␣2 ␣3 </s>."""
    out = tokenize(tiny, Pair(user("sort: 3 1 2"), "1 2 3", "3"))
    assert out.chosen_ids == [0, 5, 205, 288, 32, 282, 284, 283, 1, 205, 6, 205, 23, 283, 282, 1]
    assert out.chosen_prompt_len == out.rejected_prompt_len == 12
    assert out.rejected_ids[12:] == [raw_ids(tiny, "3")[0], 1]


# ---- a tokenizer that merges across the boundary ------------------------------------------


def test_merged_boundary_token_goes_to_the_response() -> None:
    tok = char_tokenizer(EOS_TEMPLATE, merges=(("\n", "h"),))
    merged, newline = tok.convert_tokens_to_ids("\nh"), tok.convert_tokens_to_ids("\n")
    prompt = user("what?")
    prompt_ids = raw_ids(tok, render(tok, prompt, True))
    assert prompt_ids[-1] == newline
    out = tokenize(tok, Pair(prompt, "hi", "yo"))
    (cp, cr), (rp, rr) = sides(out)

    full_chosen = raw_ids(tok, render(tok, prompt + [{"role": "assistant", "content": "hi"}], False))
    assert full_chosen[len(prompt_ids) - 1] == merged  # "\n" + "h" is one token in the full chat
    assert cp + cr == full_chosen[:-1]  # exactly the full chat's ids (the trailing "\n" dropped)
    assert cp == prompt_ids[:-1]  # the prompt gives its final "\n" up to the merged token
    assert cr == [merged, tok.convert_tokens_to_ids("i"), tok.eos_token_id]
    assert out.chosen_prompt_len == len(prompt_ids) - 1

    # The rejected answer does not merge: its prompt is the whole rendered prompt.
    full_rejected = raw_ids(tok, render(tok, prompt + [{"role": "assistant", "content": "yo"}], False))
    assert rp == prompt_ids and rp + rr == full_rejected[:-1]
    assert tok.decode(rr) == "yo</s>"


# ---- BOS --------------------------------------------------------------------------------------


def test_exactly_one_bos_when_tokenizer_and_template_both_write_it(tiny: PreTrainedTokenizerFast) -> None:
    bos = tiny.bos_token_id
    assert tiny("a")["input_ids"][0] == bos  # the tokenizer adds one ...
    assert render(tiny, user("x"), True).startswith("<s>")  # ... and the template writes one
    out = tokenize(tiny, Pair(user("sort: 5 4"), "4 5", "5 4"))
    for ids in (out.chosen_ids, out.rejected_ids):
        assert ids[0] == bos and ids.count(bos) == 1


def test_bos_added_once_when_only_the_tokenizer_adds_it() -> None:
    tok = char_tokenizer(EOS_TEMPLATE, adds_bos=True)
    assert tok("a")["input_ids"] == [0, tok.convert_tokens_to_ids("a")]
    out = tokenize(tok, Pair(user("why?"), "yes", "no"))
    prompt_ids = raw_ids(tok, render(tok, user("why?"), True))
    assert out.chosen_ids[: out.chosen_prompt_len] == [0] + prompt_ids
    for ids in (out.chosen_ids, out.rejected_ids):
        assert ids.count(0) == 1


def test_no_bos_when_neither_tokenizer_nor_template_adds_it() -> None:
    tok = char_tokenizer(EOS_TEMPLATE)
    assert tok.bos_token_id == 0 and tok("a")["input_ids"] == [tok.convert_tokens_to_ids("a")]
    out = tokenize(tok, Pair(user("why?"), "yes", "no"))
    assert out.chosen_ids[: out.chosen_prompt_len] == raw_ids(tok, render(tok, user("why?"), True))
    assert 0 not in out.chosen_ids and 0 not in out.rejected_ids


# ---- EOS / end of turn ------------------------------------------------------------------------


def test_each_response_ends_with_exactly_one_eos(tiny: PreTrainedTokenizerFast) -> None:
    out = tokenize(tiny, Pair(user("max: 1 7 3"), "7", "3"))
    for _, response in sides(out):
        assert response[-1] == tiny.eos_token_id and response.count(tiny.eos_token_id) == 1


def test_template_without_eos_still_ends_responses_with_eos() -> None:
    tok = char_tokenizer(NO_EOS_TEMPLATE)
    eos = tok.eos_token_id
    assert "</s>" not in render(tok, user("q") + [{"role": "assistant", "content": "yo"}], False)
    out = tokenize(tok, Pair(user("q?"), "yo ok", "no"))
    for (_, response), answer in zip(sides(out), ("yo ok", "no"), strict=True):
        assert response == raw_ids(tok, answer) + [eos]  # the template's trailing "\n" dropped


def test_end_of_turn_special_token_closes_the_response_without_extra_eos() -> None:
    tok = char_tokenizer(IM_END_TEMPLATE, im_end_special=True)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tok.all_special_ids
    out = tokenize(tok, Pair(user("q?"), "yo ok", "no"))
    for (_, response), answer in zip(sides(out), ("yo ok", "no"), strict=True):
        assert response == raw_ids(tok, answer) + [im_end]
        assert tok.eos_token_id not in response


# ---- truncation -------------------------------------------------------------------------------

LONG_QUESTION = "sort: " + " ".join(str(i % 10) for i in range(40))
LONG_ANSWER = " ".join(str(i % 10) for i in range(30))


def test_long_prompt_keeps_its_end_and_bos_and_responses_are_cut(tiny: PreTrainedTokenizerFast) -> None:
    pair = Pair(user(LONG_QUESTION), LONG_ANSWER, "9")
    whole = tokenize(tiny, pair, max_length=10_000, max_prompt_length=10_000)
    (full_prompt, full_chosen), (_, full_rejected) = sides(whole)
    assert len(full_prompt) > 40 and len(full_chosen) > 30 and len(full_rejected) == 2

    max_length, max_prompt_length = 20, 8
    out = tokenize(tiny, pair, max_length=max_length, max_prompt_length=max_prompt_length)
    (cp, cr), (rp, rr) = sides(out)
    assert out.chosen_prompt_len == out.rejected_prompt_len == max_prompt_length
    assert cp == rp == [tiny.bos_token_id] + full_prompt[-(max_prompt_length - 1) :]
    assert cr == full_chosen[: max_length - max_prompt_length]  # cut: 12 tokens, no EOS
    assert len(out.chosen_ids) == max_length and tiny.eos_token_id not in cr
    assert rr == full_rejected  # fits: kept whole, still ending with EOS
    assert rr[-1] == tiny.eos_token_id


def test_prompt_kept_whole_when_prompt_plus_longest_response_fits(tiny: PreTrainedTokenizerFast) -> None:
    pair = Pair(user(LONG_QUESTION), "1 2", "2 1")
    whole = tokenize(tiny, pair, max_length=10_000, max_prompt_length=10_000)
    out = tokenize(tiny, pair, max_length=len(whole.chosen_ids), max_prompt_length=8)
    assert out == whole and out.chosen_prompt_len > 8


def test_short_prompt_is_kept_and_long_response_is_cut(tiny: PreTrainedTokenizerFast) -> None:
    pair = Pair(user("sort: 1"), LONG_ANSWER, "1")
    whole = tokenize(tiny, pair, max_length=10_000, max_prompt_length=10_000)
    plen = whole.chosen_prompt_len
    out = tokenize(tiny, pair, max_length=plen + 5, max_prompt_length=plen)
    assert out.chosen_ids == whole.chosen_ids[: plen + 5] and out.chosen_prompt_len == plen
    assert out.chosen_ids[-1] != tiny.eos_token_id
    assert out.rejected_ids == whole.rejected_ids


# ---- bad rows ---------------------------------------------------------------------------------


def conv(prompt: list[dict[str, Any]], chosen: Any, rejected: Any) -> dict[str, Any]:
    return {
        "chosen": prompt + [{"role": "assistant", "content": chosen}],
        "rejected": prompt + [{"role": "assistant", "content": rejected}],
    }


BAD_ROWS: list[dict[str, Any]] = [
    {"prompt": "sort: 2 1", "chosen": "1 2", "rejected": "2 1"},  # 0 kept
    {"prompt": "sort: 2 1", "chosen": "1 2"},  # 1 missing_field (no `rejected`)
    {"prompt": None, "chosen": "1 2", "rejected": "2 1"},  # 2 missing_field (None)
    {"prompt": "sort: 2 1", "chosen": 12, "rejected": "2 1"},  # 3 non_string_content
    conv([{"role": "tool", "content": "sort: 2 1"}], "1 2", "2 1"),  # 4 unknown_role
    {"prompt": "sort: 2 1", "chosen": "", "rejected": "2 1"},  # 5 empty_response
    {"prompt": "sort: 2 1", "chosen": "1 2", "rejected": " \n\t "},  # 6 empty_response (whitespace)
    {"prompt": "sort: 2 1", "chosen": "1 2", "rejected": "1 2 "},  # 7 identical_responses
    {  # 8 prompt_mismatch
        "chosen": user("sort: 2 1") + [{"role": "assistant", "content": "1 2"}],
        "rejected": user("sort: 3 1") + [{"role": "assistant", "content": "3 1"}],
    },
    {  # 9 no_assistant_answer
        "chosen": user("sort: 2 1") + [{"role": "user", "content": "1 2"}],
        "rejected": user("sort: 2 1") + [{"role": "user", "content": "2 1"}],
    },
    {"prompt": "   ", "chosen": "1 2", "rejected": "2 1"},  # 10 empty_prompt
    conv(user("max: 2 9"), "9", "2"),  # 11 kept
    conv(user("max: 2 9"), ["9"], "2"),  # 12 non_string_content
    {"prompt": "sort: 2 1", "chosen": "1 2", "rejected": None},  # 13 missing_field (None)
    conv([{"role": "system", "content": "Be brief."}], "9", "2"),  # 14 empty_prompt (no user turn)
]
BAD_SKIPPED = {
    "missing_field": 3,
    "non_string_content": 2,
    "unknown_role": 1,
    "empty_response": 2,
    "identical_responses": 1,
    "prompt_mismatch": 1,
    "no_assistant_answer": 1,
    "empty_prompt": 2,
}
BAD_EXAMPLE = {
    "missing_field": 1,
    "non_string_content": 3,
    "unknown_role": 4,
    "empty_response": 5,
    "identical_responses": 7,
    "prompt_mismatch": 8,
    "no_assistant_answer": 9,
    "empty_prompt": 10,
}


def check_bad_rows_split(split: PreferenceSplit) -> None:
    assert split.skipped == BAD_SKIPPED
    assert split.skipped_example == BAD_EXAMPLE
    assert split.num_rows == len(BAD_ROWS) and split.row_index.tolist() == [0, 11]
    assert sum(split.skipped.values()) + len(split) == len(BAD_ROWS)
    lengths = np.diff(split.offsets)
    assert (lengths - split.prompt_lens > 0).all()  # no kept pair has an empty response


def test_every_bad_row_is_counted_by_reason(tiny: PreTrainedTokenizerFast) -> None:
    reasons = [normalise_row(r) for r in BAD_ROWS]
    assert [r if isinstance(r, str) else "ok" for r in reasons] == [
        "ok", "missing_field", "missing_field", "non_string_content", "unknown_role", "empty_response",
        "empty_response", "identical_responses", "prompt_mismatch", "no_assistant_answer", "empty_prompt",
        "ok", "non_string_content", "missing_field", "empty_prompt",
    ]  # fmt: skip
    check_bad_rows_split(tokenize_rows(BAD_ROWS, PairTokenizer(tiny, 256, 128)))


def test_bad_rows_counted_through_load_split(tiny: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", BAD_ROWS)
    cache = str(tmp_path / "cache")
    check_bad_rows_split(load_split(str(path), "train", tiny, 256, 128, num_proc=1, cache_dir=cache))  # the file
    check_bad_rows_split(load_split(str(tmp_path), "train", tiny, 256, 128, num_proc=1, cache_dir=cache))  # its dir


def test_prompt_that_leaves_no_room_for_a_response_is_counted(tiny: PreTrainedTokenizerFast) -> None:
    rows = [
        {"prompt": LONG_QUESTION, "chosen": "1", "rejected": "2"},
        {"prompt": "max: 1 2", "chosen": "2", "rejected": "1"},
    ]
    split = tokenize_rows(rows, PairTokenizer(tiny, max_length=12, max_prompt_length=12))
    assert split.skipped == {"prompt_too_long": 1} and split.skipped_example == {"prompt_too_long": 0}
    assert split.row_index.tolist() == [1]


# ---- both data formats ------------------------------------------------------------------------


def test_conversational_and_plain_rows_give_the_same_tokens(tiny: PreTrainedTokenizerFast) -> None:
    system = {"role": "system", "content": "Answer with digits only."}
    question = "sort: 4 1 3"
    rows = [
        {"prompt": question, "chosen": "1 3 4", "rejected": "1 4 3"},  # plain
        {  # UltraFeedback-like: prompt string + full conversations, extra columns
            "prompt": question,
            "prompt_id": "abc",
            "score_chosen": 8.0,
            "score_rejected": 3.0,
            **conv(user(question), "1 3 4", "1 4 3"),
        },
        {"prompt": question, **conv([], "1 3 4", "1 4 3")},  # lists hold only the answer
        {"prompt": question, "system": system["content"], "chosen": "1 3 4", "rejected": "1 4 3"},
        {"prompt": question, **conv([system, *user(question)], "1 3 4", "1 4 3")},
    ]
    split = tokenize_rows(rows, PairTokenizer(tiny, 256, 128))
    assert len(split) == 5 and not split.skipped
    pairs = [split[i] for i in range(5)]

    def key(p: dict[str, Any]) -> tuple[Any, ...]:
        return (p["chosen_ids"].tolist(), p["chosen_prompt_len"], p["rejected_ids"].tolist(), p["rejected_prompt_len"])

    assert key(pairs[0]) == key(pairs[1]) == key(pairs[2])
    assert key(pairs[3]) == key(pairs[4])
    assert key(pairs[3]) != key(pairs[0])
    expected = tokenize(tiny, Pair([system, *user(question)], "1 3 4", "1 4 3"))
    assert key(pairs[3]) == (
        expected.chosen_ids,
        expected.chosen_prompt_len,
        expected.rejected_ids,
        expected.rejected_prompt_len,
    )


# ---- errors -----------------------------------------------------------------------------------


def test_no_usable_rows_is_an_error_naming_the_reasons(tiny: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    rows = [BAD_ROWS[1], BAD_ROWS[7], BAD_ROWS[1]]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_split(str(path), "train", tiny, 256, 128, cache_dir=str(tmp_path))
    message = str(err.value)
    assert "none of its 3 rows is usable" in message
    assert "identical_responses: 1 (e.g. row 1)" in message and "missing_field: 2 (e.g. row 0)" in message


def test_columns_fitting_no_format_are_listed(tiny: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}, {"text": "t"}])
    with pytest.raises(DataError, match=r"columns \['answer', 'question', 'text'\].*fit no accepted format"):
        load_split(str(path), "train", tiny, 256, 128, cache_dir=str(tmp_path))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("latin1.jsonl", '{"prompt": "caf\xe9"}\n'.encode("latin-1"), "not UTF-8 text"),
        ("empty.jsonl", b"", "is empty"),
        ("blank.jsonl", b"\n  \n", "is empty"),
        ("rows.csv", b"prompt,chosen,rejected\nq,a,b\n", r"cannot read \.csv files; expected \.jsonl, \.json"),
        ("broken.jsonl", b'{"prompt": "q"}\n{oops\n', "line 2 is not valid JSON"),
    ],
)
def test_unreadable_files_raise_data_error(
    tiny: PreTrainedTokenizerFast, tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_split(str(path), "train", tiny, 256, 128, cache_dir=str(tmp_path))


def test_missing_path_raises_data_error(tiny: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    for missing in (tmp_path / "nope.jsonl", tmp_path / "no_such_dir"):
        with pytest.raises(DataError, match=f"Data file '{missing}' does not exist"):
            load_split(str(missing), "train", tiny, 256, 128, cache_dir=str(tmp_path))


def test_read_rows_finds_the_split_in_a_directory(tmp_path: Path) -> None:
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows + rows)
    got, source = read_rows(str(tmp_path), "train")
    assert got == rows and source.startswith("file:") and "train.jsonl" in source
    assert read_rows(str(tmp_path), "test")[0] == rows + rows
    with pytest.raises(DataError, match=r"Split 'validation' not found.*found \['test.jsonl', 'train.jsonl'\]"):
        read_rows(str(tmp_path), "validation")


def test_json_array_file_is_read(tmp_path: Path) -> None:
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "r", "chosen": "c", "rejected": "d"}]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows, indent=2))
    assert read_rows(str(path), "train")[0] == rows


# ---- cache ------------------------------------------------------------------------------------


def test_second_load_comes_from_the_cache(
    tiny: PreTrainedTokenizerFast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = sort_rows(30) + BAD_ROWS[1:3]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cache = tmp_path / "cache"
    first = load_split(str(data), "train", tiny, 64, 16, num_proc=1, cache_dir=str(cache))
    assert len(list(cache.glob("*.npz"))) == 1
    assert len(first) == 30 and first.skipped == {"missing_field": 2}

    def refuse(*args: Any, **kwargs: Any) -> PreferenceSplit:
        raise AssertionError("tokenize_rows called: the cache was not used")

    monkeypatch.setattr(data_module, "tokenize_rows", refuse)
    second = load_split(str(data), "train", tiny, 64, 16, num_proc=1, cache_dir=str(cache))
    assert split_arrays(second) == split_arrays(first)

    monkeypatch.undo()
    third = load_split(str(data), "train", tiny, 24, 16, num_proc=1, cache_dir=str(cache))
    assert len(list(cache.glob("*.npz"))) == 2  # a new budget is a new entry, tokenised afresh
    assert split_arrays(third) == split_arrays(tokenize_rows(rows, PairTokenizer(tiny, 24, 16)))
    assert split_arrays(third)["tokens"] != split_arrays(first)["tokens"]


def _im_end_not_special() -> PreTrainedTokenizerFast:
    """char_tokenizer with "<|im_end|>" an ordinary added token (tokenizer.json's special: false)."""
    spec = json.loads(char_tokenizer(IM_END_TEMPLATE).backend_tokenizer.to_str())
    for added in spec["added_tokens"]:
        if added["content"] == "<|im_end|>":
            added["special"] = False
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tok.chat_template = IM_END_TEMPLATE
    return tok


def test_cache_key_changes_with_the_end_of_turn_tokens(tmp_path: Path) -> None:
    rows = [{"prompt": "q?", "chosen": "yo", "rejected": "no"}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    unregistered = _im_end_not_special()  # "<|im_end|>" is then content: EOS is appended
    registered = char_tokenizer(IM_END_TEMPLATE, im_end_special=True)
    expected = tokenize_rows(rows, PairTokenizer(registered, 64, 32))
    assert split_arrays(expected) != split_arrays(tokenize_rows(rows, PairTokenizer(unregistered, 64, 32)))
    load_split(str(data), "train", unregistered, 64, 32, cache_dir=str(tmp_path / "cache"))
    got = load_split(str(data), "train", registered, 64, 32, cache_dir=str(tmp_path / "cache"))
    assert split_arrays(got) == split_arrays(expected)


# ---- parallel tokenisation -------------------------------------------------------------------


def test_two_processes_give_the_same_split_as_one(tiny: PreTrainedTokenizerFast) -> None:
    rows = sort_rows(200)
    for i, bad in zip((3, 50, 51, 199), BAD_ROWS[1:5], strict=True):
        rows.insert(i, bad)
    pair_tokenizer = PairTokenizer(tiny, 24, 16)  # some pairs are truncated
    one = tokenize_rows(rows, pair_tokenizer, num_proc=1)
    two = tokenize_rows(rows, pair_tokenizer, num_proc=2)
    assert split_arrays(two) == split_arrays(one)
    assert len(one) == 200
    assert one.skipped_example == {"missing_field": 3, "non_string_content": 51, "unknown_role": 199}


def test_worker_processes_end_without_a_signal(tiny: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    """The trainer's StopRequest (installed before the data loads) records SIGTERM and goes on, and the
    tokenising workers inherit it: a pool ended by SIGTERM (`with Pool`: terminate) could wait forever
    for a worker that ignored it. Here a handler like it notes every SIGTERM a worker receives."""

    def note(signum: int, frame: Any) -> None:
        (tmp_path / f"sigterm.{os.getpid()}").touch()

    previous = signal.signal(signal.SIGTERM, note)
    try:
        rows = sort_rows(64)
        for _ in range(5):
            split = tokenize_rows(rows, PairTokenizer(tiny, 24, 16), num_proc=2)
            assert len(split) == 64
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sorted(p.name for p in tmp_path.glob("sigterm.*")) == []


# ---- sampling and token counts ---------------------------------------------------------------


def take(n: int, num_pairs: int, batch_size: int, seed: int) -> list[tuple[int, list[int]]]:
    it = global_batches(num_pairs, batch_size, seed)
    return [(epoch, batch.tolist()) for epoch, batch in (next(it) for _ in range(n))]


def test_global_batches_are_seeded_full_permutations() -> None:
    batches = take(9, num_pairs=10, batch_size=3, seed=7)
    assert batches == take(9, num_pairs=10, batch_size=3, seed=7)
    assert batches != take(9, num_pairs=10, batch_size=3, seed=8)
    assert [epoch for epoch, _ in batches] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # the tail of 1 pair is dropped
    assert all(len(b) == 3 for _, b in batches)
    for epoch in range(3):
        seen = [i for e, b in batches if e == epoch for i in b]
        assert len(set(seen)) == 9 and set(seen) <= set(range(10))
    exact = take(6, num_pairs=8, batch_size=4, seed=0)
    for epoch in range(3):
        assert sorted(i for e, b in exact if e == epoch for i in b) == list(range(8))
    assert [b for e, b in exact if e == 0] != [b for e, b in exact if e == 1]  # reshuffled every epoch
    with pytest.raises(DataError, match="fewer than global_batch_size=4"):
        global_batches(3, 4, 0)  # raised when called, before any step


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_nll_token_count_matches_the_collator(tiny: PreTrainedTokenizerFast, nll_on_prompt: bool) -> None:
    split = tokenize_rows(sort_rows(12), PairTokenizer(tiny, 24, 16))
    collate = PairCollator(tiny.pad_token_id, nll_on_prompt=nll_on_prompt)
    indices = np.array([5, 0, 11, 3])
    batch = collate([split[int(i)] for i in indices])
    assert int(batch["num_nll_tokens"]) == nll_token_count(split, indices, nll_on_prompt)
    by_hand = sum(
        len(split[int(i)]["chosen_ids"]) - (1 if nll_on_prompt else split[int(i)]["chosen_prompt_len"]) for i in indices
    )
    assert nll_token_count(split, indices, nll_on_prompt) == by_hand
    # Split into two micro-batches, the counts add up.
    halves = [collate([split[int(i)] for i in part]) for part in (indices[:2], indices[2:])]
    assert sum(int(b["num_nll_tokens"]) for b in halves) == by_hand


def test_explicit_prompt_message_list_is_accepted() -> None:
    """TRL's explicit-prompt conversational format: `prompt` is a message list, the answers hold only
    the assistant turn. It means the same pair as the plain-string row."""
    explicit = {
        "prompt": [{"role": "user", "content": "sort: 3 1"}],
        "chosen": [{"role": "assistant", "content": "1 3"}],
        "rejected": [{"role": "assistant", "content": "3 1"}],
    }
    assert normalise_row(explicit) == normalise_row({"prompt": "sort: 3 1", "chosen": "1 3", "rejected": "3 1"})
    assert normalise_row({**explicit, "prompt": [{"role": "robot", "content": "x"}]}) == "unknown_role"


# ---- edge cases of reading (issue 10) ----------------------------------------------------------------


@pytest.mark.parametrize("breaker", ["\u2028", "\u2029", "\x85"])
def test_json_lines_split_on_newline_only(tmp_path: Path, breaker: str) -> None:
    """U+2028, U+2029 and U+0085 are legal unescaped inside JSON strings; str.splitlines broke the
    line there and the file was refused as invalid JSON."""
    rows = sort_rows(3)
    rows[1]["chosen"][-1]["content"] += f" {breaker}end"
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    assert breaker in path.read_text(encoding="utf-8")
    got = read_file(path)
    assert got == rows and got[1]["chosen"][-1]["content"].endswith(f"{breaker}end")


def test_a_lone_surrogate_row_is_skipped_as_unencodable_text(tiny: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    """A JSON "\\ud800" escape decodes to a string no tokenizer encodes; the run died with TypeError."""
    rows = sort_rows(4)
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[2] = lines[2].replace('"content": "sort:', '"content": "\\ud800 sort:')  # the prompt, on both sides
    assert "\\ud800" in lines[2]
    path.write_text("".join(line + "\n" for line in lines))
    split = load_split(str(path), "train", tiny, 256, 128, num_proc=1, cache_dir=str(tmp_path / "cache"))
    assert split.skipped == {"unencodable_text": 1} and split.skipped_example == {"unencodable_text": 2}
    assert split.row_index.tolist() == [0, 1, 3]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_deeply_nested_json_is_a_clear_error(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"train{suffix}"
    row = json.dumps(sort_rows(1)[0])
    deep = '{"chosen": ' + "[" * 100_000 + "]" * 100_000 + "}"
    text = f"[{row}, {deep}]" if suffix == ".json" else f"{row}\n{deep}\n"
    path.write_text(text)
    with pytest.raises(DataError) as raised:
        read_file(path)
    where = f"{path}: " if suffix == ".json" else f"{path}: line 2: "
    assert str(raised.value).startswith(where + "its JSON is nested too deeply to read"), raised.value


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "wrong_arrays"])
def test_a_damaged_cache_file_is_named_and_rebuilt(tiny: PreTrainedTokenizerFast, tmp_path: Path, damage: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sort_rows(20)))
    cache = tmp_path / "cache"
    first = load_split(str(path), "train", tiny, 256, 128, num_proc=1, cache_dir=str(cache))
    (cached,) = cache.glob("*.npz")
    good = cached.read_bytes()
    if damage == "truncated":
        cached.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        cached.write_bytes(b"\x00" * len(good))
    elif damage == "empty":
        cached.write_bytes(b"")
    else:  # a valid npz whose arrays disagree
        np.savez(
            cached,
            tokens=first.tokens,
            offsets=first.offsets[:-3],
            prompt_lens=first.prompt_lens,
            row_index=first.row_index,
            meta=np.array(json.dumps({"num_rows": 20})),
        )
    with pytest.warns(
        UserWarning, match=f"tokenised-data cache {cached} is damaged .*; tokenising again and rewriting"
    ):
        again = load_split(str(path), "train", tiny, 256, 128, num_proc=1, cache_dir=str(cache))
    for name in ("tokens", "offsets", "prompt_lens", "row_index"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    rewritten = PreferenceSplit.load(cached)  # rewritten whole
    np.testing.assert_array_equal(rewritten.offsets, first.offsets)


def test_load_split_records_the_datas_sha256(tiny: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sort_rows(5)))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for _ in range(2):  # tokenised, then from the cache
        split = load_split(str(path), "train", tiny, 256, 128, num_proc=1, cache_dir=str(tmp_path / "cache"))
        assert split.source == f"file:{path.resolve()}:{digest}"
