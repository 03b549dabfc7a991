#!/usr/bin/env bash
# Serving, side by side: vLLM's own client (`vllm bench serve`) against `pagoda serve` and
# against `vllm serve` on the same weights, one server at a time, rounds alternating
# pagoda, vLLM, pagoda, vLLM, ... Prints each round and each engine's medians, and writes
# every round's JSON (vLLM's --save-result format) plus a summary to $OUT.
#
#   bash scripts/peers/vllm_cpu.sh          # once: the vLLM venv (.venv-vllm)
#   bash scripts/peers/serve_compare.sh     # defaults below; override by environment:
#
#   ROUNDS=2 NUM_PROMPTS=80 INPUT_LEN=512 OUTPUT_LEN=128 RATE=1.5 TEMPERATURE=1.0
#   DTYPE=bfloat16 KV_GIB=4 OUT=bench-serve-compare PAGODA_ARGS="..." VLLM_ARGS="..."
#   VLLM_ENFORCE_EAGER=1 (skip vLLM's minutes of torch.compile at every start)
#   ENGINES="pagoda vllm" (or just one of them)
#   DATASET=random, or DATASET=prefix: vLLM's prefix_repetition set (PREFIX_LEN=1024 shared
#   tokens out of NUM_PREFIXES=8, then SUFFIX_LEN=64 of the request's own; OUTPUT_LEN out)
#
# Both servers get the bundled SmolLM2-135M: pagoda its GGUF, vLLM the same weights
# dequantized to a safetensors directory (bench/vllm_peer.py makes and caches it). The client
# sends random token prompts (--dataset-name random), --ignore-eos so every request makes
# exactly OUTPUT_LEN tokens, and an explicit temperature (vLLM's client no longer defaults to
# greedy; servers then sample at temperature 1).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
ROUNDS=${ROUNDS:-2}
NUM_PROMPTS=${NUM_PROMPTS:-80}
INPUT_LEN=${INPUT_LEN:-512}
OUTPUT_LEN=${OUTPUT_LEN:-128}
RATE=${RATE:-1.5}
TEMPERATURE=${TEMPERATURE:-1.0}
DTYPE=${DTYPE:-bfloat16}
KV_GIB=${KV_GIB:-4}
OUT=${OUT:-bench-serve-compare}
ENGINES=${ENGINES:-"pagoda vllm"}
PORT=${PORT:-8123}
DATASET=${DATASET:-random}
PREFIX_LEN=${PREFIX_LEN:-1024}
SUFFIX_LEN=${SUFFIX_LEN:-64}
NUM_PREFIXES=${NUM_PREFIXES:-8}
NAME=smollm2
VENV=${VLLM_VENV:-.venv-vllm}
mkdir -p "$OUT"

if [ ! -x "$VENV/bin/vllm-cli" ]; then
  echo "serve_compare.sh: no vLLM venv at $VENV; make it with: bash scripts/peers/vllm_cpu.sh" >&2
  exit 2
fi
[ -x .venv/bin/pagoda ] || bash scripts/setup.sh

HF_DIR=$(.venv/bin/python - "$DTYPE" <<'EOF'
import sys
import torch
from pagoda.bench.vllm_peer import hf_model_dir
from pagoda.models.loader import DTYPES, default_model_path
print(hf_model_dir(default_model_path(), DTYPES[sys.argv[1]]))
EOF
)

server_pid=""
stop_server() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -INT -- "-$server_pid" 2>/dev/null || kill -INT "$server_pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$server_pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$server_pid" 2>/dev/null || true
  fi
  server_pid=""
}
trap stop_server EXIT

wait_healthy() {   # $1: log file; vLLM's first start compiles for minutes
  for _ in $(seq 900); do
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then return 0; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
      echo "serve_compare.sh: the server died; its log: $1" >&2; tail -20 "$1" >&2; exit 1
    fi
    sleep 1
  done
  echo "serve_compare.sh: the server did not come up in 15 min; its log: $1" >&2; exit 1
}

start_server() {   # $1: engine
  local log="$OUT/$1-server.log"
  if [ "$1" = pagoda ]; then
    # shellcheck disable=SC2086
    setsid .venv/bin/pagoda serve --port "$PORT" --served-model-name "$NAME" --dtype "$DTYPE" \
      --kv-cache-memory "$KV_GIB" ${PAGODA_ARGS:-} >"$log" 2>&1 &
  else
    local eager=()
    [ "${VLLM_ENFORCE_EAGER:-0}" = 1 ] && eager=(--enforce-eager)
    # shellcheck disable=SC2086
    VLLM_CPU_KVCACHE_SPACE=$KV_GIB setsid "$VENV/bin/vllm-cli" serve "$HF_DIR" --port "$PORT" \
      --served-model-name "$NAME" --dtype "$DTYPE" "${eager[@]}" ${VLLM_ARGS:-} >"$log" 2>&1 &
  fi
  server_pid=$!
  wait_healthy "$log"
}

dataset_args() {
  if [ "$DATASET" = prefix ]; then
    echo --dataset-name prefix_repetition --prefix-repetition-prefix-len "$PREFIX_LEN" \
      --prefix-repetition-suffix-len "$SUFFIX_LEN" --prefix-repetition-num-prefixes \
      "$NUM_PREFIXES" --prefix-repetition-output-len "$OUTPUT_LEN"
  else
    echo --dataset-name random --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN"
  fi
}

run_client() {   # $1: engine, $2: round
  # shellcheck disable=SC2046
  "$VENV/bin/vllm-cli" bench serve --backend openai --base-url "http://127.0.0.1:$PORT" \
    --endpoint /v1/completions --model "$NAME" --tokenizer "$HF_DIR" $(dataset_args) \
    --num-prompts "$NUM_PROMPTS" --request-rate "$RATE" --seed 0 --ignore-eos \
    --temperature "$TEMPERATURE" --percentile-metrics ttft,tpot,itl --metric-percentiles 50,99 \
    --save-result --save-detailed --result-dir "$OUT" --result-filename "$1-$2.json" >"$OUT/$1-$2.client.log" 2>&1 \
    || { echo "serve_compare.sh: vllm bench serve failed; see $OUT/$1-$2.client.log" >&2; exit 1; }
}

for round in $(seq "$ROUNDS"); do
  for engine in $ENGINES; do
    echo "== round $round: $engine ==" >&2
    start_server "$engine"
    run_client "$engine" "$round"
    stop_server
    sleep 2
  done
done

.venv/bin/python - "$OUT" "$ROUNDS" $ENGINES <<'EOF'
import json, statistics, sys
out, rounds, engines = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
keys = [("output_throughput", "output tok/s"), ("mean_ttft_ms", "mean TTFT ms"),
        ("mean_tpot_ms", "mean TPOT ms"), ("median_itl_ms", "median ITL ms"),
        ("p99_itl_ms", "p99 ITL ms"), ("p99_ttft_ms", "p99 TTFT ms")]
runs = {e: [json.load(open(f"{out}/{e}-{r}.json")) for r in range(1, rounds + 1)] for e in engines}
summary = {}
print(f"{'metric':16s}" + "".join(f"{e + ' (rounds)':>34s}{e + ' median':>16s}" for e in engines))
for key, label in keys:
    line = f"{label:16s}"
    for e in engines:
        vals = [r.get(key) for r in runs[e]]
        vals = [v for v in vals if v is not None]
        med = statistics.median(vals) if vals else float("nan")
        summary.setdefault(e, {})[key] = {"rounds": vals, "median": med}
        line += f"{' / '.join(f'{v:.1f}' for v in vals):>34s}{med:16.1f}"
    print(line)
if len(engines) == 2:
    a, b = engines
    ratio = summary[a]["output_throughput"]["median"] / summary[b]["output_throughput"]["median"]
    print(f"{a} / {b} output tok/s: {ratio:.2f}x")
    summary["ratio_output_throughput"] = ratio
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(f"json: {out}/summary.json")
EOF
