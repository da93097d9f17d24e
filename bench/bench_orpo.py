"""Benchmark: this project's ORPO trainer against TRL's, same model, data, hyperparameters and steps.

    # the CPU cases: a 2-layer Llama, 32k and 128k vocabularies (about 6 minutes on 2 quiet cores)
    .venv-bench/bin/python bench/bench_orpo.py --cases cpu-32k,cpu-128k

    # one case, different sizes; extra overrides for our trainer (rerun when new options land)
    .venv-bench/bin/python bench/bench_orpo.py --cases cpu-32k --layers 4 --steps 6 \
        --ours-override padding_free=true chunked_head=true

    # one GPU: Mistral-7B architecture, random weights saved once as bf16 (~14.5 GB), QLoRA on both
    .venv-bench/bin/python bench/bench_orpo.py --cases gpu-mistral7b-qlora

`.venv-bench` is requirements.txt plus requirements-bench.txt (TRL, exact pins); see bench/README.md.

What runs. Each case builds (once, cached under --workdir) a local tokenizer with a vocabulary of
exactly the case's size and a chat template, a model from a config with seeded random weights
saved to disk, and seeded synthetic preference pairs with UltraFeedback-like lengths written as a
plain-string JSONL (prompt/chosen/rejected). Then each system trains in its own fresh subprocess
(so their peak memories do not mix), for `warmup + steps` optimizer steps:

  ours  `train_orpo.main()` with configs/tiny.yaml plus overrides pointing at the case's assets,
        exactly what `python train_orpo.py --config configs/tiny.yaml key=value ...` runs;
  TRL   `trl.experimental.orpo.ORPOTrainer` with an `ORPOConfig` of the same learning rate, beta
        (our orpo_lambda), micro-batch, accumulation, steps, max_length, seed, dtype, gradient
        checkpointing and optimizer; no eval, no saving, report_to none, logging every step.

Both see the same pairs in the same micro-batches: the pairs of each optimizer step are the ones
our sampler draws (orpo.sampling.global_batches), and TRL reads a dataset laid out in that order
with a sequential sampler. TRL gets the pairs as conversations (user prompt, assistant answers), so
it renders them with the same chat template our trainer applies to the plain strings; each worker
reports the real tokens it collated and the harness checks that both saw the same.

Measured identically for both, from outside the training loop:
  step time   wall time between the ends of consecutive optimizer steps (a global optimizer
              step-post hook), the first `warmup` steps excluded;
  tokens/s    real (non-pad) tokens of the measured steps' chosen + rejected sequences, as our
              data pipeline tokenises them (the same count for both), over the measured time;
  memory      CPU: peak RSS of the system's subprocess (os.wait4), and its rise over the RSS at the
              first forward (model and data loaded); CUDA: max allocated, and its rise likewise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
# Zephyr-style, as scripts/make_tiny_assets.py: BOS, then turns closed by EOS and a newline.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- cases -------------------------------------------------------------------------------------


@dataclass
class Case:
    """One benchmark configuration; every field can be overridden by the flag of the same name."""

    name: str = "custom"
    device: str = "cpu"  # cpu | cuda
    vocab: int = 32000
    model_config: str | None = None  # a config.json to use instead of the small Llama below
    hidden: int = 256
    intermediate: int = 704
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    mode: str = "full"  # full | lora | qlora
    gradient_checkpointing: bool = False
    optim: str = "adamw_torch"
    micro_batch: int = 2  # pairs per micro-batch
    global_batch: int = 4  # pairs per optimizer step
    warmup: int = 1  # optimizer steps run but not measured
    steps: int = 4  # measured optimizer steps
    max_length: int = 1024
    max_prompt_length: int = 512
    pairs: int = 256  # synthetic pairs generated
    prompt_median: int = 120  # words = tokens (the tokenizer is word-level)
    response_median: int = 250
    learning_rate: float = 8e-6
    orpo_lambda: float = 0.1
    lora_r: int = 16
    lora_alpha: int = 16
    seed: int = 42
    # A real pretrained model and its tokenizer instead of random weights and a word-level tokenizer:
    # "smollm2" (scripts/get_smollm2.py's directory) or any local HF model directory.
    pretrained: str | None = None
    # Every pair the same (the first one drawn): every step has the same shapes, so the first step's
    # time compares with the others' directly (issue 20 item 3).
    same_pair: bool = False
    # fp32: both sides float32 (ours mixed_precision=no, TRL bf16=False); bf16: both bf16 autocast;
    # defaults: each side's own (ours mixed_precision=auto, TRL ORPOConfig's bf16 default, on even with use_cpu).
    precision: str = "fp32"
    ours_overrides: list[str] = field(default_factory=list)
    # Environment of our worker process only, e.g. LD_PRELOAD=<libjemalloc.so.2> (issue 20 item 4).
    ours_env: list[str] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def accumulation(self) -> int:
        return self.global_batch // self.micro_batch

    def asset_key(self) -> str:
        """What the tokenizer, weights and data depend on: reuse them when it matches."""
        keys = ("vocab", "model_config", "hidden", "intermediate", "layers", "heads", "kv_heads", "pairs")
        keys += ("prompt_median", "response_median", "seed", "pretrained", "same_pair")
        blob = {k: getattr(self, k) for k in keys}
        if self.model_config:
            blob["model_config_text"] = Path(self.model_config).read_text()
        if self.mode == "qlora":
            blob["weights"] = "bfloat16"  # saved in the dtype QLoRA computes in (see save_random_model)
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


PRESETS: dict[str, dict[str, Any]] = {
    # The main comparison on this machine's 2 cores.
    "cpu-32k": dict(vocab=32000),
    # Same model body, Llama-3-sized vocabulary: the logits and the loss dominate memory.
    "cpu-128k": dict(vocab=128256),
    # One GPU, the published recipe's shape: Mistral-7B architecture (random weights), QLoRA, 2 pairs/micro-batch.
    "gpu-mistral7b-qlora": dict(
        device="cuda",
        model_config=str(BENCH_DIR / "mistral7b_config.json"),
        vocab=32000,
        mode="qlora",
        gradient_checkpointing=True,
        optim="paged_adamw_8bit",
        micro_batch=2,
        global_batch=8,
        warmup=2,
        steps=5,
        pairs=512,
        precision="bf16",
    ),
}
# A real architecture on the CPU (issue 20): SmolLM2-135M-Instruct's weights, tokenizer and ChatML
# template (30 layers, hidden 576, vocabulary 49,152, tied embeddings), LoRA r=16 on the seven
# projections, gradient checkpointing on both sides, 2 pairs per micro-batch, UltraFeedback-shaped
# pairs (median prompt 134 tokens, responses 267). One preset per precision rule, same assets.
SMOLLM2_LORA = dict(
    pretrained="smollm2",
    vocab=49152,
    mode="lora",
    gradient_checkpointing=True,
    micro_batch=2,
    global_batch=4,
    warmup=1,
    steps=3,
    prompt_median=134,
    response_median=267,
)
for _precision in ("defaults", "fp32", "bf16"):
    PRESETS[f"cpu-smollm2-lora-{_precision}"] = dict(SMOLLM2_LORA, precision=_precision)
PRECISIONS = ("defaults", "fp32", "bf16")


# ---- assets: tokenizer, model, data --------------------------------------------------------------


def build_tokenizer(vocab_size: int, out: Path) -> None:
    """A word-level tokenizer of exactly `vocab_size` ids (one word of the data = one token), which
    adds BOS like Llama's, with the chat template; saved as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": len(SPECIAL_TOKENS) + i for i in range(vocab_size - len(SPECIAL_TOKENS))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    bos = vocab["<s>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    fast.save_pretrained(out)


def model_config(case: Case, tokenizer: Any) -> Any:
    from transformers import AutoConfig, LlamaConfig

    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if case.model_config:
        config = AutoConfig.for_model(**json.loads(Path(case.model_config).read_text()))
        if config.vocab_size != len(tokenizer):
            raise SystemExit(f"{case.model_config} has vocab_size {config.vocab_size}; --vocab is {len(tokenizer)}.")
        for key, value in ids.items():
            setattr(config, key, value)
        return config
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=case.hidden,
        intermediate_size=case.intermediate,
        num_hidden_layers=case.layers,
        num_attention_heads=case.heads,
        num_key_value_heads=case.kv_heads,
        max_position_embeddings=max(2048, case.max_length),
        tie_word_embeddings=False,
        **ids,
    )


def save_random_model(case: Case, out: Path) -> int:
    """Seeded random weights from the config, saved so that both systems load the same ones (and a
    QLoRA run can load them quantised: bitsandbytes quantises at load time, not from a config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    config = model_config(case, tokenizer)
    dtype = torch.bfloat16 if case.mode == "qlora" else torch.float32
    device = "cuda" if case.device == "cuda" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(case.seed)
    with torch.device(device):  # initialising 7B parameters on the CPU takes long
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out, max_shard_size="5GB")
    return sum(p.numel() for p in model.parameters())


def lengths(rng: np.random.Generator, median: int, low: int, high: int, n: int) -> np.ndarray:
    """Log-normal lengths clipped to [low, high]: a long right tail, as in UltraFeedback."""
    return np.clip(np.round(rng.lognormal(np.log(median), 0.6, n)), low, high).astype(int)


def write_pairs(case: Case, words: list[str], path: Path) -> None:
    """Plain-string pairs of seeded random words, each one token: prompts ~50-400, responses ~50-700."""
    rng = np.random.default_rng(case.seed)
    vocab = np.array(words)
    text = lambda n: " ".join(vocab[rng.integers(0, len(vocab), n)])  # noqa: E731
    prompt_len = lengths(rng, case.prompt_median, 50, 400, case.pairs)
    chosen_len = lengths(rng, case.response_median, 50, 700, case.pairs)
    rejected_len = lengths(rng, case.response_median, 50, 700, case.pairs)
    with open(path, "w") as f:
        for p, c, r in zip(prompt_len, chosen_len, rejected_len, strict=True):
            line = json.dumps({"prompt": text(p), "chosen": text(c), "rejected": text(r)}) + "\n"
            f.write(line * case.pairs if case.same_pair else line)
            if case.same_pair:
                break


def pretrained_dir(name: str) -> Path:
    """The model directory of --pretrained: "smollm2" is scripts/get_smollm2.py's (fetched if missing)."""
    if name != "smollm2":
        return Path(name).expanduser().resolve()
    sys.path.insert(0, str(ROOT / "scripts"))
    import get_smollm2

    return get_smollm2.fetch(get_smollm2.default_dir())


def single_token_words(tokenizer: Any) -> list[str]:
    """Lower-case words that the tokenizer encodes, after a space, as exactly one token: text made of
    them has as many tokens as words, so the data's lengths are the case's token lengths."""
    space = "\u0120"  # byte-level BPE's mark of a leading space (GPT-2, Llama 3, SmolLM2)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    words = sorted({t[1:] for t in tokens if isinstance(t, str) and t.startswith(space) and t[1:].isascii()})
    words = [w for w in words if w.isalpha() and w.islower()]
    return [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]


def prepare_pretrained(case: Case, model_dir: Path, pairs: Path) -> int:
    """Links the real model's files into model_dir and writes pairs in words its tokenizer keeps whole."""
    from transformers import AutoConfig, AutoTokenizer

    source = pretrained_dir(case.pretrained)
    for item in source.iterdir():
        if item.is_file() and item.name != "DONE":
            (model_dir / item.name).symlink_to(item)
    config = AutoConfig.from_pretrained(model_dir)
    if config.vocab_size != case.vocab:
        raise SystemExit(f"{source} has vocab_size {config.vocab_size}; the case says --vocab {case.vocab}.")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = single_token_words(tokenizer)
    if len(words) < 1000:
        raise SystemExit(f"{source}'s tokenizer has {len(words)} single-token words; expected thousands.")
    write_pairs(case, words, pairs)
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())


def prepare_assets(case: Case, workdir: Path) -> Path:
    """workdir/assets-<key>/ with the tokenizer and weights (model/) and the data (pairs.jsonl)."""
    assets = workdir / f"assets-{case.asset_key()}"
    done = assets / "done.json"
    if done.is_file():
        return assets
    model_dir = assets / "model"
    if model_dir.exists():  # an interrupted preparation
        import shutil

        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    if case.pretrained:
        print(f"[{case.name}] linking {case.pretrained} and writing {case.pairs} pairs in {assets}")
        params = prepare_pretrained(case, model_dir, assets / "pairs.jsonl")
    else:
        print(f"[{case.name}] building tokenizer (vocab {case.vocab}), random model and {case.pairs} pairs in {assets}")
        build_tokenizer(case.vocab, model_dir)
        params = save_random_model(case, model_dir)
        write_pairs(case, [f"t{i}" for i in range(case.vocab - len(SPECIAL_TOKENS))], assets / "pairs.jsonl")
    done.write_text(json.dumps({"params": params, **asdict(case)}, indent=2))
    return assets


# ---- the plan: which pairs each step trains on, and their real tokens ----------------------------


@dataclass
class Plan:
    rows: list[int]  # source rows in training order (TRL reads them sequentially)
    step_tokens: list[int]  # real tokens (chosen + rejected, no padding) per optimizer step
    step_padded: list[int]  # tokens of the padded [2B, T] micro-batches per step (padded trainers)
    length_stats: dict[str, float]


def plan_steps(case: Case, assets: Path, ours_root: Path, workdir: Path) -> Plan:
    """Our trainer's tokenisation and sampler decide the pairs and their token counts."""
    sys.path.insert(0, str(ours_root))
    from transformers import AutoTokenizer

    from orpo.data import load_split
    from orpo.sampling import global_batches

    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    data = load_split(
        str(assets / "pairs.jsonl"),
        "train",
        tokenizer,
        case.max_length,
        case.max_prompt_length,
        num_proc=1,
        cache_dir=str(workdir / "cache"),
    )
    needed = case.total_steps * case.global_batch
    if len(data) < needed:
        raise SystemExit(f"{len(data)} usable pairs < {needed} needed for {case.total_steps} steps; raise --pairs.")
    batches = global_batches(len(data), case.global_batch, case.seed)
    rows, step_tokens, step_padded = [], [], []
    for _ in range(case.total_steps):
        _, indices = next(batches)
        rows += [int(data.row_index[i]) for i in indices]
        seq_lens = [[len(data.sequence(2 * i)), len(data.sequence(2 * i + 1))] for i in indices]
        step_tokens.append(sum(sum(pair) for pair in seq_lens))
        step_padded.append(
            sum(
                2 * case.micro_batch * max(max(pair) for pair in seq_lens[s : s + case.micro_batch])
                for s in range(0, case.global_batch, case.micro_batch)
            )
        )
    seqs = np.diff(data.offsets)
    prompts = data.prompt_lens[::2]
    stats = {
        "pairs": len(data),
        "prompt_mean": float(prompts.mean()),
        "prompt_max": int(prompts.max()),
        "sequence_mean": float(seqs.mean()),
        "sequence_p50": float(np.percentile(seqs, 50)),
        "sequence_p90": float(np.percentile(seqs, 90)),
        "sequence_max": int(seqs.max()),
        "truncated_share": float((seqs == case.max_length).mean()),
    }
    return Plan(rows, step_tokens, step_padded, stats)


# ---- the workers: one system in one fresh process ------------------------------------------------


class Probe:
    """Timestamps of optimizer steps and memory at the first forward, installed before training."""

    def __init__(self, cuda: bool) -> None:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.torch = torch
        self.cuda = cuda
        self.step_ends: list[float] = []
        self.step_cpu: list[float] = []
        self.machine_cpu: list[float] = []
        self.step_faults: list[int] = []
        self.at_first_forward: dict[str, float] = {}
        self.tokens: list[int] = []  # real tokens per collated micro-batch
        self.computed: list[int] = []  # of which through the model (fewer with prefix sharing)
        register_optimizer_step_post_hook(self._after_step)
        self._forward_hook = torch.nn.modules.module.register_module_forward_pre_hook(self._first_forward)

    def _after_step(self, *_: Any) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())
        self.step_cpu.append(time.process_time())  # all threads of this process
        self.machine_cpu.append(busy_cpu_seconds())  # every process on the machine
        self.step_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)  # pages touched the first time

    def _first_forward(self, *_: Any) -> None:
        self._forward_hook.remove()
        self.at_first_forward = {
            "time": time.perf_counter(),
            "rss": current_rss(),
            "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
        }
        if self.cuda:
            self.at_first_forward["cuda_allocated"] = self.torch.cuda.memory_allocated()

    def result(self) -> dict[str, Any]:
        out = {
            "step_ends": self.step_ends,
            "step_cpu": self.step_cpu,
            "machine_cpu": self.machine_cpu,
            "step_faults": self.step_faults,
            "at_first_forward": self.at_first_forward,
            "collated_tokens": self.tokens,
            "computed_tokens": self.computed,
            "maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "threads": self.torch.get_num_threads(),
        }
        if self.cuda:
            out["cuda_max_allocated"] = self.torch.cuda.max_memory_allocated()
            out["device_name"] = self.torch.cuda.get_device_name()
        return out


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ours_argv(case: Case, assets: Path, out: Path, workdir: Path) -> list[str]:
    """`train_orpo.py` arguments: the tiny recipe, pointed at the case's model, data and sizes."""
    argv = [
        "--config",
        "configs/tiny.yaml",
        f"model_name_or_path={assets / 'model'}",
        "random_init=false",
        f"mode={case.mode}",
        f"dataset={assets / 'pairs.jsonl'}",
        "eval_split=null",
        "eval_at_start=false",
        f"max_steps={case.total_steps}",
        f"per_device_batch_size={case.micro_batch}",
        f"global_batch_size={case.global_batch}",
        f"max_length={case.max_length}",
        f"max_prompt_length={case.max_prompt_length}",
        f"output_dir={out}",
        "overwrite=true",
        "logging_steps=1",
        "save_steps=0",
        f"gradient_checkpointing={str(case.gradient_checkpointing).lower()}",
        f"optim={case.optim}",
        f"learning_rate={case.learning_rate}",
        "lr_scheduler=constant",
        "warmup_ratio=0",
        "weight_decay=0",
        "max_grad_norm=1",
        f"orpo_lambda={case.orpo_lambda}",
        f"seed={case.seed}",
        f"data_cache_dir={workdir / 'cache'}",
        "data_num_proc=1",
    ]
    if case.mode != "full":
        # TRL sets every dropout to 0 (disable_dropout=True); so do we, to run the same computation.
        argv += [f"lora_r={case.lora_r}", f"lora_alpha={case.lora_alpha}", "lora_dropout=0"]
    argv.append(f"mixed_precision={ {'defaults': 'auto', 'fp32': 'no', 'bf16': 'bf16'}[case.precision] }")
    return argv + case.ours_overrides


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    case, assets, workdir = Case(**spec["case"]), Path(spec["assets"]), Path(spec["workdir"])
    sys.path.insert(0, spec["ours_root"])
    os.chdir(spec["ours_root"])
    probe = Probe(case.device == "cuda")
    import orpo.collator

    def counting(collate: Any) -> Any:
        def call(self: Any, examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collate(self, examples)
            probe.tokens.append(int(batch["num_tokens"]))  # real tokens, padded, packed or prefix-shared
            probe.computed.append(int(batch.get("num_computed_tokens", batch["num_tokens"])))
            return batch

        return call

    for name in ("PairCollator", "PackedPairCollator", "SharedPairCollator"):  # padded, padding-free, shared
        cls = getattr(orpo.collator, name, None)
        if cls is not None:
            cls.__call__ = counting(cls.__call__)
    import train_orpo

    out = workdir / f"ours-{case.name}"
    summary = train_orpo.main(train_orpo.parse_args(ours_argv(case, assets, out, workdir)))
    for weights in out.glob("*.safetensors"):  # the trained model is not needed, and can be large
        weights.unlink()
    final, plan = summary["final_metrics"], summary["plan"]
    return {
        **probe.result(),
        "own_report": {
            "tokens_per_s (all steps)": summary["tokens_per_s"],
            "train/peak_mem_gb": final.get("train/peak_mem_gb"),
        },
        "ran_with": f"mixed_precision {plan['mixed_precision']}, weights {plan['dtype']}, "
        f"gradient checkpointing {case.gradient_checkpointing}, head: {plan['head']}, "
        f"prefix sharing {plan.get('prefix_sharing', 'n/a')}" + "".join(f", {item}" for item in case.ours_env),
        "last_step": {k: final.get(f"train/{k}") for k in ("loss", "nll_loss", "or_loss", "log_odds_ratio")},
        "argv": ours_argv(case, assets, out, workdir),
    }


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    case, assets, workdir = Case(**spec["case"]), Path(spec["assets"]), Path(spec["workdir"])
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    probe = Probe(case.device == "cuda")
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    rows = [json.loads(line) for line in open(assets / "pairs.jsonl")]

    def conversation(row: dict[str, str]) -> dict[str, Any]:
        # As conversations, TRL renders them with the tokenizer's chat template, as our trainer does.
        return {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }

    dataset = Dataset.from_list([conversation(rows[i]) for i in spec["rows"]])
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    cuda = case.device == "cuda"
    load_kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
    if case.mode == "qlora":
        load_kwargs.update(
            dtype=torch.bfloat16,
            device_map={"": 0 if cuda else "cpu"},
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
        )
    else:
        load_kwargs["dtype"] = torch.bfloat16 if (cuda and case.mode == "lora") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(assets / "model", **load_kwargs)
    peft_config = None
    if case.mode != "full":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=case.lora_r,
            lora_alpha=case.lora_alpha,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            bias="none",
            task_type="CAUSAL_LM",
        )
    args = ORPOConfig(
        output_dir=str(workdir / f"trl-{case.name}"),
        max_length=case.max_length,
        beta=case.orpo_lambda,
        learning_rate=case.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim=case.optim,
        per_device_train_batch_size=case.micro_batch,
        gradient_accumulation_steps=case.accumulation,
        max_steps=case.total_steps,
        gradient_checkpointing=case.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        **({} if case.precision == "defaults" else {"bf16": case.precision == "bf16"}),  # see Case.precision
        fp16=False,
        use_cpu=not cuda,
        seed=case.seed,
        data_seed=case.seed,
        train_sampling_strategy="sequential",  # the dataset is already in our sampler's order
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = ORPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    collate = trainer.data_collator

    def counting(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features)
        real = batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()
        probe.tokens.append(int(real))
        return batch

    trainer.data_collator = counting
    ran_with = (
        f"bf16 {trainer.args.bf16}, fp16 {trainer.args.fp16}, weights {next(model.parameters()).dtype}, "
        f"gradient checkpointing {trainer.args.gradient_checkpointing}"
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    last = logged[-1] if logged else {}
    return {
        **probe.result(),
        "trl_version": trl.__version__,
        "ran_with": ran_with,
        "last_step": {k: last.get(k) for k in ("loss", "nll_loss", "log_odds_ratio")},
    }


def worker_main(system: str, spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    result = run_ours(spec) if system == "ours" else run_trl(spec)
    out_path.write_text(json.dumps(result))


# ---- the harness -------------------------------------------------------------------------------


def busy_cpu_seconds() -> float:
    """CPU time spent by the whole machine (every process), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_system(system: str, tag: str, spec: dict[str, Any], case_dir: Path) -> dict[str, Any]:
    """One fresh subprocess; its peak RSS comes from the kernel's accounting of that child alone."""
    spec_path, out_path, log_path = (case_dir / f"{tag}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, str(spec_path), str(out_path)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if system == "ours":
        env.update(item.split("=", 1) for item in spec["case"]["ours_env"])
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=spec["ours_root"], env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not out_path.is_file():
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"{system} failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    result = json.loads(out_path.read_text())
    result["peak_rss"] = usage.ru_maxrss * 1024
    result["wall"] = wall
    return result


def summarise_run(case: Case, plan: Plan, system: str, raw: dict[str, Any]) -> dict[str, Any]:
    """One run of one system: its measured steps' times, CPU use and memory."""
    ends = raw["step_ends"]
    if len(ends) != case.total_steps:
        raise SystemExit(f"{system}: {len(ends)} optimizer steps seen, expected {case.total_steps}.")
    wall = np.diff(ends[case.warmup - 1 :])
    cpu = np.diff(raw["step_cpu"][case.warmup - 1 :])
    machine_cpu = np.diff(raw["machine_cpu"][case.warmup - 1 :])
    collated = raw["collated_tokens"][: case.total_steps * case.accumulation]
    seen = [sum(collated[s : s + case.accumulation]) for s in range(0, len(collated), case.accumulation)]
    out = {
        "step_s": wall.tolist(),
        # From the first module forward (model and data loaded) to the end of the first optimizer step.
        "first_step_s": ends[0] - raw["at_first_forward"]["time"],
        # Minor page faults (first touches of memory the allocator took from the kernel): first step, later ones.
        "first_step_faults": raw["step_faults"][0] - raw["at_first_forward"]["faults"],
        "step_faults": np.diff(raw["step_faults"][case.warmup - 1 :]).tolist(),
        "step_cpu_s": cpu.tolist(),
        # Other processes compete for the machine's cores: how many they kept busy during each step.
        "others_cores": np.clip((machine_cpu - cpu) / wall, 0.0, None).tolist(),
        "tokens_per_s": sum(plan.step_tokens[case.warmup :]) / float(wall.sum()),
        "tokens_match": (seen == plan.step_tokens) if collated else None,  # None: the collator was not seen
        "seen_step_tokens": seen,
        # Tokens through the model over real tokens (below 1 with prefix sharing), training steps only.
        "computed_share": sum(raw.get("computed_tokens", [])[: len(collated)]) / sum(collated)
        if raw.get("computed_tokens")
        else None,
        "wall_s": raw["wall"],
        "threads": raw["threads"],
    }
    if case.device == "cuda":
        out["peak_mem_gb"] = raw["cuda_max_allocated"] / 1e9
        out["mem_rise_gb"] = (raw["cuda_max_allocated"] - raw["at_first_forward"]["cuda_allocated"]) / 1e9
        out["device_name"] = raw.get("device_name")
    else:
        out["peak_mem_gb"] = raw["peak_rss"] / 1e9
        out["mem_rise_gb"] = (raw["maxrss_self"] - raw["at_first_forward"]["rss"]) / 1e9
    for key in ("own_report", "trl_version", "argv", "last_step", "ran_with"):
        if key in raw:
            out[key] = raw[key]
    return out


def summarise(case: Case, plan: Plan, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Over repeats, each measured step's fastest time: other processes only ever slow a step down."""
    times = np.array([r["step_s"] for r in runs])  # [runs, steps]
    fastest = times.argmin(axis=0)
    steps = np.arange(times.shape[1])
    best = times[fastest, steps]
    # How busy the machine was during the step times kept: a number far from 0 means they are slowed.
    others = np.array([r["others_cores"] for r in runs])[fastest, steps]
    cpu = np.array([r["step_cpu_s"] for r in runs])[fastest, steps]
    tokens = sum(plan.step_tokens[case.warmup :])
    return {
        "tokens_per_s": tokens / float(best.sum()),
        "first_step_s": min((r["first_step_s"] for r in runs if "first_step_s" in r), default=None),  # older json: none
        "step_s_mean": float(best.mean()),
        "step_s_median": float(np.median(best)),
        "step_cpu_s_mean": float(cpu.mean()),  # of the step times kept
        "tokens_per_cpu_s": tokens / float(cpu.sum()),
        "pairs_per_s": case.global_batch * case.steps / float(best.sum()),
        "peak_mem_gb": max(r["peak_mem_gb"] for r in runs),
        "mem_rise_gb": max(r["mem_rise_gb"] for r in runs),
        "others_cores_mean": float(others.mean()),
        "contended_steps": int((others > 0.2).sum()),
        "tokens_match": all(r["tokens_match"] is not False for r in runs),
        "runs": runs,
    }


def wait_until_quiet(limit_s: float, threshold: float = 0.3) -> float:
    """Wait (up to limit_s) until other processes use less than `threshold` cores; returns their use."""
    deadline = time.time() + limit_s
    while True:
        busy, started = busy_cpu_seconds(), time.time()
        time.sleep(3.0)
        others = (busy_cpu_seconds() - busy) / (time.time() - started)
        if others < threshold or time.time() > deadline:
            return others


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def report(case: Case, plan: Plan, results: dict[str, dict[str, Any]]) -> str:
    """A markdown table per case: absolute numbers per system, then ours/TRL."""
    mem = "CUDA max allocated" if case.device == "cuda" else "peak RSS"
    lines = [
        f"### {case.name}: vocab {case.vocab}, {case.mode}, {case.micro_batch} pairs/micro-batch x "
        f"{case.accumulation} accumulation, max_length {case.max_length}, {case.steps} measured steps "
        f"after {case.warmup} warm-up; precision: {case.precision}"
        f"{' (each side its own default)' if case.precision == 'defaults' else ' on both sides'}",
        "",
        f"real tokens per measured step: {np.mean(plan.step_tokens[case.warmup :]):,.0f} "
        f"(padded batches: {np.mean(plan.step_padded[case.warmup :]):,.0f}, "
        f"{100 * (1 - sum(plan.step_tokens) / sum(plan.step_padded)):.0f}% padding)",
        "",
        f"| system | tokens/s (real) | step time s (mean / median) | first step s | {mem} GB "
        "| rise over first forward GB | CPU s/step | other processes, cores |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for system, r in results.items():
        first = "n/a" if r.get("first_step_s") is None else f"{r['first_step_s']:.2f}"
        lines.append(
            f"| {system} | {r['tokens_per_s']:,.0f} | {r['step_s_mean']:.2f} / {r['step_s_median']:.2f} | {first} | "
            f"{r['peak_mem_gb']:.2f} | {r['mem_rise_gb']:.2f} | {r['step_cpu_s_mean']:.1f} | "
            f"{r['others_cores_mean']:.2f}{' (!)' if r['contended_steps'] else ''} |"
        )
    if {"ours", "trl"} <= results.keys():
        o, t = results["ours"], results["trl"]
        lines.append(
            f"| **ours / TRL** | **{ratio(o['tokens_per_s'], t['tokens_per_s'])}** | "
            f"{ratio(o['step_s_mean'], t['step_s_mean'])} | | {ratio(o['peak_mem_gb'], t['peak_mem_gb'])} | "
            f"{ratio(o['mem_rise_gb'], t['mem_rise_gb'])} | {ratio(o['step_cpu_s_mean'], t['step_cpu_s_mean'])} | |"
        )
    lines.append("")
    for system, r in results.items():
        share = r["runs"][0].get("computed_share")
        if share is not None and share < 1:
            lines.append(f"- {system} put {100 * share:.0f}% of the real tokens through the model (prefix sharing)")
    for system, r in results.items():
        run = r["runs"][0]
        if run.get("step_faults"):
            lines.append(
                f"- {system}, first run: first step {run['first_step_s']:.2f} s, {run['first_step_faults']:,} minor"
                f" page faults; later steps {np.mean(run['step_s']):.2f} s, {np.mean(run['step_faults']):,.0f} faults"
            )
    for system, r in results.items():
        if r["runs"][0].get("ran_with"):
            lines.append(f"- {system} ran with: {r['runs'][0]['ran_with']}")
    for system, r in results.items():
        last = r["runs"][0].get("last_step") or {}
        lines.append(f"- {system} last step: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if v is not None))
        if r["contended_steps"]:
            lines.append(
                f"- (!) {system}: {r['contended_steps']} of {case.steps} kept step times ran while other processes "
                "used more than 0.2 cores: its wall-clock numbers are pessimistic; rerun with more --repeats."
            )
        for run in r["runs"]:
            if run["tokens_match"] is None:
                lines.append(f"- {system}: its collator was not seen, so the tokens it trained on were not checked.")
            elif not run["tokens_match"]:
                lines.append(
                    f"- WARNING: {system} collated {run['seen_step_tokens']} real tokens per step, the plan says "
                    f"{plan.step_tokens} ({100 * (sum(run['seen_step_tokens']) / sum(plan.step_tokens) - 1):+.1f}%): "
                    "the two systems did not train on exactly the same tokens (tokens/s counts the plan's for both)."
                )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import torch
    import transformers

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        info["cpu"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return info


def git_state(root: Path) -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
    except OSError:
        return "unknown"
    if head.returncode:
        return f"{root} (not a git checkout)"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="cpu-32k", help=f"comma-separated presets: {', '.join(PRESETS)}")
    parser.add_argument("--systems", default="ours,trl", help="which to run: ours,trl")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench"), help="assets, logs and results")
    parser.add_argument(
        "--ours-root", default=str(ROOT), help="checkout of this project whose trainer runs (e.g. a git archive)"
    )
    parser.add_argument(
        "--ours-override", nargs="+", default=[], metavar="key=value", help="extra overrides for our trainer"
    )
    parser.add_argument(
        "--ours-env", nargs="+", default=[], metavar="KEY=VALUE", help="environment of our worker only (LD_PRELOAD=...)"
    )
    parser.add_argument("--json-out", help="also write all results here")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="print tables from --json-out files' runs, pooled")
    parser.add_argument("--prepare-only", action="store_true", help="build the assets (tokenizer, weights, data), stop")
    parser.add_argument(
        "--repeats", type=int, default=1, help="run each system this many times, alternating; keep each step's best"
    )
    parser.add_argument(
        "--max-repeats",
        type=int,
        default=0,
        help="after --repeats, keep repeating up to this many times while a kept step ran on a busy machine",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each run, wait up to this many seconds for other processes to leave the cores idle (0: don't)",
    )
    for f in fields(Case):
        if f.name in ("name", "ours_overrides", "ours_env"):
            continue
        kind = {"bool": lambda s: s.lower() in ("1", "true", "yes"), "int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None)
    parser.add_argument("--worker", nargs=3, metavar=("SYSTEM", "SPEC", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def merge(paths: list[str]) -> None:
    """One table per case from the runs of several --json-out files (e.g. a rerun of one system)."""
    cases: dict[str, tuple[Case, Plan, dict[str, list[dict[str, Any]]]]] = {}
    for path in paths:
        for name, entry in json.loads(Path(path).read_text())["cases"].items():
            case, plan = Case(**entry["case"]), Plan(**entry["data"])
            if name in cases and (asdict(cases[name][0]), asdict(cases[name][1])) != (asdict(case), asdict(plan)):
                raise SystemExit(f"{path}: case {name!r} differs from the one in an earlier file; not merging.")
            runs = cases.setdefault(name, (case, plan, {}))[2]
            for system, result in entry["results"].items():
                runs.setdefault(system, []).extend(result["runs"])
    for case, plan, runs in cases.values():
        results = {system: summarise(case, plan, r) for system, r in sorted(runs.items())}
        print(report(case, plan, results) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker[0], Path(args.worker[1]), Path(args.worker[2]))
        return
    if args.merge:
        merge(args.merge)
        return
    systems = [s for s in args.systems.split(",") if s]
    workdir = Path(args.workdir).resolve()
    ours_root = Path(args.ours_root).resolve()
    lists = ("name", "ours_overrides", "ours_env")  # not Case flags: set below
    flags = {f.name: getattr(args, f.name) for f in fields(Case) if f.name not in lists}
    flags = {k: v for k, v in flags.items() if v is not None}
    everything: dict[str, Any] = {"machine": machine(), "ours": git_state(ours_root), "cases": {}}
    tables = []
    for name in args.cases.split(","):
        if name not in PRESETS:
            raise SystemExit(f"unknown case {name!r}; presets: {', '.join(PRESETS)}")
        if any("=" not in item for item in args.ours_env):
            raise SystemExit(f"--ours-env takes KEY=VALUE items, got {args.ours_env}")
        case = replace(
            Case(name=name, **PRESETS[name]), **flags, ours_overrides=args.ours_override, ours_env=args.ours_env
        )
        if case.global_batch % case.micro_batch:
            raise SystemExit(
                f"--global-batch {case.global_batch} is not a multiple of --micro-batch {case.micro_batch}"
            )
        if case.warmup < 1:
            raise SystemExit("--warmup must be >= 1: the first step's end is where timing starts")
        assets = prepare_assets(case, workdir)
        if args.prepare_only:
            print(f"[{name}] assets ready in {assets}")
            continue
        plan = plan_steps(case, assets, ours_root, workdir)
        print(f"[{name}] data: {json.dumps(plan.length_stats)}")
        case_dir = workdir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        case_dir.mkdir(parents=True)
        spec = {
            "case": asdict(case),
            "assets": str(assets),
            "workdir": str(case_dir),
            "ours_root": str(ours_root),
            "rows": plan.rows,
        }
        runs: dict[str, list[dict[str, Any]]] = {system: [] for system in systems}
        for repeat in range(max(args.repeats, args.max_repeats)):
            if repeat >= args.repeats and not any(summarise(case, plan, r)["contended_steps"] for r in runs.values()):
                break  # every step time kept ran on a quiet machine
            for system in systems:  # alternating, so that a busy spell of the machine hits both
                others = wait_until_quiet(args.wait_quiet) if args.wait_quiet else float("nan")
                print(f"[{name}] {system} #{repeat + 1}: {case.total_steps} steps ... ", end="", flush=True)
                tag = f"{system}-{repeat + 1}"
                r = summarise_run(case, plan, system, run_system(system, tag, spec, case_dir))
                runs[system].append(r)
                print(
                    f"{r['tokens_per_s']:,.0f} tokens/s, {np.mean(r['step_s']):.2f} s/step, "
                    f"{r['peak_mem_gb']:.2f} GB peak (other processes: {others:.1f} cores before, "
                    f"{np.mean(r['others_cores']):.1f} during)"
                )
        results = {system: summarise(case, plan, runs[system]) for system in systems}
        table = report(case, plan, results)
        tables.append(table)
        everything["cases"][name] = {"case": asdict(case), "data": asdict(plan), "results": results}
        (case_dir / "results.json").write_text(json.dumps(everything["cases"][name], indent=2))
        (case_dir / "table.md").write_text(table + "\n")
    print(f"\nmachine: {json.dumps(everything['machine'])}\nours: {everything['ours']} ({ours_root})\n")
    print("\n\n".join(tables))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(everything, indent=2))


if __name__ == "__main__":
    main()
