"""What a new user met pointing the trainer at a real model (issue 12, section 5): random_init on real
weights, the plan's dtype of an NF4 base, bitsandbytes' paged-optimizer warning on the CPU, and an
end-of-turn token that `all_special_ids` does not list."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from orpo.config import TrainConfig
from orpo.data import Pair, PairTokenizer, end_of_turn_ids
from orpo.model import load_model
from orpo.optim import build_optimizer
from tests.conftest import TINY
from tests.test_data import IM_END_TEMPLATE, char_tokenizer, raw_ids, sides, tokenize, user


def config(path: Path | str, **kwargs: object) -> TrainConfig:
    return TrainConfig(model_name_or_path=str(path), dataset="data/sort_prefs", **kwargs)


# ---- random_init on a directory of trained weights -------------------------------------------------


def test_random_init_on_real_weights_warns_that_they_are_not_loaded(tiny_base: Path) -> None:
    assert (tiny_base / "model.safetensors").is_file()
    with pytest.warns(UserWarning, match=r"random_init=true: .* holds trained weights \(model\.safetensors\)"):
        model, info = load_model(config(tiny_base, random_init=True, mode="full"))
    assert "random init" in info.description


def test_random_init_on_a_config_only_directory_is_silent() -> None:
    assert not list(TINY.glob("*.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_model(config(TINY, random_init=True, mode="full"))


# ---- the plan names NF4 storage and compute dtype ----------------------------------------------------


def test_qlora_plan_names_nf4_storage_and_compute_dtype(tiny_base: Path) -> None:
    _, info = load_model(config(tiny_base, mode="qlora", dtype="float32", gradient_checkpointing=False))
    assert info.weights == (
        "NF4 4-bit with double quantisation, stored as torch.uint8, compute torch.float32; "
        "LoRA and unquantised layers (embeddings, norms, head) float32"
    )
    _, full = load_model(config(tiny_base, mode="full", dtype="float32"))
    assert full.weights == "torch.float32"


# ---- paged optimizers on the CPU ---------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback: paged optimizers are used with CUDA")
@pytest.mark.parametrize(
    ("optim", "expected"), [("paged_adamw_8bit", "AdamW8bit"), ("paged_adamw_32bit", "AdamW32bit")]
)
def test_paged_optimizer_on_cpu_is_its_non_paged_twin_without_warning(optim: str, expected: str) -> None:
    """bitsandbytes falls back to the non-paged optimizer on the CPU with a warning; the trainer picks
    that optimizer itself: no warning, and the same update as the paged class gives."""
    import bitsandbytes as bnb

    def params() -> list[torch.nn.Parameter]:
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, 300))  # >= 4096 elements: 8-bit states are used
        p.grad = torch.randn(64, 300)
        return [p]

    model = torch.nn.Module()
    (model.w,) = params()
    model.w.grad = params()[0].grad
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = build_optimizer(config(TINY, optim=optim, learning_rate=1e-2), model)
        opt.step()
    assert type(opt).__name__ == expected
    assert not [w for w in caught if "Paged" in str(w.message)], [str(w.message) for w in caught]
    paged_params = params()
    paged_cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paged = paged_cls[optim](paged_params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        paged.step()
    assert torch.equal(model.w.detach(), paged_params[0].detach())
    assert not torch.equal(model.w.detach(), params()[0].detach()), "the step moved the weights"


# ---- end of turn beyond all_special_ids ----------------------------------------------------------------


def test_end_of_turn_flagged_special_only_in_tokenizer_json_closes_the_response() -> None:
    """<|im_end|> is an added token with special=true (tokenizer.json) but the config names no such
    special token, so all_special_ids misses it: the response must still end with it alone, not with
    <|im_end|></s>, and generation must stop at it."""
    tok = char_tokenizer(IM_END_TEMPLATE)  # <|im_end|> special in the backend, not an extra special token
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end not in tok.all_special_ids and tok.added_tokens_decoder[im_end].special
    assert im_end in end_of_turn_ids(tok)
    out = tokenize(tok, Pair(user("q?"), "yo ok", "no"))
    for (_, response), answer in zip(sides(out), ("yo ok", "no"), strict=True):
        assert response == raw_ids(tok, answer) + [im_end]
        assert tok.eos_token_id not in response


def test_pad_token_that_closes_turns_still_ends_them() -> None:
    """A tokenizer whose pad token is the template's end-of-turn token (pad = <|im_end|>, EOS another)."""
    tok = char_tokenizer(IM_END_TEMPLATE)
    tok.pad_token = "<|im_end|>"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id != im_end
    assert im_end in PairTokenizer(tok, 64, 32).terminators
    assert tok.pad_token_id in end_of_turn_ids(tok)
    # A dedicated pad token that no template writes is not an end of turn.
    plain = char_tokenizer(IM_END_TEMPLATE)
    assert plain.pad_token_id not in end_of_turn_ids(plain)
