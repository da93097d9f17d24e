#!/usr/bin/env bash
# One command for one lent H100/H200 with no network: the `gpu` tests (tests/test_gpu.py) and bench case (c)
# (gpu-mistral7b-qlora: Mistral-7B architecture, random weights, QLoRA, ours vs TRL, then ours with
# torch_compile=true), every figure written to one file, $OUT/gpu_check.txt. Budgeted to finish in < 9 min:
# each stage runs under its own timeout, and what finished is in the file even when a later stage is cut.
#
#   bash bench/gpu_check.sh            # on the device: OUT is set there; elsewhere it defaults to runs/gpu_check
#
# The lent machine has Python 3.12 with torch (CUDA), transformers, accelerate, peft, tensorboard and
# safetensors, but no bitsandbytes, datasets, trl, deepspeed or flash-attn. The missing pure/binary wheels
# travel in the ignored folder .whl/ (carry it: 64 MiB in all; bitsandbytes is ~43 MB). Fill it once, here:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       bitsandbytes==0.50.2 datasets==5.2.0 trl==1.16.0 dill==0.4.1 multiprocess==0.70.19
#
# (one version of each; `unzip -p .whl/<name>*.whl '*/METADATA' | grep ^Requires-Dist` lists what else a
# wheel needs). Without trl the benchmark runs our trainer alone, and the file says so.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
REPORT="$OUT/gpu_check.txt"
PY=${PY:-python3}
WORK=${GPU_CHECK_WORKDIR:-/tmp/orpo-gpu-check}
STARTED=$(date +%s)
: >"$REPORT"
log() { echo "$*" | tee -a "$REPORT"; }
elapsed() { echo "$(($(date +%s) - STARTED)) s"; }

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || log "WARNING: installing .whl/ failed"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

log "== gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
"$PY" - <<'EOF' 2>&1 | tee -a "$REPORT"
import importlib, subprocess, torch
print(f"torch {torch.__version__} cuda {torch.version.cuda} available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device {torch.cuda.get_device_name()} capability {torch.cuda.get_device_capability()}")
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True)
    print(f"driver, memory: {out.stdout.strip() or out.stderr.strip()}")
for name in ("transformers", "accelerate", "peft", "bitsandbytes", "datasets", "trl", "flash_attn", "deepspeed"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as err:
        print(f"{name} missing ({type(err).__name__})")
from orpo.model import flash_attn_problem
print(f"flash-attn 2: {flash_attn_problem() or 'usable'}")
EOF

# ---- 1. bench assets: the random Mistral-7B-architecture model (~14.5 GB), shared with the memory test
log "== [$(elapsed)] preparing bench case (c) assets in $WORK"
timeout 180 "$PY" bench/bench_orpo.py --cases gpu-mistral7b-qlora --workdir "$WORK" --prepare-only \
    >"$OUT/prepare.log" 2>&1 || log "prepare: exit $? (see prepare.log)"
MODEL=$(ls -d "$WORK"/assets-*/model 2>/dev/null | head -n 1)
[ -n "$MODEL" ] && export ORPO_GPU_MISTRAL7B="$MODEL" && log "model: $MODEL"

# ---- 2. the gpu tests
log "== [$(elapsed)] pytest -m gpu tests/test_gpu.py"
timeout 210 "$PY" -m pytest tests/test_gpu.py -m gpu -v -rs -s -p no:cacheprovider >"$OUT/gpu_tests.log" 2>&1
log "pytest exit $?"
grep -E "PASSED|FAILED|SKIPPED|ERROR|recipe micro-batch|[0-9]+ (passed|failed)" "$OUT/gpu_tests.log" | tee -a "$REPORT"

our_metrics() {  # MFU and memory as our trainer logged them (train/ metrics of its last logging window)
    "$PY" - "$WORK"/ours-gpu-mistral7b-qlora/run_summary.json <<'EOF' 2>&1 | tee -a "$REPORT"
import json, sys
final = json.load(open(sys.argv[1]))["final_metrics"]
keys = ("train/mfu", "train/tokens_per_s", "train/peak_mem_gb", "train/reserved_mem_gb", "train/loss")
print("ours, logged: " + ", ".join(f"{k} {final[k]:.4g}" for k in keys if k in final))
EOF
}

# ---- 3. bench case (c): ours vs TRL, then ours with torch.compile
SYSTEMS=ours,trl
"$PY" -c "import trl" 2>/dev/null || { SYSTEMS=ours; log "trl not importable: our trainer alone"; }
left=$((500 - $(date +%s) + STARTED))
log "== [$(elapsed)] bench gpu-mistral7b-qlora, systems $SYSTEMS (timeout $((left * 2 / 3)) s)"
timeout $((left * 2 / 3)) "$PY" bench/bench_orpo.py --cases gpu-mistral7b-qlora --systems "$SYSTEMS" --workdir "$WORK" \
    --repeats 1 --wait-quiet 0 --json-out "$OUT/bench_c.json" >"$OUT/bench_c.log" 2>&1
log "bench exit $?"
sed -n '/^### /,$p' "$OUT/bench_c.log" | tee -a "$REPORT"
our_metrics
left=$((520 - $(date +%s) + STARTED))
if [ "$left" -gt 60 ]; then
    log "== [$(elapsed)] bench gpu-mistral7b-qlora, ours with torch_compile=true (timeout $left s)"
    timeout "$left" "$PY" bench/bench_orpo.py --cases gpu-mistral7b-qlora --systems ours --workdir "$WORK" \
        --repeats 1 --wait-quiet 0 --ours-override torch_compile=true --json-out "$OUT/bench_c_compile.json" \
        >"$OUT/bench_c_compile.log" 2>&1
    log "bench (compile) exit $?"
    sed -n '/^### /,$p' "$OUT/bench_c_compile.log" | tee -a "$REPORT"
    our_metrics
else
    log "torch_compile run skipped: ${left} s left of the 9-minute budget"
fi
log "== done in $(elapsed)"
