"""orpo/export.py: a LoRA (and a QLoRA) adapter merged into its full-precision base scores exactly
as the adapter on its base, and the result loads with plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from orpo import export
from orpo.export import ExportError, export_merged

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def make_adapter(base_dir: Path, out: Path, quantized: bool = False) -> Path:
    """A LoRA adapter with random (non-zero) A and B on the tiny base, saved with the tokenizer as a
    run saves it. `quantized`: built on the NF4-quantised base, as a QLoRA run does."""
    kwargs = {}
    if quantized:
        from transformers import BitsAndBytesConfig

        kwargs = {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            ),
            "device_map": {"": "cpu"},
        }
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **kwargs)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    return out


def batch_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token, [batch, seq - 1], padded positions zeroed."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logps * attention_mask[:, 1:]


@pytest.fixture(scope="module")
def batch(tiny_base: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(tiny_base)
    texts = ["<|user|>\nsort: 3 1 2</s>\n<|assistant|>\n1 2 3</s>", "max: 9 4", "sort: 5 5 0 1 7 2 8"]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any(), "want padding in the batch"
    return enc["input_ids"], enc["attention_mask"]


def reference_logps(tiny_base: Path, adapter: Path, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The adapter applied (unmerged) on the float32 base: what the merged model must reproduce."""
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    return batch_logps(PeftModel.from_pretrained(base, adapter), *batch)


def test_merged_model_scores_as_the_adapter(tiny_base: Path, tmp_path: Path, batch: tuple) -> None:
    adapter = make_adapter(tiny_base, tmp_path / "adapter")
    out = export.main(["--adapter", str(adapter), "--output", str(tmp_path / "merged"), "--dtype", "fp32"])
    assert out == tmp_path / "merged"
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not {f for f in files if f.startswith("adapter_")}, files
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not any("lora" in key for key in f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.float32

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert type(merged).__name__ == "LlamaForCausalLM"
    got, want = batch_logps(merged, *batch), reference_logps(tiny_base, adapter, batch)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    base_logps = batch_logps(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), *batch)
    assert (got - base_logps).abs().max() > 1e-3, "the adapter must change the model, or the test proves nothing"


def test_qlora_adapter_is_merged_into_the_full_precision_base(tiny_base: Path, tmp_path: Path, batch: tuple) -> None:
    """An adapter trained on the NF4 base names the full-precision base; the merge happens there,
    so the merged model is the float32 base plus the update, with no 4-bit layer in sight."""
    adapter = make_adapter(tiny_base, tmp_path / "qlora", quantized=True)
    out = export_merged(adapter, tmp_path / "merged", dtype="auto")  # auto: the base was saved in float32
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in merged.modules())
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    torch.testing.assert_close(
        batch_logps(merged, *batch), reference_logps(tiny_base, adapter, batch), rtol=0, atol=1e-5
    )


def test_dtype_and_base_override(tiny_base: Path, tmp_path: Path, batch: tuple) -> None:
    adapter = make_adapter(tiny_base, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved_away")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = export_merged(adapter, tmp_path / "merged", dtype="bf16", base=str(tiny_base))
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # bf16 keeps ~3 significant digits: close to the float32 merge, not equal.
    torch.testing.assert_close(
        batch_logps(merged, *batch), reference_logps(tiny_base, adapter, batch), rtol=0, atol=0.1
    )


def test_full_model_directory_is_refused(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="holds a full model .*not a LoRA adapter: it is already merged"):
        export_merged(tiny_base, tmp_path / "merged")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=r"no adapter_config.json, so it is not a PEFT adapter \(found nothing\)"):
        export_merged(tmp_path / "empty", tmp_path / "merged")
    with pytest.raises(SystemExit, match="error: .* holds a full model"):
        export.main(["--adapter", str(tiny_base), "--output", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()


def test_non_empty_output_needs_overwrite(tiny_base: Path, tmp_path: Path, batch: tuple) -> None:
    adapter = make_adapter(tiny_base, tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old_weights.bin").write_text("stale")
    with pytest.raises(ExportError, match="exists and is not empty: .* pass --overwrite"):
        export_merged(adapter, out, dtype="fp32")
    assert (out / "old_weights.bin").read_text() == "stale"
    with pytest.raises(ExportError, match="would replace the adapter"):
        export_merged(adapter, adapter, dtype="fp32", overwrite=True)
    export_merged(adapter, out, dtype="fp32", overwrite=True)
    assert not (out / "old_weights.bin").exists(), "the replaced directory keeps no stale file"
    assert not list(tmp_path.glob(".merged.tmp*")), "no staging directory left behind"
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(
        batch_logps(merged, *batch), reference_logps(tiny_base, adapter, batch), rtol=0, atol=1e-5
    )


def test_quantised_base_is_refused(tiny_base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_base, tmp_path / "adapter")
    config = json.loads((tiny_base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "nf4_base").mkdir()
    (tmp_path / "nf4_base" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="quantised checkpoint \\(bitsandbytes\\).*full-precision model"):
        export_merged(adapter, tmp_path / "merged", base=str(tmp_path / "nf4_base"))


def test_arguments() -> None:
    args = export.parse_args(["--adapter", "runs/a", "--output", "runs/m", "--push-to-hub", "me/model", "--private"])
    assert (args.adapter, args.output, args.dtype, args.base) == (Path("runs/a"), Path("runs/m"), "auto", None)
    assert args.push_to_hub == "me/model" and args.private and not args.overwrite
    with pytest.raises(SystemExit):
        export.parse_args(["--adapter", "a", "--output", "m", "--dtype", "int4"])
    with pytest.raises(SystemExit):
        export.parse_args(["--output", "m"])
