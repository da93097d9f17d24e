"""What the CUDA paths decide, tested without a GPU: capabilities, device names and versions are
monkeypatched. The tests that need a GPU are in tests/test_gpu.py (marked `gpu`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import train_orpo
from orpo.config import ConfigError, TrainConfig, load_config
from orpo.model import CudaReport, ModelLoadError, load_tokenizer, nvidia_driver_version, require_cuda

# ---- 1. no silent CPU training -------------------------------------------------------------------

CPU_BUILD = CudaReport("2.13.0+cpu", None, False, None, None)
OLD_DRIVER = CudaReport("2.13.0", "13.0", False, "550.54.15", None)
NO_GPU = CudaReport("2.13.0", "13.0", False, None, None)
HIDDEN = CudaReport("2.13.0", "13.0", False, "580.95.05", "")


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        (CPU_BUILD, ["torch 2.13.0+cpu (torch.version.cuda=None)", "CPU-only build", "whl/cu130", "driver >= 580"]),
        (OLD_DRIVER, ["NVIDIA driver 550.54.15", "built for CUDA 13.0, which needs driver >= 580", "upgrade"]),
        (NO_GPU, ["NVIDIA driver not loaded (no /proc/driver/nvidia/version)", "no GPU is visible", "--gpus all"]),
        (HIDDEN, ["CUDA_VISIBLE_DEVICES=''", "hides every GPU"]),
    ],
)
def test_the_recipe_is_refused_without_cuda_naming_what_was_found(report: CudaReport, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        require_cuda(TrainConfig(), report)
    message = str(err.value)
    assert message.startswith("CUDA is not usable here: ")
    assert "torch.cuda.is_available()=False" in message
    assert "'mistralai/Mistral-7B-v0.1' on the CPU anyway" in message and "set allow_cpu=true" in message
    for part in expected:
        assert part in message, (part, message)


def test_allow_cpu_or_a_usable_gpu_lets_the_run_start() -> None:
    require_cuda(TrainConfig(allow_cpu=True), CPU_BUILD)
    require_cuda(TrainConfig(), CudaReport("2.13.0", "13.0", True, "580.95.05", None))
    assert load_config(ROOT / "configs" / "tiny.yaml").allow_cpu  # the demo and the tests run on the CPU


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n", "550.54.15"),
        (
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build  (dvs-builder)\n",
            "580.95.05",
        ),
        ("something else\n", None),
    ],
)
def test_driver_version_is_read_from_proc(tmp_path: Path, text: str, version: str | None) -> None:
    path = tmp_path / "version"
    path.write_text(text)
    assert nvidia_driver_version(path) == version
    assert nvidia_driver_version(tmp_path / "absent") is None


def test_main_refuses_before_loading_or_writing_anything(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded a tokenizer before refusing")

    monkeypatch.setattr(train_orpo, "load_tokenizer", must_not_load)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="CUDA is not usable here"):
        train_orpo.main(load_config(None, [f"output_dir={out}"]))
    assert not out.exists()


def _cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, str(ROOT / "train_orpo.py"), f"output_dir={tmp_path / 'run'}", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_without_cuda_exits_with_the_reason_not_a_traceback(tmp_path: Path) -> None:
    done = _cli(tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "error: CUDA is not usable here" in done.stderr and "allow_cpu=true" in done.stderr


def test_cli_offline_without_the_model_says_what_was_tried(tmp_path: Path) -> None:
    done = _cli(tmp_path, "allow_cpu=true")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "error: Could not load the tokenizer from 'mistralai/Mistral-7B-v0.1'" in done.stderr
    assert "HF_HUB_OFFLINE=1" in done.stderr and "hf download mistralai/Mistral-7B-v0.1" in done.stderr


def test_a_missing_or_empty_model_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer(TrainConfig(model_name_or_path="nobody/no-such-model"))
    message = str(err.value)
    assert "'nobody/no-such-model': no local directory of that name, so a hub repo, with HF_HUB_OFFLINE=1" in message
    assert "accept the licence" in message and "local directory" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=f"from the local directory '{empty}'"):
        load_tokenizer(TrainConfig(model_name_or_path=str(empty)))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    from orpo.model import _hub_call

    def unreachable() -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    with pytest.raises(ModelLoadError, match="check the name and your network"):
        _hub_call("model", "nobody/no-such-model", unreachable)


# ---- 2. bf16 only where the GPU has it -----------------------------------------------------------


def fake_gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]) -> None:
    """A CUDA GPU of this compute capability; is_bf16_supported() answers True as it does by default
    on every CUDA GPU, emulation included (a T4 says True)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize(
    ("capability", "dtype", "mixed"),
    [
        ((7, 5), torch.float16, "fp16"),
        ((7, 0), torch.float16, "fp16"),
        ((8, 0), torch.bfloat16, "bf16"),
        ((8, 9), torch.bfloat16, "bf16"),
        ((9, 0), torch.bfloat16, "bf16"),
    ],
)
def test_bf16_only_on_gpus_that_have_it_natively(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], dtype: torch.dtype, mixed: str
) -> None:
    """A T4 (sm75) and a V100 (sm70) get fp16 (accelerate then adds a GradScaler), Ampere+ bf16,
    in the trainer and in the chat CLI alike."""
    from orpo import chat
    from orpo.model import resolve_dtype, resolve_mixed_precision

    fake_gpu(monkeypatch, capability)
    assert resolve_mixed_precision(TrainConfig()) == mixed
    assert resolve_dtype(TrainConfig()) == dtype  # QLoRA's compute dtype
    assert resolve_dtype(TrainConfig(mode="full")) == torch.float32  # autocast does the rest
    assert chat.resolve_dtype("auto", torch.device("cuda")) == dtype
    assert chat.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_mixed_precision(TrainConfig(mixed_precision="no")) == "no"


@pytest.mark.parametrize(
    "amx, avx512_bf16, mixed, why",
    [
        (False, False, "no", "auto: float32, the CPU has no native bf16 (AMX or AVX512-BF16)"),
        (True, False, "bf16", "auto: bf16 autocast, the CPU has AMX"),
        (False, True, "bf16", "auto: bf16 autocast, the CPU has AVX512-BF16"),
        (True, True, "bf16", "auto: bf16 autocast, the CPU has AMX and AVX512-BF16"),
    ],
)
def test_without_cuda_auto_is_bf16_autocast_only_where_the_cpu_has_it_natively(
    monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool, mixed: str, why: str
) -> None:
    """Issue 20: the CPU's native bf16 (as torch's CPU backend reports it) gives bf16 autocast; the
    weights stay float32 either way, and an explicit setting is kept."""
    from orpo.model import mixed_precision_choice, resolve_dtype, resolve_mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert mixed_precision_choice(TrainConfig()) == (mixed, why)
    assert resolve_mixed_precision(TrainConfig()) == mixed and resolve_dtype(TrainConfig()) == torch.float32
    assert mixed_precision_choice(TrainConfig(mixed_precision="no")) == ("no", "as configured")


def test_an_unquoted_no_is_mixed_precision_no(tmp_path: Path) -> None:
    """YAML 1.1 reads `no` as False: `mixed_precision=no` and `mixed_precision: no` both mean "no"."""
    from orpo.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\n")
    assert load_config(path).mixed_precision == "no"
    assert load_config(None, ["mixed_precision=no"]).mixed_precision == "no"


def test_the_plan_names_the_malloc_a_process_runs() -> None:
    """Issue 20 item 4: a preloaded tcmalloc or jemalloc is found among the mapped libraries; without one
    the plan names glibc's and the measured alternative."""
    import os

    import train_orpo
    from orpo.model import malloc_in_use

    lib = "/usr/lib/x86_64-linux-gnu"
    tcmalloc = f"7f00-7f10 r-xp 00000000 08:01 42 {lib}/libtcmalloc_minimal.so.4.5.10\n"
    jemalloc = f"7f00-7f10 r-xp 00000000 08:01 43 {lib}/libjemalloc.so.2\n"
    libc = f"7f20-7f30 r-xp 00000000 08:01 44 {lib}/libc.so.6\n"
    assert malloc_in_use(libc + tcmalloc) == "tcmalloc"
    assert malloc_in_use(jemalloc + libc) == "jemalloc"
    assert malloc_in_use(libc) == "glibc"
    preloaded = os.environ.get("LD_PRELOAD", "")
    expected = next((name for name in ("tcmalloc", "jemalloc", "mimalloc") if name in preloaded), "glibc")
    assert malloc_in_use() == expected  # this process, from /proc/self/maps
    line = train_orpo.malloc_line()
    assert line.startswith(expected) and ("libtcmalloc_minimal.so.4" in line) == (expected == "glibc")


# ---- 3. flash-attn: decided as transformers decides, and by loading its extension ----------------


def _clear_import_caches() -> None:
    from transformers.utils import import_utils

    for name in ("is_flash_attn_2_available", "is_torch_cuda_available", "_package_distribution_mapping"):
        getattr(import_utils, name).cache_clear()
    for module in ("flash_attn", "flash_attn_2_cuda"):
        sys.modules.pop(module, None)


@pytest.fixture
def fake_flash_attn(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Installs a fake `flash_attn` on sys.path: fake_flash_attn(distribution, version, extension_error)."""

    def install(distribution: str, version: str, extension_error: str | None) -> None:
        (tmp_path / "flash_attn").mkdir()
        (tmp_path / "flash_attn" / "__init__.py").write_text(f"__version__ = {version!r}\nimport flash_attn_2_cuda\n")
        body = f"raise ImportError({extension_error!r})\n" if extension_error else "def fwd(): pass\n"
        (tmp_path / "flash_attn_2_cuda.py").write_text(body)
        info = tmp_path / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
        (info / "top_level.txt").write_text("flash_attn\nflash_attn_2_cuda\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        fake_gpu(monkeypatch, (9, 0))
        _clear_import_caches()

    yield install
    monkeypatch.undo()
    _clear_import_caches()


BROKEN = "flash_attn_2_cuda.cpython-312-x86_64-linux-gnu.so: undefined symbol: _ZN3c104cuda9SetDeviceEi"


def test_a_flash_attn_whose_extension_does_not_load_falls_back_to_sdpa(fake_flash_attn) -> None:
    from orpo.model import resolve_attention

    fake_flash_attn("flash-attn", "2.8.3", BROKEN)
    attention, note = resolve_attention("auto", torch.bfloat16)
    assert attention == "sdpa"
    assert note.startswith(" (not flash_attention_2: flash-attn's CUDA extension does not load (ImportError: ")
    assert "undefined symbol" in note and "make install-gpu" in note
    with pytest.raises(ConfigError, match="attn_implementation=flash_attention_2, but flash-attn's CUDA extension"):
        resolve_attention("flash_attention_2", torch.bfloat16)


def test_flash_attn_4_is_not_taken_for_flash_attn_2(fake_flash_attn) -> None:
    from orpo.model import resolve_attention

    fake_flash_attn("flash-attn-4", "4.0.0b1", None)
    attention, note = resolve_attention("auto", torch.bfloat16)
    assert attention == "sdpa"
    assert "transformers does not take the installed flash_attn (flash-attn-4 4.0.0b1) as flash-attn 2" in note


def test_a_working_flash_attn_2_is_chosen_on_ampere_in_half_precision(
    fake_flash_attn, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orpo.model import resolve_attention

    fake_flash_attn("flash-attn", "2.8.3", None)
    assert resolve_attention("auto", torch.bfloat16) == ("flash_attention_2", "")
    assert resolve_attention("flash_attention_2", torch.float16) == ("flash_attention_2", "")
    attention, note = resolve_attention("auto", torch.float32)
    assert attention == "sdpa" and "needs float16 or bfloat16 weights" in note
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    attention, note = resolve_attention("auto", torch.float16)
    assert attention == "sdpa" and "compute capability >= 8.0" in note


def test_without_flash_attn_sdpa_is_chosen_silently() -> None:
    from orpo.model import resolve_attention

    assert resolve_attention("auto", torch.bfloat16) == ("sdpa", "")
    with pytest.raises(ConfigError, match="flash-attn is not installed"):
        resolve_attention("flash_attention_2", torch.bfloat16)
    assert resolve_attention("eager", torch.float32) == ("eager", "")


# ---- 4. packed rows give flash-attention its varlen arguments ------------------------------------


def _tiny_model(attention: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import TINY

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY), attn_implementation=attention).eval()


@pytest.fixture
def recording_attention():
    """A registered attention function (named like a flash one would be: not sdpa/eager/flex) that records
    the kwargs each layer receives, then computes SDPA on the packed mask transformers built."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    calls: list[dict] = []

    def recording(module: torch.nn.Module, *args: object, **kwargs: object) -> object:
        calls.append(dict(kwargs))
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("orpo_recording", recording)
    AttentionMaskInterface.register("orpo_recording", sdpa_mask)
    yield calls
    AttentionInterface._global_mapping.pop("orpo_recording", None)
    AttentionMaskInterface._global_mapping.pop("orpo_recording", None)


def test_packed_forward_hands_cu_seqlens_and_int_max_lengths_to_the_attention(recording_attention: list) -> None:
    from orpo.collator import PackedPairCollator
    from orpo.forward import policy_forward
    from tests.test_collator import PAIRS

    batch = PackedPairCollator()(PAIRS)
    assert batch["max_seqlen"] == 7 and type(batch["max_seqlen"]) is int
    with torch.no_grad():
        got = policy_forward(_tiny_model("orpo_recording"), batch, None)
        want = policy_forward(_tiny_model("sdpa"), batch, None)
    assert len(recording_attention) == 2  # one call per layer
    for kwargs in recording_attention:
        assert kwargs["cu_seq_lens_q"].tolist() == [0, 5, 12, 15, 20] and kwargs["cu_seq_lens_q"].dtype == torch.int32
        assert kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
        assert kwargs["max_length_q"] == kwargs["max_length_k"] == 7 and type(kwargs["max_length_q"]) is int
    for a, b in zip(got, want, strict=True):  # the same numbers as SDPA's packed path
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sdpa_and_padded_forwards_get_no_varlen_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from orpo.collator import PackedPairCollator, PairCollator
    from orpo.forward import policy_forward, to_device
    from tests.test_collator import PAIRS

    seen: list[set] = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(set(kwargs))
        return sdpa(*args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    model = _tiny_model("sdpa")
    with torch.no_grad():
        packed = policy_forward(model, to_device(PackedPairCollator()(PAIRS), torch.device("cpu")), None)
        padded = policy_forward(model, PairCollator(0)(PAIRS), None)
    assert len(seen) == 4 and not any(k & {"cu_seq_lens_q", "max_length_q"} for k in seen)
    for a, b in zip(packed, padded, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- 5. launch configs, and the chunked head's operands under fp16 ------------------------------


@pytest.mark.skipif(not shutil.which("make"), reason="make is not installed")
@pytest.mark.parametrize(
    ("config", "args", "expected"),
    [
        ("configs/mistral7b_qlora.yaml", "", "accelerate_configs/ddp.yaml"),  # qlora: DDP
        ("configs/mistral7b_qlora.yaml", "mode=lora", "accelerate_configs/ddp.yaml"),
        ("configs/mistral7b_qlora.yaml", "mode=full", "accelerate_configs/zero3.yaml"),
        ("configs/tiny.yaml", "", "accelerate_configs/zero3.yaml"),  # tiny is mode: full
    ],
)
def test_make_train_multigpu_picks_ddp_for_lora_and_qlora_and_zero3_for_full(
    config: str, args: str, expected: str
) -> None:
    done = subprocess.run(
        ["make", "-n", "train-multigpu", "NUM_GPUS=2", f"CONFIG={config}", f"ARGS={args}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"accelerate launch --config_file {expected} " in done.stdout
    assert f"--num_processes 2 train_orpo.py --config {config} {args}".rstrip() in done.stdout


@pytest.mark.skipif(not shutil.which("make"), reason="make is not installed")
def test_make_train_uses_the_single_gpu_launch_config_and_accel_still_overrides() -> None:
    train = subprocess.run(["make", "-n", "train"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "accelerate launch --config_file accelerate_configs/single_gpu.yaml " in train.stdout
    chosen = subprocess.run(
        ["make", "-n", "train-multigpu", "NUM_GPUS=2", "ACCEL=accelerate_configs/zero2.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "--config_file accelerate_configs/zero2.yaml " in chosen.stdout


@pytest.mark.parametrize(
    ("mixed", "device", "expected"),
    [
        ("bf16", "cuda", torch.bfloat16),
        ("bf16", "cpu", torch.bfloat16),
        ("fp16", "cuda", torch.float16),  # fp16 operands, float32 accumulation (mm out_dtype)
        ("fp16", "cpu", None),  # no mm(out_dtype=) on the CPU: float32 operands, as before
        ("no", "cuda", None),
        ("no", "cpu", None),
    ],
)
def test_chunked_head_operands_follow_mixed_precision(mixed: str, device: str, expected: torch.dtype | None) -> None:
    from orpo.forward import head_matmul_dtype

    assert head_matmul_dtype(mixed, torch.device(device)) == expected


def test_resolve_head_under_fp16_keeps_float32_operands_on_the_cpu() -> None:
    from orpo.forward import resolve_head

    head, _ = resolve_head(TrainConfig(), _tiny_model("sdpa"), "fp16")
    assert head is not None and head.matmul_dtype is None
    head, _ = resolve_head(TrainConfig(), _tiny_model("sdpa"), "bf16")
    assert head.matmul_dtype == torch.bfloat16


# ---- 6. metrics that mean what they say on a GPU -------------------------------------------------


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40", 181.05),  # not the L4's 121
        ("NVIDIA L40S", 362.05),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA A10G", None),  # not the A10's
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("Tesla T4", None),  # no bf16
        ("NVIDIA H100 SXM5 96GB", None),  # unknown variants log no MFU rather than a guess
    ],
)
def test_mfu_peak_matches_device_names_exactly(monkeypatch: pytest.MonkeyPatch, name: str, peak: float | None) -> None:
    from orpo.metrics import device_peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_tflops(torch.device("cuda")) == peak
    assert device_peak_tflops(torch.device("cpu")) is None


class FakeCudaMemory:
    """torch.cuda's peak counters for one rank: a peak that holds until reset."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, allocated: float, reserved: float) -> None:
        self.allocated, self.reserved, self.resets = allocated, reserved, 0
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: self.reserved)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self.reset)

    def reset(self, device: object = None) -> None:
        self.resets += 1
        self.allocated, self.reserved = 1e9, 2e9  # what the tensors alive at the reset hold


def test_peak_memory_is_per_window_and_reserved_is_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from orpo.metrics import window_memory

    memory = FakeCudaMemory(monkeypatch, allocated=7.5e9, reserved=9e9)
    accelerator = SimpleNamespace(device=torch.device("cuda"), num_processes=1)
    assert window_memory(accelerator) == {"peak_mem_gb": 7.5, "reserved_mem_gb": 9.0}
    assert memory.resets == 1
    assert window_memory(accelerator) == {"peak_mem_gb": 1.0, "reserved_mem_gb": 2.0}  # not the run-wide 7.5


def test_peak_memory_is_the_maximum_over_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from orpo.metrics import window_memory

    FakeCudaMemory(monkeypatch, allocated=3e9, reserved=4e9)
    other_rank = torch.tensor([6e9 / 1e9, 3.5e9 / 1e9], dtype=torch.float64)

    def all_reduce(tensor: torch.Tensor, op: object = None) -> None:
        assert op == torch.distributed.ReduceOp.MAX
        tensor.copy_(torch.maximum(tensor, other_rank))

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    accelerator = SimpleNamespace(device=torch.device("cuda"), num_processes=2)
    # the reduced tensor goes to the (fake) CUDA device: keep it on the CPU for this test
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda data, **kw: real_tensor(data, **{**kw, "device": "cpu"}))
    assert window_memory(accelerator) == {"peak_mem_gb": 6.0, "reserved_mem_gb": 4.0}


def test_zero3_offload_with_an_8bit_optimizer_is_refused_before_the_model_loads() -> None:
    import json

    from tests.test_distributed import configure

    offload = json.loads((ROOT / "ds_configs" / "zero3_offload.json").read_text())
    with pytest.raises(ConfigError, match=r"offload_optimizer.device='cpu'\) but optim=paged_adamw_8bit"):
        configure(offload)  # the recipe's optimizer
    configure(offload, "optim=adamw_torch")


# ---- 7. no host-to-device copies per micro-batch in the metric sums ------------------------------


def test_metric_sums_add_makes_no_tensor_from_host_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.tensor(python value, device=cuda) is a synchronous copy; add() runs once per micro-batch.
    (tests/test_gpu.py checks the same on CUDA with sync debug mode.)"""
    from orpo.metrics import MetricSums

    sums = MetricSums(torch.device("cpu"))
    args = (torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), torch.tensor([0.3, -0.2]))
    counts = (torch.tensor(5.0), torch.tensor(7), torch.tensor(20))

    def no_host_values(*a: object, **k: object) -> None:
        raise AssertionError("MetricSums.add built a tensor from host values")

    monkeypatch.setattr(torch, "tensor", no_host_values)
    sums.add(*args, *counts)
    monkeypatch.undo()
    assert sums.sums[:4].tolist() == [5.0, 7.0, pytest.approx(1.3524941138501188, abs=1e-6), 2.0]
