"""``make gpu-check``'s plumbing, on the CPU: the refusal without CUDA and its one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_table  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
def test_gpu_check_without_cuda_exits_2_and_names_the_reason(tmp_path):
    env = dict(os.environ, PY=sys.executable, GPU_CHECK_OUT=str(tmp_path / "out"))
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "needs a CUDA GPU" in out.stderr


def _bench(impl: str, group: str, median: float, **extra) -> dict:
    """A pytest-benchmark JSON entry as bench/conftest.py's ``record`` leaves it."""
    name = f"test_x[{impl}-{group}]"
    return {
        "name": name,
        "group": group,
        "stats": {"median": median},
        "extra_info": dict(extra, impl=impl),
    }


def test_gpu_table_has_the_card_each_step_and_every_benchmark_row(tmp_path):
    (tmp_path / "device.txt").write_text("NVIDIA H100 80GB HBM3, 79 GiB, 132 SMs, 1 GPU(s)\n")
    (tmp_path / "steps.tsv").write_text(
        "triton_tests\t0\t41\nloss_bench\t124\t120\nfsdp_nccl\tskipped (one GPU)\t0\n"
    )
    group = "cuda [8192,128256] bf16"
    loss = [
        _bench("F.cross_entropy", group, 0.004, cuda_ms=4.0, gb_per_s=500.0,
               frac_of_copy_bw=0.2, speedup_vs_baseline=1.0, baseline="F.cross_entropy"),
        _bench("efe_triton", group, 0.001, cuda_ms=1.25, gb_per_s=1600.0,
               frac_of_copy_bw=0.64, speedup_vs_baseline=3.2, baseline="F.cross_entropy"),
    ]  # fmt: skip
    linear = [
        _bench("liger_flce", "lin", 0.050, extra_peak_mb=900.0,
               speedup_vs_baseline=1.0, baseline="liger_flce"),
        _bench("linear_efe_loss", "lin", 0.040, extra_peak_mb=300.0,
               speedup_vs_baseline=1.25, baseline="liger_flce"),
    ]  # fmt: skip
    (tmp_path / "loss_bench.json").write_text(json.dumps({"benchmarks": loss}))
    (tmp_path / "linear_bench.json").write_text(json.dumps({"benchmarks": linear}))
    (tmp_path / "broken_bench.json").write_text("{not json")

    assert gpu_table.main([str(tmp_path)]) == 0
    text = (tmp_path / "table.md").read_text()
    assert text.startswith("# make gpu-check on NVIDIA H100 80GB HBM3")
    assert "| triton_tests | 0 (passed) | 41 |" in text
    assert "| loss_bench | 124 (over its time limit) | 120 |" in text
    assert "| fsdp_nccl | skipped (one GPU) | 0 |" in text
    assert "| efe_triton | 1.250 | 1600 | 0.64 | 3.20x vs F.cross_entropy |" in text
    # no cuda_ms: the median in ms; the peak-memory column where every row has it
    assert "| linear_efe_loss | 40.000 | 300 | 1.25x vs liger_flce |" in text
    assert "| liger_flce | 50.000 | 900 | 1.00x vs liger_flce |" in text
    assert "broken_bench.json: no results (JSONDecodeError)" in text


def test_gpu_table_without_any_results_still_writes_a_table(tmp_path):
    assert gpu_table.main([str(tmp_path)]) == 0
    text = (tmp_path / "table.md").read_text()
    assert "unknown device (device.txt missing)" in text
    assert gpu_table.main([]) == 2
