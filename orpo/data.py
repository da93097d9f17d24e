"""Preference data: read rows, normalise their format, render the chat template, tokenise per spec.

Formats accepted (detected per row, or forced with `data_format`; see FORMATS_ACCEPTED):
  * conversational, as HuggingFaceH4/ultrafeedback_binarized or Capybara: `chosen` and `rejected`
    are message lists ending in the assistant's answer; the messages before it are the prompt (they
    must be the same on both sides). A `prompt` string or message list is used when the lists hold
    only the answer.
  * plain strings: `prompt` (or `question`), `chosen`, `rejected` (and an optional `system`).
  * hh: Anthropic HH transcripts, split into the prompt turns and the final answers.

Tokenisation (../shared/ORPO_SPEC.md): the prompt is rendered with `add_generation_prompt=True`,
each response as the full chat minus that prompt, so prompt + response tokens are exactly the full
chat's tokens. Where a tokenizer merges across the boundary, the merged token goes to the response.
Exactly one BOS when the tokenizer adds one; each response ends with EOS or the template's
end-of-turn special token (whitespace the template writes after it is dropped: generation stops at
the EOS and never produces it). Over budget, the prompt keeps its end (and its BOS), then each
response is cut to fit; a cut response loses its EOS, so the model is never taught to stop
mid-answer. Rows that cannot be used are skipped and counted by reason.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMATS_ACCEPTED = (
    "conversational: `chosen`/`rejected` message lists [{role, content}, ...] ending with the assistant's answer, "
    "the messages before it being the prompt (as argilla/distilabel-capybara-dpo-7k-binarized), or holding only "
    "the answer with a `prompt` string or message list (as HuggingFaceH4/ultrafeedback_binarized); "
    "plain: `prompt` (or `question`), `chosen`, `rejected` strings, optional `system` (as Intel/orca_dpo_pairs); "
    "hh: `chosen`/`rejected` transcripts of '\\n\\nHuman: ...' and '\\n\\nAssistant: ...' turns (as Anthropic/hh-rlhf)"
)
DATA_FORMATS = ("auto", "conversational", "plain", "hh")
CANONICAL_COLUMNS = ("prompt", "chosen", "rejected", "system")  # what `column_map` may rename columns to
ROLES = ("system", "user", "assistant")
LOCAL_EXTENSIONS = (".jsonl", ".json", ".parquet")
_CACHE_VERSION = 1  # bump when tokenisation changes, to invalidate caches


class DataError(ValueError):
    """Data that cannot be trained on; the message says what was found and what is expected."""


# ---- reading rows --------------------------------------------------------------------------------


def read_rows(dataset: str, split: str) -> tuple[list[dict[str, Any]], str]:
    """Rows of one split, and a fingerprint of their source (for the tokenisation cache).

    `dataset` is a directory holding `<split>.jsonl|.json|.parquet`, a single such file (the
    training data; a `split` that names another file reads that one), or a hub data set name.
    """
    path = Path(dataset)
    if path.is_dir():
        candidates = [path / f"{split}{ext}" for ext in LOCAL_EXTENSIONS]
        found = [c for c in candidates if c.is_file()]
        if not found:
            present = sorted(p.name for p in path.iterdir() if p.suffix in LOCAL_EXTENSIONS)
            raise DataError(
                f"Split {split!r} not found in {dataset}: expected one of "
                f"{', '.join(c.name for c in candidates)}; found {present or 'no data files'}."
            )
        return read_file(found[0]), _file_fingerprint(found[0])
    if path.is_file():
        target = Path(split) if Path(split).is_file() else path
        return read_file(target), _file_fingerprint(target)
    if path.suffix in LOCAL_EXTENSIONS or dataset.startswith((".", "/")):
        raise DataError(f"Data file {dataset!r} does not exist.")
    return _read_hub(dataset, split)


def read_file(path: Path) -> list[dict[str, Any]]:
    """Rows of a local .jsonl, .json (a list, or JSON lines) or .parquet file."""
    suffix = path.suffix.lower()
    if suffix not in LOCAL_EXTENSIONS:
        raise DataError(
            f"{path}: cannot read {suffix or 'extension-less'} files; expected {', '.join(LOCAL_EXTENSIONS)}."
        )
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: not a readable Parquet file ({err}).") from err
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); re-encode it as UTF-8.") from err
    if not text.strip():
        raise DataError(f"{path} is empty: expected preference rows ({FORMATS_ACCEPTED}).")
    rows = _parse_json_text(path, text)
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: row {bad} is a {type(rows[bad]).__name__}, expected a JSON object per row.")
    return rows


def _parse_json_text(path: Path, text: str) -> list[Any]:
    """A JSON array (.json starting with `[`), else JSON Lines. Lines end at "\n" only (a "\r" before
    it is JSON whitespace): U+2028, U+0085 and the other breaks `str.splitlines` knows are legal,
    unescaped, inside JSON strings."""
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}.") from err
        except RecursionError:
            raise DataError(f"{path}: {_TOO_DEEP}") from None
    rows = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}: line {lineno} is not valid JSON ({err.msg}); expected one JSON object per line."
                ) from err
            except RecursionError:
                raise DataError(f"{path}: line {lineno}: {_TOO_DEEP}") from None
    return rows


_TOO_DEEP = (
    "its JSON is nested too deeply to read (arrays or objects inside each other beyond Python's recursion "
    f"limit, {sys.getrecursionlimit()}); a preference row nests a few levels: check how the file was written."
)


def _read_hub(name: str, split: str) -> tuple[list[dict[str, Any]], str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # the hub client raises many types; say what was asked for
        raise DataError(
            f"Could not load split {split!r} of {name!r} from the hub ({type(err).__name__}: {err}). "
            "Offline, point `dataset` at a local directory or .jsonl/.json/.parquet file."
        ) from err
    return ds.to_list(), f"hub:{name}:{split}:{ds._fingerprint}"


def _file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"file:{path.resolve()}:{digest.hexdigest()}"


def check_columns(
    rows: list[dict[str, Any]], where: str, data_format: str = "auto", column_map: dict[str, str] | None = None
) -> None:
    """Refuse a data set whose columns fit no accepted format (checked before any model is loaded).

    The columns are those of the first 1,000 rows, renamed by `column_map`; at least one of those rows
    must have the shape of `data_format` (with `auto`, of any format). Rows that are merely bad are
    counted and skipped later; this refuses a file that is in another shape altogether."""
    if data_format not in DATA_FORMATS:
        raise DataError(f"data_format={data_format!r} is not one of {', '.join(DATA_FORMATS)}.")
    _check_column_map(column_map)
    if not rows:
        raise DataError(f"{where} has no rows: expected preference rows ({FORMATS_ACCEPTED}).")
    head = rows[:1000]
    found = set().union(*(r.keys() for r in head))
    absent = sorted(set(column_map or {}) - found)
    if absent:
        raise DataError(
            f"column_map renames {absent}, which {where} does not have: its columns are {sorted(found)}. "
            "column_map maps a column of the data to one of " + ", ".join(CANONICAL_COLUMNS) + "."
        )
    if not any(_row_fits(_rename(r, column_map), data_format) for r in head):
        shown = "" if data_format == "auto" else f" with data_format={data_format}"
        raise DataError(
            f"{where} has columns {sorted(found)}, which fit no accepted format{shown} "
            f"(first row: {_describe_shape(_rename(head[0], column_map))}). Accepted: {FORMATS_ACCEPTED}. "
            'Rename columns with column_map (e.g. {"response_j": "chosen", "response_k": "rejected"}) '
            "or pick the format with data_format (" + ", ".join(DATA_FORMATS) + ")."
        )


def _check_column_map(column_map: dict[str, str] | None) -> None:
    if column_map is None:
        return
    if not isinstance(column_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in column_map.items()
    ):
        raise DataError(f"column_map must map column names to column names, got {column_map!r}.")
    wrong = {k: v for k, v in column_map.items() if v not in CANONICAL_COLUMNS}
    if wrong:
        raise DataError(
            f"column_map renames columns to {sorted(wrong.values())}; each must be one of "
            f"{', '.join(CANONICAL_COLUMNS)} (column_map maps the data's column to the name the trainer reads)."
        )
    targets = list(column_map.values())
    twice = sorted({t for t in targets if targets.count(t) > 1})
    if twice:
        raise DataError(f"column_map maps several columns to {twice}: {column_map!r}.")


def _rename(row: dict[str, Any], column_map: dict[str, str] | None) -> dict[str, Any]:
    """The row with `column_map`'s columns renamed; a renamed column replaces one already so named."""
    if not column_map:
        return row
    out = {k: v for k, v in row.items() if k not in column_map}
    out.update({dst: row[src] for src, dst in column_map.items() if src in row})
    return out


def _describe_shape(row: dict[str, Any]) -> str:
    shown = {k: type(row[k]).__name__ for k in ("prompt", "question", "chosen", "rejected") if k in row}
    return ", ".join(f"{k} is {t}" for k, t in shown.items()) or "no prompt, question, chosen or rejected"


# ---- normalising a row ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    prompt: list[dict[str, str]]  # messages before the answer
    chosen: str
    rejected: str


def _messages_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "missing_field"
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return "missing_field"
        if m["role"] not in ROLES:
            return "unknown_role"
        if not isinstance(m["content"], str):
            return "non_string_content"
    return None


# A turn of an Anthropic HH transcript: "\n\nHuman: ..." / "\n\nAssistant: ..." (the first may lack "\n\n").
_HH_TURN = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):[ \t]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _prompt_field(row: dict[str, Any]) -> Any:
    """The prompt column; `question` (Intel/orca_dpo_pairs) stands in when there is no `prompt`."""
    prompt = row.get("prompt")
    return row.get("question") if prompt is None else prompt


def _is_hh_transcript(text: Any) -> bool:
    return isinstance(text, str) and _HH_TURN.match(text) is not None and "\n\nAssistant:" in text


def _detect_format(row: dict[str, Any]) -> str | None:
    """The format a (renamed) row is in, or None if it fits none: message lists are conversational,
    a `chosen` string that is an HH transcript is hh (a `prompt` beside it is then ignored: the
    transcripts hold it), other rows with a prompt are plain."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, list) or isinstance(rejected, list):
        return "conversational"
    if _is_hh_transcript(chosen):
        return "hh"
    if _prompt_field(row) is not None and ("chosen" in row or "rejected" in row):
        return "plain"
    return None


def _row_fits(row: dict[str, Any], data_format: str) -> bool:
    """Whether a (renamed) row has the shape of `data_format`, good or bad content aside."""
    if data_format == "auto":
        return _detect_format(row) is not None
    chosen = row.get("chosen")
    if data_format == "conversational":
        return isinstance(chosen, list)
    if data_format == "hh":
        return _is_hh_transcript(chosen)
    return isinstance(chosen, str) and _prompt_field(row) is not None


def parse_hh_transcript(text: str) -> list[dict[str, str]] | None:
    """The messages of an HH transcript, contents stripped of surrounding whitespace; None when the
    text does not start with a Human or Assistant turn."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [
        {"role": _HH_ROLES[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _split_conversations(chosen: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> Pair | str:
    """Two conversations that share every message but the final assistant answers: the shared
    messages are the prompt (empty when the lists hold only the answers)."""
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return "no_assistant_answer"
    if chosen[:-1] != rejected[:-1]:
        return "prompt_mismatch"
    prompt = [dict(role=m["role"], content=m["content"]) for m in chosen[:-1]]
    return Pair(prompt, chosen[-1]["content"], rejected[-1]["content"])


def _conversational_pair(row: dict[str, Any]) -> Pair | str:
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        return "format_mismatch"  # data_format=conversational on strings (auto reads them as plain or hh)
    problem = _messages_problem(chosen) or _messages_problem(rejected)
    if problem:
        return problem
    pair = _split_conversations(chosen, rejected)
    if isinstance(pair, str) or pair.prompt:
        return pair
    given = row.get("prompt")
    if isinstance(given, list):  # TRL's explicit-prompt conversational format
        problem = _messages_problem(given)
        if problem:
            return problem
        prompt = [dict(role=m["role"], content=m["content"]) for m in given]
    elif isinstance(given, str):
        prompt = [{"role": "user", "content": given}]
    else:
        return "missing_field" if given is None else "non_string_content"
    return Pair(prompt, pair.chosen, pair.rejected)


def _plain_pair(row: dict[str, Any]) -> Pair | str:
    chosen, rejected, system = row["chosen"], row["rejected"], row.get("system")
    prompt = _prompt_field(row)
    if prompt is None:
        return "missing_field"
    if isinstance(chosen, list) or isinstance(rejected, list):
        return "format_mismatch"  # data_format=plain on message lists (auto reads them as conversational)
    if not all(isinstance(v, str) for v in (chosen, rejected)) or not isinstance(system, (str, type(None))):
        return "non_string_content"
    if isinstance(prompt, list):  # a prompt message list with string answers
        problem = _messages_problem(prompt)
        if problem:
            return problem
        messages = [dict(role=m["role"], content=m["content"]) for m in prompt]
        if system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        return Pair(messages, chosen, rejected)
    if not isinstance(prompt, str):
        return "non_string_content"
    messages = _hh_prompt(prompt) or [{"role": "user", "content": prompt}]
    return Pair(([{"role": "system", "content": system}] if system else []) + messages, chosen, rejected)


def _hh_prompt(prompt: str) -> list[dict[str, str]] | None:
    """The turns of a prompt written as an HH transcript ending in an empty "\n\nAssistant:" turn (as
    Dahoas/full-hh-rlhf writes it, the answers being the bare responses), else None."""
    turns = parse_hh_transcript(prompt) if _is_hh_transcript(prompt) else None
    if not turns or turns[-1] != {"role": "assistant", "content": ""}:
        return None
    return turns[:-1]


def _hh_pair(row: dict[str, Any]) -> Pair | str:
    chosen, rejected = row["chosen"], row["rejected"]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return "format_mismatch" if isinstance(chosen, list) or isinstance(rejected, list) else "non_string_content"
    chosen_turns, rejected_turns = parse_hh_transcript(chosen), parse_hh_transcript(rejected)
    if chosen_turns is None or rejected_turns is None:
        return "format_mismatch"
    return _split_conversations(chosen_turns, rejected_turns)


_PAIR_OF_FORMAT = {"conversational": _conversational_pair, "plain": _plain_pair, "hh": _hh_pair}


def normalise_row(
    row: dict[str, Any], data_format: str = "auto", column_map: dict[str, str] | None = None
) -> Pair | str:
    """A `Pair`, or the reason the row is skipped.

    `column_map` renames the row's columns first ({"question": "prompt"}: the data's name to the
    trainer's). `data_format` is auto (detected per row, see `_detect_format`), conversational,
    plain or hh; a row not in a forced format is skipped as `format_mismatch`."""
    row = _rename(row, column_map)
    if row.get("chosen") is None or row.get("rejected") is None:
        return "missing_field"
    fmt = data_format if data_format != "auto" else (_detect_format(row) or "plain")
    pair = _PAIR_OF_FORMAT[fmt](row)
    if isinstance(pair, str):
        return pair
    if not any(m["content"].strip() for m in pair.prompt if m["role"] == "user"):
        return "empty_prompt"
    if not pair.chosen.strip() or not pair.rejected.strip():
        return "empty_response"
    if pair.chosen.strip() == pair.rejected.strip():
        return "identical_responses"
    if not all(_encodable(t) for t in (pair.chosen, pair.rejected, *(m["content"] for m in pair.prompt))):
        return "unencodable_text"
    return pair


def _encodable(text: str) -> bool:
    """Whether a string is valid Unicode: JSON's "\\ud800" escapes decode to lone surrogates, which
    no tokenizer can encode (the Rust tokenizers raise TypeError on them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---- tokenising ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokenized:
    """One pair as two full sequences; the first `*_prompt_len` tokens of each are the prompt."""

    chosen_ids: list[int]
    chosen_prompt_len: int
    rejected_ids: list[int]
    rejected_prompt_len: int


class PairTokenizer:
    """Renders and tokenises pairs per the spec for one tokenizer and length budget."""

    def __init__(self, tokenizer: Any, max_length: int, max_prompt_length: int) -> None:
        self.tok = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.adds_bos = self.bos is not None and bool(with_special) and with_special[0] == self.bos
        self.terminators = end_of_turn_ids(tokenizer)

    def encode(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if self.bos is not None and (self.adds_bos or ids[:1] == [self.bos]):
            while ids[:1] == [self.bos]:
                ids = ids[1:]
            ids = [self.bos] + ids
        return ids

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _close_response(self, response: list[int]) -> list[int] | None:
        """The response ending in exactly one terminator, or None if it holds no content token."""
        while response and response[-1] not in self.terminators and not self.tok.decode([response[-1]]).strip():
            response = response[:-1]  # whitespace the template writes after the end-of-turn token
        if not response or response[-1] not in self.terminators:
            response = response + [self.eos]
        return response if len(response) > 1 else None

    def __call__(self, pair: Pair) -> Tokenized | str:
        prompt_text = self.render(pair.prompt, add_generation_prompt=True)
        prompt_ids = self.encode(prompt_text)
        sequences = []
        for answer in (pair.chosen, pair.rejected):
            full_text = self.render(
                pair.prompt + [{"role": "assistant", "content": answer}], add_generation_prompt=False
            )
            if not full_text.startswith(prompt_text):
                return "template_mismatch"
            full_ids = self.encode(full_text)
            cut = _common_prefix(prompt_ids, full_ids)  # < len(prompt_ids) only if the boundary merged
            response = self._close_response(full_ids[cut:])
            if response is None:
                return "empty_response"
            sequences.append((full_ids[:cut], response))
        return self._fit_budget(sequences)

    def _fit_budget(self, sequences: list[tuple[list[int], list[int]]]) -> Tokenized | str:
        longest = max(len(p) + len(r) for p, r in sequences)
        fitted = []
        for prompt, response in sequences:
            if longest > self.max_length and len(prompt) > self.max_prompt_length:
                keep = self.max_prompt_length - (1 if prompt[:1] == [self.bos] else 0)
                prompt = (prompt[:1] if prompt[:1] == [self.bos] else []) + prompt[len(prompt) - keep :]
            response = response[: self.max_length - len(prompt)]
            if not response:
                return "prompt_too_long"
            fitted.append((prompt + response, len(prompt)))
        (c_ids, c_len), (r_ids, r_len) = fitted
        return Tokenized(c_ids, c_len, r_ids, r_len)


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """EOS and the special tokens a chat template may close a turn with (<|eot_id|>, <|im_end|>,
    <end_of_turn>): a response ending in one gets no extra EOS, and generation stops at any of them.

    Special means named by the tokenizer (`all_special_ids`) *or* flagged `special` among its added
    tokens (tokenizer.json's `"special": true`, `added_tokens_decoder`): `all_special_ids` lists only
    the tokens the config names (bos, eos, pad, unk, extra special tokens), so a tokenizer whose
    config names another EOS leaves <|im_end|> out of it. BOS, pad and unk never end a turn, except
    the token the template itself writes right after an assistant answer (found by rendering a probe
    chat), which does even when it doubles as the pad token.
    """
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
    ids = special - {tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    ids.add(tokenizer.eos_token_id)
    closer = _template_turn_end(tokenizer)
    if closer is not None and closer in special:
        ids.add(closer)
    return ids - {None}


def _template_turn_end(tokenizer: Any) -> int | None:
    """The first token the chat template writes after an assistant answer, or None."""
    probe = "Probe answer 7"
    chat = [{"role": "user", "content": "Probe"}, {"role": "assistant", "content": probe}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # no template, or one that refuses this chat (jinja raise_exception): no probe
        return None
    if not isinstance(text, str) or probe not in text:
        return None
    after = tokenizer(text[text.rindex(probe) + len(probe) :], add_special_tokens=False)["input_ids"]
    return after[0] if after else None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# ---- a tokenised split ---------------------------------------------------------------------------


@dataclass
class PreferenceSplit:
    """Tokenised pairs of one split, stored flat; `skipped` counts rows by reason."""

    tokens: np.ndarray  # all sequences concatenated, chosen then rejected of each pair
    offsets: np.ndarray  # [2 * pairs + 1] start of each sequence in `tokens`
    prompt_lens: np.ndarray  # [2 * pairs]
    row_index: np.ndarray  # [pairs] source row of each pair
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_example: dict[str, int] = field(default_factory=dict)  # first row index per reason
    num_rows: int = 0
    source: str = ""  # the data's fingerprint (`file:<path>:<sha256>`, `hub:...`), set by load_split

    def __len__(self) -> int:
        return len(self.row_index)

    def sequence(self, k: int) -> np.ndarray:
        return self.tokens[self.offsets[k] : self.offsets[k + 1]]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "chosen_ids": self.sequence(2 * i),
            "chosen_prompt_len": int(self.prompt_lens[2 * i]),
            "rejected_ids": self.sequence(2 * i + 1),
            "rejected_prompt_len": int(self.prompt_lens[2 * i + 1]),
            "row_index": int(self.row_index[i]),
        }

    def mean_tokens_per_pair(self) -> float:
        return float(len(self.tokens)) / max(len(self), 1)

    def save(self, path: Path) -> None:
        meta = {"skipped": self.skipped, "skipped_example": self.skipped_example, "num_rows": self.num_rows}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
        np.savez(
            tmp,
            tokens=self.tokens,
            offsets=self.offsets,
            prompt_lens=self.prompt_lens,
            row_index=self.row_index,
            meta=np.array(json.dumps(meta)),
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> PreferenceSplit:
        with np.load(path) as f:
            meta = json.loads(str(f["meta"]))
            return cls(f["tokens"], f["offsets"], f["prompt_lens"], f["row_index"], **meta)


_WORKER_TOKENIZER: PairTokenizer | None = None  # set in each tokenising process


def _init_worker(pair_tokenizer: PairTokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = pair_tokenizer


def _process_row(
    row: dict[str, Any], data_format: str = "auto", column_map: dict[str, str] | None = None
) -> Tokenized | str:
    pair = normalise_row(row, data_format, column_map)
    return pair if isinstance(pair, str) else _WORKER_TOKENIZER(pair)


def tokenize_rows(
    rows: list[dict[str, Any]],
    pair_tokenizer: PairTokenizer,
    num_proc: int = 1,
    data_format: str = "auto",
    column_map: dict[str, str] | None = None,
) -> PreferenceSplit:
    """Normalise and tokenise every row (in `num_proc` processes), counting skipped rows by reason."""
    process = functools.partial(_process_row, data_format=data_format, column_map=column_map)
    if num_proc > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the Rust pool does not survive fork
        pool = mp.get_context("fork").Pool(num_proc, initializer=_init_worker, initargs=(pair_tokenizer,))
        try:
            results = pool.map(process, rows, chunksize=max(1, len(rows) // (num_proc * 8)))
        except BaseException:
            pool.terminate()
            raise
        # Not `with Pool` (terminate: SIGTERM to the workers). The workers inherit the trainer's
        # StopRequest handler, installed before the data loads, which records a SIGTERM and goes on:
        # a worker waiting for the queue's lock would never exit and terminate() would wait forever.
        # close() + join() ends them with the pool's own sentinels.
        pool.close()
        pool.join()
    else:
        _init_worker(pair_tokenizer)
        results = [process(r) for r in rows]
    skipped: Counter[str] = Counter()
    example: dict[str, int] = {}
    seqs, prompt_lens, kept = [], [], []
    for i, res in enumerate(results):
        if isinstance(res, str):
            skipped[res] += 1
            example.setdefault(res, i)
            continue
        seqs += [res.chosen_ids, res.rejected_ids]
        prompt_lens += [res.chosen_prompt_len, res.rejected_prompt_len]
        kept.append(i)
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    return PreferenceSplit(
        tokens=np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(lengths.sum())),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        prompt_lens=np.array(prompt_lens, dtype=np.int64),
        row_index=np.array(kept, dtype=np.int64),
        skipped=dict(skipped),
        skipped_example=example,
        num_rows=len(rows),
    )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        backend.to_str() if backend is not None else repr(tokenizer.get_vocab()),
        str(tokenizer.chat_template),
        repr(sorted(tokenizer.special_tokens_map.items())),
        # PairTokenizer's BOS rule and end-of-turn set depend on these; special_tokens_map omits extras.
        repr(sorted(tokenizer.all_special_ids)),
        repr(sorted(end_of_turn_ids(tokenizer))),
        repr(tokenizer("a", add_special_tokens=True)["input_ids"]),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load_split(
    dataset: str,
    split: str,
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int,
    num_proc: int = 0,
    cache_dir: str | None = None,
    data_format: str = "auto",
    column_map: dict[str, str] | None = None,
) -> PreferenceSplit:
    """Read, check, tokenise (or load from cache) one split; a split with no usable row is an error.
    `data_format` and `column_map`: see `normalise_row`."""
    rows, source = read_rows(dataset, split)
    where = f"split {split!r} of {dataset}"
    check_columns(rows, where, data_format, column_map)
    key = hashlib.sha256(
        json.dumps(
            [
                _CACHE_VERSION,
                source,
                tokenizer_fingerprint(tokenizer),
                max_length,
                max_prompt_length,
                data_format,
                sorted((column_map or {}).items()),
            ]
        ).encode()
    ).hexdigest()[:24]
    cache = Path(cache_dir or Path.home() / ".cache" / "orpo") / f"{key}.npz"
    data = _load_cache(cache) if cache.is_file() else None
    if data is None:
        if num_proc <= 0:
            num_proc = 1 if len(rows) < 20_000 else min(os.cpu_count() or 1, 16)
        data = tokenize_rows(
            rows, PairTokenizer(tokenizer, max_length, max_prompt_length), num_proc, data_format, column_map
        )
        cache.parent.mkdir(parents=True, exist_ok=True)
        data.save(cache)
    data.source = source
    if len(data) == 0:
        reasons = ", ".join(f"{k}: {v} (e.g. row {data.skipped_example[k]})" for k, v in sorted(data.skipped.items()))
        raise DataError(
            f"{where}: none of its {data.num_rows} rows is usable ({reasons}). Accepted: {FORMATS_ACCEPTED}."
        )
    return data


def _load_cache(path: Path) -> PreferenceSplit | None:
    """A cached split, or None (with a warning naming the file) when the file is damaged: truncated
    by a full disk or a kill, or corrupted; the caller then tokenises again and rewrites it."""
    try:
        data = PreferenceSplit.load(path)
        pairs, sequences = len(data.row_index), len(data.prompt_lens)
        if sequences != 2 * pairs or len(data.offsets) != sequences + 1 or data.offsets[-1] != len(data.tokens):
            raise ValueError(f"{pairs} pairs, {sequences} sequences, {len(data.offsets)} offsets do not agree")
        return data
    except Exception as err:  # numpy and zipfile raise many types for a damaged file (BadZipFile, EOFError, ...)
        warnings.warn(
            f"tokenised-data cache {path} is damaged ({type(err).__name__}: {err}); tokenising again and rewriting it.",
            stacklevel=2,
        )
        return None


def describe_skipped(data: PreferenceSplit) -> str:
    if not data.skipped:
        return f"{len(data)} pairs, no row skipped"
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(data.skipped.items(), key=lambda kv: -kv[1]))
    return f"{len(data)} pairs kept of {data.num_rows} rows; skipped: {reasons}"


def nll_token_count(data: PreferenceSplit, indices: np.ndarray, nll_on_prompt: bool) -> int:
    """Tokens L_SFT scores over these pairs, known before any forward pass: the chosen responses,
    or whole chosen sequences but their first token when `nll_on_prompt`."""
    chosen = 2 * np.asarray(indices)
    lengths = data.offsets[chosen + 1] - data.offsets[chosen]
    scored = lengths - 1 if nll_on_prompt else lengths - data.prompt_lens[chosen]
    return int(scored.sum())
