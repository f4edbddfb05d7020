#!/usr/bin/env bash
# make gpu-check: on a CUDA machine, in about 8 minutes at most,
#   1. the Triton kernel tests compiled on the GPU (not the interpreter),
#   2. the GPU loss benchmarks against F.cross_entropy, the plain loss under torch.compile and
#      Liger-Kernel (bench/test_loss_triton_bench.py),
#   3. a one-minute `python -m qwenrl.train --device cuda` run,
# and writes everything under $GPU_CHECK_OUT (default gpu-check/): logs, bench.json and
# table.md, the ratio table with the card's name.
set -uo pipefail
PY=${PY:-python3}
OUT=${GPU_CHECK_OUT:-gpu-check}
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
  { echo "make gpu-check needs a CUDA GPU (torch.cuda.is_available() is False)" >&2; exit 2; }
status=0
"$PY" - > "$OUT/device.txt" <<'PY'
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs; "
      f"torch {torch.__version__}, triton {triton.__version__}")
PY

echo "== Triton tests on the GPU"
QWENRL_TRITON_TEST_DEVICE=cuda timeout 200 "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_loss_triton.py 2>&1 | tee "$OUT/triton_tests.log" | tail -n 5 || status=1

echo "== GPU benchmarks"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider bench/test_loss_triton_bench.py \
  --benchmark-only --benchmark-json="$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" |
  sed -n '/speed-ups against/,/^---/p' || status=1

echo "== one-minute training run on the GPU"
timeout 150 "$PY" -m qwenrl.train --device cuda --epochs 1 --max_batches 150 \
  --out "$OUT/run" 2>&1 | tee "$OUT/train.log" | tail -n 8 || status=1

"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = [f"# gpu-check on {(out / 'device.txt').read_text().strip()}", ""]
try:
    bench = json.loads((out / "bench.json").read_text())["benchmarks"]
except (OSError, KeyError, ValueError):
    bench = []
groups = {}
for b in bench:
    groups.setdefault(b["group"], []).append(b)
for group, rows in groups.items():
    lines += [f"## {group}", "", "| impl | ms | GB/s | of copy bw | vs baseline |", "|---|---|---|---|---|"]
    for b in rows:
        x = b["extra_info"]
        impl = b["name"].split("-")[-1].rstrip("]")
        lines.append(f"| {impl} | {x['cuda_ms']:.3f} | {x['gb_per_s']:.0f} | "
                     f"{x['frac_of_copy_bw']:.2f} | {x['speedup_vs_baseline']:.2f}x |")
    lines.append("")
(out / "table.md").write_text("\n".join(lines))
print("\n".join(lines))
PY
exit $status
