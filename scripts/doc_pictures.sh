#!/usr/bin/env bash
# The benchmark pictures in docs/images/, made by pagoda's own benchmarks on this machine
# (about 12 minutes on 2 cores; run it on an otherwise idle machine). Each picture's page
# names the command below that made it. The inspector's screenshot comes from
# tests/server/test_inspector_browser.py instead.
set -euo pipefail
cd "$(dirname "$0")/.."
P=${PAGODA:-.venv/bin/pagoda}
OUT=docs/images
WORK=$(mktemp -d /tmp/pagoda-pictures.XXXXXX)
mkdir -p "$OUT"

serve_until_done() {  # PORT ARGS... : start a server, wait until it answers
  local port=$1; shift
  $P serve --port "$port" "$@" >"$WORK/server-$port.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
    sleep 1
  done
  echo "server on $port did not come up: $WORK/server-$port.log" >&2
  return 1
}

# Prefix caching: TTFT with caching on and off (docs/prefix_caching.md).
$P bench prefix --num-prefixes 4 --requests-per-prefix 8 --no-unique-run --plot "$WORK"
cp "$WORK/prefix-shared-ttft-cdf.png" "$OUT/prefix-caching-ttft-cdf.png"

# Chunked prefill (docs/chunked_prefill.md) and continuous batching's steps
# (docs/continuous_batching.md): the long-mix workload against one server with chunked
# prefill and one without.
for mode in chunked whole; do
  extra=()
  [ "$mode" = whole ] && extra=(--no-chunked-prefill)
  serve_until_done 8090 --max-num-batched-tokens 256 "${extra[@]}"
  $P bench serve --base-url http://127.0.0.1:8090 --dataset long-mix --num-prompts 40 \
    --request-rate 1 --seed 0 --json "$WORK/$mode.json" --plot "$WORK/$mode" \
    --plot-label "$mode"
  kill "$SERVER"; wait "$SERVER" || true
done
$P bench plot "$WORK/chunked.json" "$WORK/whole.json" \
  --labels "chunked prefill (256),whole prompts" --name chunked-prefill --plot "$WORK" \
  --title "long-mix, 1 request/s"
cp "$WORK/chunked-prefill-itl-cdf.png" "$OUT/chunked-prefill-itl-cdf.png"
cp "$WORK/chunked/serve-steps.png" "$OUT/continuous-batching-steps.png"
cp "$WORK/whole/serve-steps.png" "$OUT/continuous-batching-steps-unchunked.png"

# Routing (docs/routing.md): round robin against cache-aware over two replicas.
$P bench route --request-rate 3 --num-prompts 96 \
  --policies round_robin,cache_aware_precise --plot "$WORK"
cp "$WORK/route-prefixes-ttft-cdf.png" "$OUT/routing-ttft-cdf.png"

# Speculative decoding (docs/speculative_decoding.md) and structured outputs
# (docs/structured_outputs.md), offline.
$P bench spec --rounds 2 --w1-num-prompts 32 --plot "$WORK" --json "$WORK/spec.json"
cp "$WORK/spec-decode-tokens-per-s.png" "$OUT/spec-decode-tokens-per-s.png"
$P bench structured --num-prompts 32 --output-len 128 --rounds 1 --plot "$WORK"
cp "$WORK/structured-mask-cdf.png" "$OUT/structured-mask-cdf.png"

# Disaggregated prefill (docs/disaggregated_prefill.md): a prefill and a decode instance, a
# core each, behind the router, against one colocated server on both cores.
$P bench disagg --plot "$WORK" --json "$WORK/disagg.json"
cp "$WORK/disagg-itl-cdf.png" "$OUT/disaggregated-itl-cdf.png"

echo "pictures in $OUT (work files in $WORK)"
