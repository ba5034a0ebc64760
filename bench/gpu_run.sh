#!/usr/bin/env bash
# Everything this project measures on a GPU, as prepared runs of at most 10 minutes each (written for one H100).
# PLAN=serve (the default) measures the forward and the server:
#   1. bench/gpu_check.py: bf16 parity, padded batches, the prefix cache, full-shape (3B) throughput (eager and
#      with CUDA graphs, against the GPU-forward targets), the
#      one-time cost of new batch shapes (padded to a multiple of 16 and of 1), fp16 and bf16 against fp32
#      on the full shape;
#   2. bench/bench_server.py --device cuda, unchanged, on the "small" random config: one sentence per request,
#      client threads in one process (4 items per request on this config: measured twice,
#      bench/results/2026-11-27-h100*);
#   3. on the full 3B shape, random bf16 weights written on the GPU (`nova tiny --size full`): open-loop load
#      (bench/bench_load.py: Poisson arrivals from 8 client processes, swept to saturation, with the clients'
#      own CPU use; with --cuda-graphs when step 1 found the graphs exact, OPEN_LOOP_GRAPHS=0 to not; extra flags
#      in OPEN_LOOP_ARGS, e.g. --http-workers 4), then 4 items per request and one sentence per request, closed loop.
# PLAN=train measures `nova train`'s large contrastive batch (about 4 minutes):
#   4. bench/bench_train.py on the full 3B shape, LoRA rank 32, bf16 autocast, gradient checkpointing: a contrastive
#      batch of 1,024 query/passage pairs (passages of 100 words, about 100 tokens) embedded 32 at a time
#      (GradCache), against a batch of 32 (memory) and the 1,024 in one graph (time per triplet): triplets/s,
#      tokens/s and peak memory.
# Each step has its own time limit, so one that hangs does not hide the others; logs go to $OUT (or
# /tmp/nova-gpu) and the key lines are printed again at the end.
#
# Wheels for what the GPU machine lacks (transformers>=5.20, starlette, uvicorn, httptools, peft), when
# present in .whl/, are installed to /tmp/site first: see docs/performance.md for the download command.
# Smoke mode, the same steps on this CPU (tests/test_bench_scripts.py runs it, with LIMIT_SCALE=3: each step's
# time limit times 3, for a busy CI machine):
#   DEVICE=cpu SIZE_CHECK=tiny SKIP_FULL=1 SKIP_WHEELS=1 ITEMS=64 PY=.venv/bin/python bash bench/gpu_run.sh
#   PLAN=train DEVICE=cpu SKIP_FULL=1 SKIP_WHEELS=1 TRAIN_BATCH=64 PY=.venv/bin/python bash bench/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/nova-gpu}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
ITEMS=${ITEMS:-128}
ROUNDS=${ROUNDS:-2}
PLAN=${PLAN:-serve}
case "$PLAN" in serve|train) ;; *) echo "PLAN must be serve or train, not '$PLAN'" >&2; exit 2 ;; esac
mkdir -p "$OUT"
if [ -z "${SKIP_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NOVA_HOME=${NOVA_HOME:-/tmp/nova-home}
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a limit (times LIMIT_SCALE), log to $OUT/NAME.log, remember a failure
    local name=$1 limit=$(( $2 * ${LIMIT_SCALE:-1} ))
    shift 2
    echo "=== $name: $* ($(date -u +%T) UTC, limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    grep -v -e "Loading weights" -e "^round " "$OUT/$name.log" | tail -n 40
    echo "=== $name: exit $rc ($(date -u +%T) UTC)"
    [ "$rc" = 0 ] || failed+=("$name (exit $rc)")
}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  nproc; } | tee "$OUT/machine.log"

full_model=(--model /tmp/nova-full)
[ -z "${SKIP_FULL:-}" ] || full_model=()  # smoke mode: the tiny checkpoint
[ -n "${SKIP_FULL:-}" ] || step full-write 40 "$PY" -m nova.cli tiny /tmp/nova-full --size full --device "$DEVICE"

if [ "$PLAN" = train ]; then
    step train 420 "$PY" bench/bench_train.py --device "$DEVICE" "${full_model[@]}" --precision bf16 --rank 32 \
        --batch "${TRAIN_BATCH:-1024}" --mini "${TRAIN_MINI:-32}" --hard-negatives 0 --passage-words 100 \
        --gradient-checkpointing --small-steps 2 --large-steps 1
    echo "=== summary"
    grep -h -e "triplets/s" -e "^memory" -e "^time per triplet" "$OUT/train.log"
    [ ${#failed[@]} -eq 0 ] || { echo "FAILED: ${failed[*]}"; exit 1; }
    echo "all steps passed"
    exit 0
fi

step check 220 "$PY" bench/gpu_check.py --device "$DEVICE" --size "${SIZE_CHECK:-full}" --json "$OUT/check.json"
step small-sentences 90 "$PY" bench/bench_server.py --device "$DEVICE" --items "$ITEMS" --rounds "$ROUNDS" --mode sentences
# whether one Python load generator paces the server: the open-loop step prints its client processes' CPU use
load_model=("${full_model[@]}")
[ -z "${SKIP_FULL:-}" ] || load_model=(--size tiny)
# ~25 s to load the server and the in-process model, a few to warm up, ~6 s per rate: 80 s with these settings
# the server's target is with the graph-captured forward where it exists: --cuda-graphs (server and encode()
# alike) once the check above found graphs exact on this GPU (all three comparisons ok); OPEN_LOOP_GRAPHS=0: off
graphs=()
if [ "${OPEN_LOOP_GRAPHS:-1}" = 1 ] && [ "$DEVICE" = cuda ] \
        && [ "$(grep -c '^  graphs vs eager, .* ok$' "$OUT/check.log")" -ge 3 ] \
        && ! grep -q '^  graphs vs eager, .* FAIL$' "$OUT/check.log"; then
    graphs=(--cuda-graphs)
fi
echo "=== open-loop forward: ${graphs[*]:-eager}"
# shellcheck disable=SC2086  # OPEN_LOOP_ARGS: extra flags, word-split on purpose
step open-loop 80 "$PY" bench/bench_load.py --device "$DEVICE" "${load_model[@]}" --client-processes 8 \
    --start-rate 100 --duration 2 --drain 4 --refine 1 --sentences 256 --encode-batch-sizes 32,64 --closed-loop 32 \
    "${graphs[@]}" ${OPEN_LOOP_ARGS:-}
if [ -z "${SKIP_FULL:-}" ]; then
    step full-items 70 "$PY" bench/bench_server.py --device "$DEVICE" --items "$ITEMS" --rounds "$ROUNDS" --model /tmp/nova-full
    step full-sentences 100 "$PY" bench/bench_server.py --device "$DEVICE" --items "$ITEMS" --rounds "$ROUNDS" --model /tmp/nova-full \
        --mode sentences
fi

echo "=== summary"
grep -h -e "^device:" -e " ok$" -e "FAIL" -e "P50" -e "here (" -e "padded to a multiple" -e "target " -e "cuda graphs:" -e "three adapters / one" -e "prefix buckets" "$OUT/check.log"
for name in small-sentences open-loop full-items full-sentences; do
    [ -f "$OUT/$name.log" ] || continue
    echo "--- $name"
    grep -h -e "^model:" -e "in-process encode" -e "^ \+[0-9]\+ " -e "target" -e "mixed-adapter" -e "instructions" \
        -e "beyond" -e "HTTP errors" -e "server over the run" -e "where a request" -e "^ *rate " -e "^ \+[0-9.]\+ " \
        -e "^saturation" -e "^lone request" -e "^closed loop" -e "^reference" "$OUT/$name.log"
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all steps passed"
