#!/usr/bin/env bash
# make gpu-check: on a CUDA machine, in at most 8 minutes (each step has its own time limit),
#   1. the Triton kernel tests compiled on the GPU (not the interpreter),
#   2. the GPU loss benchmarks against F.cross_entropy, the plain loss under torch.compile and
#      Liger-Kernel (bench/test_loss_triton_bench.py),
#   3. linear_efe_loss on CUDA against F.linear_cross_entropy and Liger's fused linear cross
#      entropy (bench/test_linear_loss_bench.py's GPU rows),
#   4. a one-minute `python -m qwenrl.train --device cuda` run,
#   5. with 2 GPUs or more, a two-process NCCL run of `--fsdp` (torchrun),
# and writes everything under $GPU_CHECK_OUT (default gpu-check/): each step's log, bench.json
# and table.md, one table with the card's name, every step's status and every benchmark row.
set -uo pipefail
PY=${PY:-python3}
OUT=${GPU_CHECK_OUT:-gpu-check}
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
  { echo "make gpu-check needs a CUDA GPU (torch.cuda.is_available() is False)" >&2; exit 2; }
"$PY" - > "$OUT/device.txt" <<'PY'
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
      f"{torch.cuda.device_count()} GPU(s); torch {torch.__version__}, triton {triton.__version__}")
PY
cat "$OUT/device.txt"
: > "$OUT/steps.tsv"
status=0

# step NAME SECONDS CMD...: runs CMD under a time limit, logs it, records its exit status.
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit} s)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 6 "$OUT/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$OUT/steps.tsv"
  [ "$rc" -eq 0 ] || status=1
}

step triton_tests 110 env QWENRL_TRITON_TEST_DEVICE=cuda \
  "$PY" -m pytest -q -p no:cacheprovider -m triton tests/kernels tests/loss/test_conformance.py
step loss_bench 120 "$PY" -m pytest -q -p no:cacheprovider bench/test_loss_triton_bench.py \
  --benchmark-only --benchmark-json="$OUT/loss_bench.json"
step linear_bench 80 "$PY" -m pytest -q -p no:cacheprovider bench/test_linear_loss_bench.py \
  -k gpu --benchmark-only --benchmark-json="$OUT/linear_bench.json"
step train 75 "$PY" -m qwenrl.train --device cuda --epochs 1 --max_batches 150 --out "$OUT/run"
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
  step fsdp_nccl 75 "$PY" -m torch.distributed.run --nproc_per_node=2 --master_port "$port" \
    -m qwenrl.train --device cuda --fsdp --amp bf16 --epochs 1 --max_batches 60 \
    --out "$OUT/run_fsdp"
else
  printf 'fsdp_nccl\tskipped (one GPU)\t0\n' >> "$OUT/steps.tsv"
fi

"$PY" bench/gpu_table.py "$OUT"
exit $status
