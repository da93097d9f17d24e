"""orpo/chat.py on tiny random models saved here with the shipped tokenizer (no training): what it
prints is what `model.generate` gives on the chat-template-rendered prompt, for a full model and an
adapter, one prompt or a conversation; `generate_samples` batches with left padding."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from orpo import chat
from orpo.chat import encode_prompt, generate_samples


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def direct_answer(model: torch.nn.Module, tok: object, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """Greedy `generate` on the rendered prompt, by hand: the tiny template writes the one BOS itself."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids[0].tolist().count(tok.bos_token_id) == 1
    model.eval()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    # The tiny model is random: make sure no stop token cut the answer short, so plain decoding compares.
    assert len(new) == max_new_tokens and tok.eos_token_id not in new
    return tok.decode(new, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def tiny_model(tiny_base: Path) -> tuple[torch.nn.Module, object]:
    return AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), AutoTokenizer.from_pretrained(
        tiny_base
    )


def test_one_prompt_prints_the_greedy_answer(
    tiny_base: Path, tiny_model: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    model, tok = tiny_model
    answers = chat.main([str(tiny_base), "--prompt", "sort: 3 1 2", "--max-new-tokens", "5"])
    expected = direct_answer(model, tok, [user("sort: 3 1 2")], 5)
    assert expected and answers == [expected]
    assert capsys.readouterr().out == expected + "\n"


def test_system_message_is_part_of_the_prompt(tiny_base: Path, tiny_model: tuple) -> None:
    model, tok = tiny_model
    answers = chat.main([str(tiny_base), "--prompt", "max: 7 2", "--system", "Be brief.", "--max-new-tokens", "6"])
    messages = [{"role": "system", "content": "Be brief."}, user("max: 7 2")]
    assert answers == [direct_answer(model, tok, messages, 6)]


def test_interactive_mode_keeps_the_conversation(
    tiny_base: Path, tiny_model: tuple, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model, tok = tiny_model
    monkeypatch.setattr("sys.stdin", io.StringIO("sort: 3 1 2\n\nmax: 5 9\n/exit\nnever read\n"))
    answers = chat.main([str(tiny_base), "--max-new-tokens", "4"])
    first = direct_answer(model, tok, [user("sort: 3 1 2")], 4)
    second = direct_answer(
        model, tok, [user("sort: 3 1 2"), {"role": "assistant", "content": first}, user("max: 5 9")], 4
    )
    assert answers == [first, second]
    assert capsys.readouterr().out == f"{first}\n{second}\n"  # the banner goes to stderr
    # End of input ends the session too; /reset forgets the conversation.
    monkeypatch.setattr("sys.stdin", io.StringIO("sort: 3 1 2\n/reset\nmax: 5 9\n"))
    assert chat.main([str(tiny_base), "--max-new-tokens", "4"]) == [
        first,
        direct_answer(model, tok, [user("max: 5 9")], 4),
    ]


def test_adapter_directory_loads_base_plus_adapter(tiny_base: Path, tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    answers = chat.main([str(tmp_path), "--prompt", "sort: 3 1 2", "--max-new-tokens", "5"])
    assert answers == [direct_answer(reloaded, tok, [user("sort: 3 1 2")], 5)]
    plain = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    assert answers != [direct_answer(plain, tok, [user("sort: 3 1 2")], 5)], "the adapter must change the answer"


def test_directory_without_a_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SystemExit, match=r"holds neither an adapter .* nor a model .*found \['notes.txt'\]"):
        chat.main([str(tmp_path), "--prompt", "hi"])


# ---- generate_samples ------------------------------------------------------------------------


PROMPTS = [
    [user("sort: 3 1 2")],
    [{"role": "system", "content": "You are a careful assistant."}, user("max: 5 9 7 1 0 4 4 2 8")],
    [user("max: 9")],
]


def test_generate_samples_batch_equals_one_at_a_time(tiny_model: tuple) -> None:
    """Left padding changes nothing: the batch gives each prompt's own greedy answer."""
    model, tok = tiny_model
    model.train()
    batched = generate_samples(model, tok, PROMPTS, max_new_tokens=6)
    assert model.training, "train mode is restored"
    assert batched == [direct_answer(model, tok, p, 6) for p in PROMPTS]
    model.eval()
    assert generate_samples(model, tok, PROMPTS[:1], max_new_tokens=6) == batched[:1]
    assert not model.training, "eval mode is kept"
    assert all(p.grad is None for p in model.parameters())


def test_generate_samples_stops_at_the_end_of_turn(tiny_model: tuple) -> None:
    """With EOS made the likeliest token right after two answer tokens (and only there), the answer
    is those two tokens, though 8 were allowed."""
    model, tok = tiny_model
    ids = encode_prompt(tok, PROMPTS[0])
    model.eval()
    with torch.no_grad():
        two = model.generate(torch.tensor([ids]), max_new_tokens=2, do_sample=False)[0, len(ids) :].tolist()
        # The hidden states that pick answer tokens 1, 2 and 3; EOS's logit: -100, -100, then +100.
        hidden = model.model(torch.tensor([ids + two])).last_hidden_state[0, -3:]
        eos_row = torch.linalg.lstsq(hidden, torch.tensor([-100.0, -100.0, 100.0])[:, None]).solution[:, 0]
    original = model.lm_head.weight.data.clone()
    try:
        model.lm_head.weight.data[tok.eos_token_id] = eos_row
        assert generate_samples(model, tok, PROMPTS[:1], max_new_tokens=8) == [tok.decode(two).strip()]
    finally:
        model.lm_head.weight.data.copy_(original)
    assert tok.eos_token_id not in two and tok.decode(two).strip()


def test_long_conversation_keeps_its_end_and_bos(tiny_model: tuple) -> None:
    model, tok = tiny_model
    limit = model.config.max_position_embeddings  # 256
    short, long = [user("max: 1 2")], [user("sort: " + " ".join("9876543210" * 3))] * 16
    ids = [encode_prompt(tok, short), encode_prompt(tok, long)]
    assert len(ids[0]) + 200 <= limit < len(ids[1])
    # Room for the answer: the prompts are kept whole and the answer budget stays.
    assert chat._fit_context(ids[:1], limit, 200, tok.bos_token_id) == (ids[:1], 200)
    # The answer takes what the prompt leaves, down to a quarter of the context...
    assert chat._fit_context(ids[:1], limit, 1000, tok.bos_token_id) == (ids[:1], limit - len(ids[0]))
    # ...below which the longest prompt loses its oldest tokens, keeping BOS; shorter ones stay whole.
    fitted, new = chat._fit_context(ids, limit, 100, tok.bos_token_id)
    assert new == 64 and fitted[0] == ids[0] and len(fitted[1]) == limit - 64
    assert fitted[1][0] == tok.bos_token_id and fitted[1][1:] == ids[1][len(ids[1]) - len(fitted[1]) + 1 :]
    assert len(generate_samples(model, tok, [short, long], max_new_tokens=256)) == 2
