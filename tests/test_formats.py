"""The data formats users bring from the hub, read from local JSONL files written here: each is
detected automatically, can be forced with `data_format`, and columns can be renamed with
`column_map`. Every format must give exactly the tokens of the `Pair` it means, so the same
conversation written in any format trains the same."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from orpo.data import (
    DATA_FORMATS,
    DataError,
    Pair,
    PairTokenizer,
    PreferenceSplit,
    Tokenized,
    load_split,
    normalise_row,
    parse_hh_transcript,
    tokenize_rows,
)
from tests.conftest import TINY

SYSTEM = "You are a careful assistant."


@pytest.fixture(scope="module")
def tiny() -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(TINY)


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def load(tok: Any, path: str, tmp_path: Path, **kwargs: Any) -> PreferenceSplit:
    return load_split(path, "train", tok, 256, 128, num_proc=1, cache_dir=str(tmp_path / "cache"), **kwargs)


def pairs_of(split: PreferenceSplit) -> list[Tokenized]:
    return [
        Tokenized(
            p["chosen_ids"].tolist(), p["chosen_prompt_len"], p["rejected_ids"].tolist(), p["rejected_prompt_len"]
        )
        for p in (split[i] for i in range(len(split)))
    ]


def expected(tok: Any, *pairs: Pair) -> list[Tokenized]:
    pair_tokenizer = PairTokenizer(tok, 256, 128)
    return [pair_tokenizer(p) for p in pairs]


# One multi-turn conversation, and the pair it means: the prompt is every turn before the answers.
TURNS = [msg("user", "sort: 3 1 2"), msg("assistant", "1 2 3"), msg("user", "now max: 3 1 2")]
MULTI_TURN = Pair(TURNS, "3", "2")
SINGLE_TURN = Pair([msg("user", "sort: 4 1 3")], "1 3 4", "1 4 3")


# ---- (1) explicit prompt + message lists: UltraFeedback-binarized -----------------------------


def ultrafeedback_row(pair: Pair) -> dict[str, Any]:
    """HuggingFaceH4/ultrafeedback_binarized: a prompt string, full conversations, scores."""
    return {
        "prompt": pair.prompt[-1]["content"],
        "prompt_id": "0f1e",
        "chosen": pair.prompt + [msg("assistant", pair.chosen)],
        "rejected": pair.prompt + [msg("assistant", pair.rejected)],
        "messages": pair.prompt + [msg("assistant", pair.chosen)],
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }


def test_ultrafeedback_binarized(tiny: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "uf.jsonl", [ultrafeedback_row(SINGLE_TURN), ultrafeedback_row(MULTI_TURN)])
    split = load(tiny, path, tmp_path)
    assert not split.skipped
    assert pairs_of(split) == expected(tiny, SINGLE_TURN, MULTI_TURN)


# ---- (2) message lists only: Argilla's binarized Capybara -------------------------------------


def capybara_row(prompt: list[dict[str, str]], chosen: str, rejected: str) -> dict[str, Any]:
    """argilla/distilabel-capybara-dpo-7k-binarized: `chosen`/`rejected` are whole (multi-turn)
    conversations; `prompt` holds only the last user turn; extra columns around."""
    return {
        "source": "Airoboros",
        "conversation": [{"input": m["content"], "output": "..."} for m in prompt if m["role"] == "user"],
        "prompt": prompt[-1]["content"],
        "chosen": prompt + [msg("assistant", chosen)],
        "chosen_rating": 5,
        "chosen_model": "gpt-4-1106-preview",
        "rejected": prompt + [msg("assistant", rejected)],
        "rejected_rating": 2,
        "rejected_model": "notus-7b-v1",
    }


def test_capybara_prompt_is_the_shared_leading_messages(tiny: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    diverging = capybara_row(TURNS, "3", "2")
    diverging["rejected"][1] = msg("assistant", "3 2 1")  # an earlier turn differs: no shared prompt
    rows = [capybara_row(TURNS, "3", "2"), capybara_row(SINGLE_TURN.prompt, "1 3 4", "1 4 3"), diverging]
    split = load(tiny, write_jsonl(tmp_path / "capybara.jsonl", rows), tmp_path)
    assert split.skipped == {"prompt_mismatch": 1} and split.skipped_example == {"prompt_mismatch": 2}
    assert pairs_of(split) == expected(tiny, MULTI_TURN, SINGLE_TURN)
    # The multi-turn prompt keeps every earlier turn, not only the `prompt` column's last question.
    assert normalise_row(rows[0]) == MULTI_TURN


# ---- (3) plain strings: Intel's orca_dpo_pairs --------------------------------------------------


def test_orca_dpo_pairs_question_and_system(tiny: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    rows = [
        {"system": SYSTEM, "question": "sort: 4 1 3", "chosen": "1 3 4", "rejected": "1 4 3"},
        {"system": "", "question": "sort: 4 1 3", "chosen": "1 3 4", "rejected": "1 4 3"},  # empty: no system turn
    ]
    split = load(tiny, write_jsonl(tmp_path / "orca.jsonl", rows), tmp_path)
    with_system = Pair([msg("system", SYSTEM), *SINGLE_TURN.prompt], "1 3 4", "1 4 3")
    assert not split.skipped
    assert pairs_of(split) == expected(tiny, with_system, SINGLE_TURN)
    assert pairs_of(split)[0] != pairs_of(split)[1]


def test_prompt_column_wins_over_question(tiny: PreTrainedTokenizerFast) -> None:
    row = {"prompt": "sort: 4 1 3", "question": "ignored", "chosen": "1 3 4", "rejected": "1 4 3"}
    assert normalise_row(row) == SINGLE_TURN


def test_hh_prompt_transcript_with_bare_answers_is_split_into_turns() -> None:
    """Dahoas/full-hh-rlhf writes the prompt as a transcript ending in "Assistant:" and the bare answers."""
    row = {
        "prompt": "\n\nHuman: sort: 3 1 2\n\nAssistant: 1 2 3\n\nHuman: now max: 3 1 2\n\nAssistant:",
        "chosen": " 3",
        "rejected": " 2",
    }
    assert normalise_row(row) == Pair(TURNS, " 3", " 2")


# ---- (4) Anthropic HH transcripts ---------------------------------------------------------------


def hh(*turns: tuple[str, str]) -> str:
    return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns)


HH_PROMPT = (("Human", "sort: 3 1 2"), ("Assistant", "1 2 3"), ("Human", "now max: 3 1 2"))


def test_hh_transcripts_split_into_prompt_turns_and_final_answers(
    tiny: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    rows = [
        {"chosen": hh(*HH_PROMPT, ("Assistant", "3")), "rejected": hh(*HH_PROMPT, ("Assistant", "2"))},
        {  # single turn; the first turn without its leading blank line, as some copies write it
            "chosen": "Human: sort: 4 1 3\n\nAssistant: 1 3 4",
            "rejected": hh(("Human", "sort: 4 1 3"), ("Assistant", "1 4 3")),
        },
        {  # the shared prefix differs
            "chosen": hh(*HH_PROMPT, ("Assistant", "3")),
            "rejected": hh(
                ("Human", "sort: 3 1 2"), ("Assistant", "3 2 1"), ("Human", "now max: 3 1 2"), ("Assistant", "2")
            ),
        },
        {"chosen": hh(*HH_PROMPT, ("Assistant", "3")), "rejected": hh(*HH_PROMPT) + "\n\nAssistant:"},  # empty answer
        {"chosen": hh(*HH_PROMPT, ("Assistant", "3")), "rejected": hh(*HH_PROMPT)},  # ends on the human's turn
    ]
    split = load(tiny, write_jsonl(tmp_path / "hh.jsonl", rows), tmp_path)
    assert split.skipped == {"prompt_mismatch": 1, "empty_response": 1, "no_assistant_answer": 1}
    assert split.skipped_example == {"prompt_mismatch": 2, "empty_response": 3, "no_assistant_answer": 4}
    assert pairs_of(split) == expected(tiny, MULTI_TURN, SINGLE_TURN)


def test_parse_hh_transcript_keeps_text_that_only_mentions_the_speakers() -> None:
    text = hh(("Human", "What does 'Human: hi' mean?\nAssistant: is a label"), ("Assistant", "A transcript.\n"))
    assert parse_hh_transcript(text) == [
        msg("user", "What does 'Human: hi' mean?\nAssistant: is a label"),
        msg("assistant", "A transcript."),
    ]
    assert parse_hh_transcript("Some preface\n\nHuman: hi\n\nAssistant: yo") is None


# ---- one conversation, every format: the same tokens --------------------------------------------


def test_the_same_conversation_in_every_format_gives_the_same_tokens(
    tiny: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """UltraFeedback, Capybara, TRL's explicit prompt list, HH transcripts and (single turn) plain."""
    for pair in (SINGLE_TURN, MULTI_TURN):
        rows = [
            ultrafeedback_row(pair),
            capybara_row(pair.prompt, pair.chosen, pair.rejected),
            {
                "prompt": pair.prompt,
                "chosen": [msg("assistant", pair.chosen)],
                "rejected": [msg("assistant", pair.rejected)],
            },
            {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected},  # prompt list, string answers
            {
                "chosen": hh(*[("Human" if m["role"] == "user" else "Assistant", m["content"]) for m in pair.prompt])
                + f"\n\nAssistant: {pair.chosen}",
                "rejected": hh(*[("Human" if m["role"] == "user" else "Assistant", m["content"]) for m in pair.prompt])
                + f"\n\nAssistant: {pair.rejected}",
            },
        ]
        if len(pair.prompt) == 1:
            rows.append({"question": pair.prompt[0]["content"], "chosen": pair.chosen, "rejected": pair.rejected})
        split = load(tiny, write_jsonl(tmp_path / f"all_{len(pair.prompt)}.jsonl", rows), tmp_path)
        assert not split.skipped
        assert pairs_of(split) == expected(tiny, pair) * len(rows)


# ---- data_format: auto-detection agrees with each forced format; a forced mismatch is refused ----


FORMAT_FILES: dict[str, list[dict[str, Any]]] = {
    "conversational": [ultrafeedback_row(SINGLE_TURN), capybara_row(TURNS, "3", "2")],
    "plain": [{"system": SYSTEM, "question": "sort: 4 1 3", "chosen": "1 3 4", "rejected": "1 4 3"}],
    "hh": [{"chosen": hh(*HH_PROMPT, ("Assistant", "3")), "rejected": hh(*HH_PROMPT, ("Assistant", "2"))}],
}


@pytest.mark.parametrize("data_format", ["conversational", "plain", "hh"])
def test_auto_detection_agrees_with_the_forced_format(
    tiny: PreTrainedTokenizerFast, tmp_path: Path, data_format: str
) -> None:
    path = write_jsonl(tmp_path / f"{data_format}.jsonl", FORMAT_FILES[data_format])
    auto = load(tiny, path, tmp_path)
    forced = load(tiny, path, tmp_path, data_format=data_format)
    assert len(auto) == len(FORMAT_FILES[data_format]) and not auto.skipped
    assert pairs_of(forced) == pairs_of(auto)
    for other in ("conversational", "plain", "hh"):
        if other != data_format:
            with pytest.raises(DataError, match=f"fit no accepted format with data_format={other}"):
                load(tiny, path, tmp_path, data_format=other)


def test_rows_not_in_the_forced_format_are_counted(tiny: PreTrainedTokenizerFast) -> None:
    rows = FORMAT_FILES["conversational"] + FORMAT_FILES["plain"] + FORMAT_FILES["hh"]
    split = tokenize_rows(rows, PairTokenizer(tiny, 256, 128), data_format="conversational")
    assert split.row_index.tolist() == [0, 1] and split.skipped == {"format_mismatch": 2}
    assert tokenize_rows(rows, PairTokenizer(tiny, 256, 128), data_format="hh").skipped == {"format_mismatch": 3}


def test_unknown_data_format_is_refused(tiny: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "plain.jsonl", FORMAT_FILES["plain"])
    with pytest.raises(DataError, match="data_format='sharegpt' is not one of auto, conversational, plain, hh"):
        load(tiny, path, tmp_path, data_format="sharegpt")
    assert DATA_FORMATS == ("auto", "conversational", "plain", "hh")


# ---- a file in an unknown shape ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "columns"),
    [
        ([{"instruction": "q", "output": "a"}], "['instruction', 'output']"),  # SFT data
        ([{"chosen": "1 2", "rejected": "2 1"}], "['chosen', 'rejected']"),  # strings, no prompt, not HH
        ([{"question": "q", "response_j": "a", "response_k": "b"}], "['question', 'response_j', 'response_k']"),
    ],
)
def test_unknown_shape_lists_the_columns_and_the_formats(
    tiny: PreTrainedTokenizerFast, tmp_path: Path, rows: list[dict[str, Any]], columns: str
) -> None:
    with pytest.raises(DataError) as err:
        load(tiny, write_jsonl(tmp_path / "odd.jsonl", rows), tmp_path)
    message = str(err.value)
    assert f"has columns {columns}, which fit no accepted format" in message
    for name in ("conversational:", "plain:", "hh:", "column_map", "data_format"):
        assert name in message, name


# ---- column_map -------------------------------------------------------------------------------


def test_column_map_renames_columns(tiny: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    """lvwerra/stack-exchange-paired style: question, response_j (preferred), response_k."""
    rows = [{"qid": 7, "question": "sort: 4 1 3", "response_j": "1 3 4", "response_k": "1 4 3"}]
    path = write_jsonl(tmp_path / "se.jsonl", rows)
    split = load(tiny, path, tmp_path, column_map={"response_j": "chosen", "response_k": "rejected"})
    assert pairs_of(split) == expected(tiny, SINGLE_TURN)


def test_column_map_is_part_of_the_cache_key(tiny: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    """A renamed column replaces the one of that name, and the two readings are cached apart."""
    rows = [{"prompt": "sort: 4 1 3", "question": "max: 4 1 3", "chosen": "1 3 4", "rejected": "1 4 3"}]
    path = write_jsonl(tmp_path / "both.jsonl", rows)
    as_prompt = load(tiny, path, tmp_path)
    as_question = load(tiny, path, tmp_path, column_map={"question": "prompt"})
    assert pairs_of(as_prompt) == expected(tiny, SINGLE_TURN)
    assert pairs_of(as_question) == expected(tiny, Pair([msg("user", "max: 4 1 3")], "1 3 4", "1 4 3"))
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    load(tiny, path, tmp_path, data_format="plain")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3  # data_format is in the key too


@pytest.mark.parametrize(
    ("column_map", "message"),
    [
        ({"answer": "chosen"}, r"column_map renames \['answer'\], which .* does not have: its columns are"),
        ({"response_j": "best"}, r"renames columns to \['best'\]; each must be one of prompt, chosen, rejected"),
        ({"response_j": "chosen", "response_k": "chosen"}, r"maps several columns to \['chosen'\]"),
    ],
)
def test_bad_column_map_is_refused(
    tiny: PreTrainedTokenizerFast, tmp_path: Path, column_map: dict[str, str], message: str
) -> None:
    path = write_jsonl(tmp_path / "se.jsonl", [{"question": "q", "response_j": "a", "response_k": "b"}])
    with pytest.raises(DataError, match=message):
        load(tiny, path, tmp_path, column_map=column_map)


def test_formats_and_column_map_survive_parallel_tokenisation(tiny: PreTrainedTokenizerFast) -> None:
    rows = [{"q": f"sort: {i} 1", "good": f"1 {i}", "bad": f"{i} 1"} for i in range(2, 10)] * 3
    column_map = {"q": "prompt", "good": "chosen", "bad": "rejected"}
    pair_tokenizer = PairTokenizer(tiny, 256, 128)
    one = tokenize_rows(rows, pair_tokenizer, 1, "plain", column_map)
    two = tokenize_rows(rows, pair_tokenizer, 2, "plain", column_map)
    assert len(one) == len(rows) and not one.skipped
    assert pairs_of(two) == pairs_of(one)
