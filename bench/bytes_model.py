"""Bytes the fused EFE kernels move on one training call, and the H100 time that predicts.

The call: [N, C] logits, int64 class targets, reduction ``'mean'``, gradient written (the
trainer's call and an LLM head's). For each shape, the kernel ``launch_config`` picks:

* **min bytes**: the logits read once, the targets read once, the gradient written once, plus
  the loss and its 5 stats (24 B) — what any fused kernel has to move.
* **kernel bytes**: what the kernel moves by construction (``kernels/efe.py``), assuming no
  reuse from L2:

  - tile kernel: each [BLOCK_N, BLOCK_C] tile read once, the targets, the gradient written
    once, and [programs, 6] fp32 partial sums;
  - online kernel: pass 1 streams the row, pass 2 reads it again to write the gradient; plus
    the target's logit z[y] (one 32-byte sector), the target, and [N, 6] partial sums.

  Padding columns and masked lanes are not fetched, so they cost nothing.
* **time** at 3.35 TB/s (H100 SXM, HBM3 peak), and **fraction** = min / kernel bytes: the
  share of the traffic that is necessary (1.0 = every byte read or written once).

Not counted: the small side kernels of ``efe_forward_triton`` (N_valid = Σ target ≠ ignore,
N·8 bytes, and the reduction of the partial sums).

    python bench/bytes_model.py   # prints the table
"""

from __future__ import annotations

import dataclasses

import torch

from qwenrl.kernels import efe
from qwenrl.loss.dispatch import grad_dtype

H100_BYTES_PER_S = 3.35e12  # H100 SXM HBM3
SECTOR = 32  # bytes: what one scattered element load (z[y]) costs in DRAM traffic
# (N, C, logits dtype): an LLM head (Llama-3 vocabulary), Liger-Kernel's benchmark shape, ARC.
SHAPES = (
    (8192, 128256, torch.bfloat16),
    (16384, 131072, torch.float32),
    (28800, 12, torch.float32),
)


@dataclasses.dataclass(frozen=True)
class Traffic:
    """The bytes-moved model of one [n, c] call on one kernel."""

    n: int
    c: int
    dtype: str  # logits dtype, e.g. "bfloat16"
    kernel: str  # "tile" | "online"
    forced: bool  # the kernel was forced (online=True), not the launcher's default
    min_bytes: int
    kernel_bytes: int

    @property
    def fraction(self) -> float:
        return self.min_bytes / self.kernel_bytes

    @property
    def t_min_s(self) -> float:
        return self.min_bytes / H100_BYTES_PER_S

    @property
    def t_kernel_s(self) -> float:
        return self.kernel_bytes / H100_BYTES_PER_S


def traffic(n: int, c: int, dtype: torch.dtype, *, online: bool | None = None) -> Traffic:
    """The model for [n, c] logits of ``dtype`` on the kernel ``launch_config`` picks."""
    cfg = efe.launch_config(n, c, online=online)
    is_online = cfg.online
    logits = n * c * dtype.itemsize
    grad = n * c * grad_dtype(dtype).itemsize  # float32 for float16 logits
    target = n * 8  # int64 class indices
    partials = cfg.programs * int(efe.N_PARTIALS.value) * 4
    min_bytes = logits + target + grad + 24
    if is_online:  # two reads of the row: pass 1 (softmax stats), pass 2 (the gradient)
        kernel_bytes = 2 * logits + n * SECTOR + target + grad + partials
    else:
        kernel_bytes = logits + target + grad + partials
    return Traffic(
        n,
        c,
        str(dtype).removeprefix("torch."),
        "online" if is_online else "tile",
        online is not None,
        min_bytes,
        kernel_bytes,
    )


def rows() -> list[Traffic]:
    """Every shape on its default kernel, and ARC's [28800, 12] on the online kernel too."""
    out = [traffic(n, c, dtype) for n, c, dtype in SHAPES]
    out.append(traffic(28800, 12, torch.float32, online=True))
    return out


def _bytes(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e9 else f"{x / 1e6:.2f} MB"


def _time(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.2f} µs"


def table(model: list[Traffic]) -> str:
    """A markdown table of ``model``."""
    lines = [
        "| shape | logits | kernel | min bytes | kernel bytes | fraction | "
        "time at min bytes | predicted H100 time (3.35 TB/s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in model:
        kernel = f"{t.kernel} (forced)" if t.forced else t.kernel
        lines.append(
            f"| [{t.n}, {t.c}] | {t.dtype} | {kernel} | {_bytes(t.min_bytes)} | "
            f"{_bytes(t.kernel_bytes)} | {t.fraction:.2f} | {_time(t.t_min_s)} | "
            f"{_time(t.t_kernel_s)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(rows()))
