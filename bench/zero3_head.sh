#!/usr/bin/env bash
# ZeRO-3, 2 processes: the chunked head (calling the partitioned head chunk by chunk) against full
# logits, on the cpu-32k case's model and pairs (run bench_orpo.py --cases cpu-32k --prepare-only
# first; ASSETS is the assets-* directory it printed). Prints rank 0's peak RSS, tokens/s, last loss.
#   bash bench/zero3_head.sh runs/bench/assets-<hash> [accelerate config, default zero3]
set -euo pipefail
ASSETS=${1:?usage: bench/zero3_head.sh ASSETS_DIR [zero3|zero3_offload]}
ACCEL=${2:-zero3}
PY=${PY:-.venv/bin/python}
port=29650
for chunked in true false; do
  port=$((port + 1))
  out=runs/bench/zero3-head/chunked_$chunked
  "$PY" -m accelerate.commands.launch --config_file "accelerate_configs/$ACCEL.yaml" --num_processes 2 \
    --main_process_ip 127.0.0.1 --main_process_port "$port" train_orpo.py --config configs/tiny.yaml \
    model_name_or_path="$ASSETS/model" dataset="$ASSETS/pairs.jsonl" eval_split=null max_length=1024 \
    max_prompt_length=512 global_batch_size=4 per_device_batch_size=2 max_steps=5 learning_rate=8e-6 \
    lr_scheduler=constant warmup_ratio=0 logging_steps=1 save_steps=0 output_dir="$out" \
    data_cache_dir=runs/bench/zero3-head/cache overwrite=true chunked_head=$chunked > "$out.log" 2>&1
  "$PY" -c "import json, sys; s = json.load(open(sys.argv[1])); m = s['final_metrics']; \
print(f\"chunked_head={sys.argv[2]}: {s['plan']['head']}; peak RSS {m['train/peak_mem_gb']:.2f} GB, \
{m['train/tokens_per_s']:,.0f} tokens/s (last step), loss {m['train/loss']:.6f}\")" "$out/run_summary.json" "$chunked"
done
