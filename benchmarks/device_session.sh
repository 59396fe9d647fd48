#!/usr/bin/env bash
# One prepared accelerator session: validate, then time, every kernel and train step against its
# same-run baseline, within one 10-minute command. Run from the repository root on the GPU machine
# (which has jax, flax, optax, orbax, chex, torch and timm but no network):
#
#     OUT=/some/dir bash benchmarks/device_session.sh        # (the device tool sets $OUT)
#
# Each part has its own time limit, so one part that hangs or fails does not cost the others;
# logs land in $OUT/<part>.log and $OUT/summary.txt lists each part's exit status. The parts run
# most-wanted first (issue #4's kernel targets, then the training-throughput targets). Copy the
# tables into benchmarks/RESULTS.md with the date and the device line printed at the top.
set -u
OUT=${OUT:-/tmp/jaxformers-device}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Kernel logs (Pallas/Mosaic GPU compile errors) are the point of a first session: keep them.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

part() {  # part NAME SECONDS COMMAND...: run with a limit, log, and record the exit status
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-22s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$*" | tee -a "$OUT/summary.txt"
  return $rc
}

{ date -u; { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } 2>&1
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"; } \
  | tee "$OUT/device.txt"

# 1. Kernels: correctness first (every row compares output and q/k/v gradients with the reference),
#    then the anchor shapes of shared/anchors.md. Window and packed carry the 30x / 5x / 1.6x targets.
part kernels_window_packed 160 python3 benchmarks/kernels.py --only window,packed --repeats 20
part kernels_bra 100 python3 benchmarks/kernels.py --only bra --repeats 20
part kernels_dense 70 python3 benchmarks/kernels.py --only dense --repeats 20
# 2. Training throughput against timm eager in the same run (torch.compile would eat the part's
#    time; shared/anchors.md has its compiled/eager ratio). One model per part.
#    BiFormer runs on our BRA kernels (attention_impl=pallas; the model's default is the XLA
#    gather), the Hopper (Mosaic GPU) ones on an H100/H200; should they fail, the step is timed
#    again on the Triton kernels.
part train_biformer_tiny 90 python3 benchmarks/train_throughput.py biformer_tiny --steps 10 --torch-compile off \
  --override attention_impl=pallas \
  || part train_biformer_tiny_triton 50 env JAXFORMERS_GPU_KERNEL=triton \
       python3 benchmarks/train_throughput.py biformer_tiny --steps 10 --torch-compile off --override attention_impl=pallas
part train_vit_small_patch16_224 90 python3 benchmarks/train_throughput.py vit_small_patch16_224 --steps 10 \
  --torch-compile off
part bert_throughput 40 python3 benchmarks/bert_throughput.py --repeats 10

echo "== summary"; cat "$OUT/summary.txt"
for f in "$OUT"/kernels_*.log; do echo "== $f"; grep -E "MISMATCH|failed|^(dense|window|bra|packed)" "$f" | cut -c1-150; done
