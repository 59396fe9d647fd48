#!/usr/bin/env bash
# One prepared accelerator session: validate, then time, every kernel and train step against its
# same-run baseline, inside one command of at most $BUDGET seconds. Run from the repository root on
# the GPU machine (which has jax, flax, optax, orbax, chex, torch and timm but no network):
#
#     OUT=/some/dir BUDGET=500 bash benchmarks/device_session.sh     # (the device tool sets $OUT)
#
# The train steps compile (minutes: BiFormer-T's holds 42 Pallas kernels) in background processes
# while the kernel benchmarks have the device, and run their steps only once released, one at a
# time, after the kernel parts: nothing but XLA's autotuning of those steps' matrix products shares
# the device with a timing. Each part has its own limit, cut to the budget left, so one that hangs
# or fails does not cost the others. Logs: $OUT/<part>.log (8 files at most: what the device tool
# brings back); $OUT/summary.txt has the device and each part's exit status. Copy the tables into
# benchmarks/RESULTS.md with the date and the device line printed at the top.
set -u
OUT=${OUT:-/tmp/jaxformers-device}
BUDGET=${BUDGET:-500}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the device
GO=$(mktemp -d)  # a background part runs its steps once $GO/<part> exists
declare -A PID STARTED

left() { echo $((BUDGET - SECONDS)); }
record() { printf '%-26s rc=%-4s %4ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$OUT/summary.txt"; }

part() {  # part NAME SECONDS COMMAND...: run now, limited to SECONDS and the budget left
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  (( limit > $(left) )) && limit=$(left)
  if (( limit < 10 )); then record "$name" skip 0 "$* (no time left)"; return 1; fi
  timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  record "$name" "$rc" $((SECONDS - start)) "$*"
  return "$rc"
}

background() {  # background NAME COMMAND...: compile now (train_throughput.py --wait-for), run when released
  local name=$1
  shift
  STARTED[$name]=$SECONDS
  timeout "$(left)" "$@" --wait-for "$GO/$name" >>"$OUT/$name.log" 2>&1 &
  PID[$name]=$!
}

release() {  # release NAME SECONDS: let NAME run its steps; wait for it at most SECONDS (and the budget)
  local name=$1 limit=$2 pid=${PID[$1]}
  (( limit > $(left) )) && limit=$(left)
  touch "$GO/$name"
  local until=$((SECONDS + limit))
  while kill -0 "$pid" 2>/dev/null && (( SECONDS < until )); do sleep 1; done
  kill "$pid" 2>/dev/null
  wait "$pid"
  local rc=$?
  record "$name" "$rc" $((SECONDS - ${STARTED[$name]})) "(compiled in the background from ${STARTED[$name]}s)"
  return "$rc"
}

{ date -u; { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true; } 2>&1
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"; } 2>&1 \
  | tee -a "$OUT/summary.txt"

# Train steps against their baselines: BiFormer-T on our BRA kernels (attention_impl=pallas; auto
# picks the Mosaic GPU kernels on Hopper) and on the XLA gather (the model's default); ViT-S against
# timm eager (torch.compile would eat the budget; ANCHORS.md has its compiled/eager ratio).
TRAIN="python3 benchmarks/train_throughput.py --steps 20"
background train_biformer_tiny $TRAIN biformer_tiny --no-timm --override attention_impl=pallas
background train_biformer_tiny_xla $TRAIN biformer_tiny --no-timm
background train_vit_small $TRAIN vit_small_patch16_224 --torch-compile off

# Kernels: correctness first (each row compares output and q/k/v gradients with the reference;
# the window part also checks odd shapes and masks), then the anchor shapes of benchmarks/ANCHORS.md.
part kernels_bra 120 python3 benchmarks/kernels.py --only bra --repeats 20
part kernels_window_packed 150 python3 benchmarks/kernels.py --only window,packed --repeats 20
part kernels_dense 70 python3 benchmarks/kernels.py --only dense --repeats 20

release train_biformer_tiny 90 \
  || part train_biformer_tiny 120 env JAXFORMERS_GPU_KERNEL=triton \
       $TRAIN biformer_tiny --no-timm --override attention_impl=pallas
release train_biformer_tiny_xla 40
release train_vit_small 60
part bert_throughput 90 python3 benchmarks/bert_throughput.py --repeats 10
for pid in "${PID[@]}"; do kill "$pid" 2>/dev/null; done
rm -rf "$GO"

echo "== summary"; cat "$OUT/summary.txt"
for f in "$OUT"/kernels_*.log; do
  echo "== $f"; grep -E "MISMATCH|failed|bandwidth|^(dense|window|bra|packed)" "$f" | cut -c1-160
done
for f in "$OUT"/train_*.log "$OUT"/bert_*.log; do echo "== $f"; grep -vE "^\s*$|Warning|warn" "$f" | tail -6 | cut -c1-200; done
