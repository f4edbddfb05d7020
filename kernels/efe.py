"""Fused Triton kernel for the expected-free-energy loss (``docs/loss.md``).

One launch computes, for every row, the loss, the stat sums and the gradient of the reduced
loss w.r.t. the logits. The kernel (``efe_kernel.py``, the per-row math in ``efe_math.py``) has
two layouts behind its constexpr ``ONLINE``; this module picks one and launches it:

* tile (rows up to ``MAX_TILE_C`` classes, e.g. ARC's C = 12): a [BLOCK_N, BLOCK_C] tile of
  whole rows in registers, many rows per program, so the logits are read once and the
  gradient written once.
* online (wider rows, LLM vocabularies up to ~152k): one row per program. Pass 1 streams the
  row in C-blocks with an online softmax that also carries Σ e·(z − m) for the entropy; pass 2
  reads the row again to write the gradient (skipped without a gradient).

Nothing synchronises the host: N_valid for ``mean`` is a device scalar that the kernel loads,
and the stats are per-program partial sums that torch ops reduce on the device afterwards.

The options ``row_weight`` (r_i), ``z_loss`` (λ) and the per-token outputs each sit behind a
constexpr flag (HAS_ROW_WEIGHT, HAS_Z_LOSS, WRITE_PER_TOKEN): off, none of their code is
compiled in. Their arguments come last, with defaults, so a launch without them (as
``bench/gpu_compile.py`` makes) is the plain loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch
import triton
from torch import Tensor

from qwenrl.kernels.efe_kernel import _efe_kernel
from qwenrl.kernels.efe_math import N_PARTIALS
from qwenrl.loss.options import PER_TOKEN_FIELDS, SUM_FIELDS

__all__ = [
    "LaunchConfig",
    "N_PARTIALS",
    "_efe_kernel",
    "efe_forward_triton",
    "kernel_flags",
    "launch_config",
    "picks_online",
]

MAX_TILE_C = 8192  # widest row the tile layout keeps whole in registers
TILE_ELEMS = 2048  # BLOCK_N · BLOCK_C of a tile-layout program
# The online layout streams C-blocks of 4096 with 8 warps (16 elements per thread per block).
# ptxas caps a program at 65536 / (2 · threads) registers, to fit two per SM: 8192 with 16
# warps (64 registers) spilled in 13 of the 252 soft-target / smoothing variants on sm_80/90,
# and 8192 with 8 warps (128) in 8; 4096 with 8 warps spills in none (bench/gpu_compile.py).
ONLINE_BLOCK_C = 4096
ONLINE_NUM_WARPS = 8


def _num_warps(elems: int) -> int:
    """8 elements per thread, 4 to 32 warps. A 1 × 8192 tile at 16 warps (128 registers)
    spilled on sm_100 with soft targets and smoothing; at 32 warps it takes 64 and does not."""
    return max(4, min(32, elems // 256))


def picks_online(n_classes: int) -> bool:
    """The default layout: online when the padded row is wider than ``MAX_TILE_C``."""
    return triton.next_power_of_2(n_classes) > MAX_TILE_C


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How one [N, C] call is launched: which layout, its grid and block sizes, num_warps."""

    online: bool  # the kernel's layout: one streamed row per program, or a tile of rows
    programs: int  # grid = (programs,)
    block_n: int | None  # rows per program (tile layout); None for the online layout
    block_c: int  # padded row (tile layout) or streamed C-block (online layout)
    num_warps: int

    @property
    def meta(self) -> dict[str, Any]:
        """The layout and block sizes as the kernel's constexpr keyword arguments."""
        return dict(ONLINE=self.online, BLOCK_N=self.block_n or 1, BLOCK_C=self.block_c)


def launch_config(
    n_rows: int,
    n_classes: int,
    *,
    online: bool | None = None,
    block_n: int | None = None,
    block_c: int | None = None,
) -> LaunchConfig:
    """The launch :func:`_launch` makes for [n_rows, n_classes] logits.

    Plain ints in, no tensors and no device: ``bench/gpu_compile.py`` compiles exactly these
    configurations ahead of time. ``online``, ``block_n`` and ``block_c`` are the overrides of
    :func:`efe_forward_triton` (``online=None``: :func:`picks_online`).
    """
    if online is None:
        online = picks_online(n_classes)
    if online:
        block_c = block_c or min(ONLINE_BLOCK_C, triton.next_power_of_2(n_classes))
        num_warps = min(ONLINE_NUM_WARPS, _num_warps(block_c))
        return LaunchConfig(True, n_rows, None, block_c, num_warps)
    block_c = triton.next_power_of_2(n_classes)
    block_n = block_n or max(1, min(TILE_ELEMS // block_c, triton.next_power_of_2(n_rows)))
    programs = triton.cdiv(n_rows, block_n)
    return LaunchConfig(False, programs, block_n, block_c, _num_warps(block_n * block_c))


def kernel_flags(
    *,
    soft: bool,
    log_target: bool,
    label_smoothing: float,
    reduction: str,
    has_mask: bool,
    has_grad: bool,
    has_row_weight: bool = False,
    z_loss: float = 0.0,
    per_token: bool = False,
) -> dict[str, bool]:
    """The kernel's constexpr flags for one call of :func:`efe_forward_triton` (pure: the
    ahead-of-time compile in ``bench/gpu_compile.py`` enumerates its reachable outputs).

    The last three (row weights, z-loss, per-token outputs) default to off: the plain loss."""
    return dict(
        SOFT=bool(soft),
        LOG_TARGET=bool(log_target),
        SMOOTH=label_smoothing > 0.0,
        HAS_MASK=bool(has_mask),
        WRITE_GRAD=bool(has_grad),
        WRITE_LOSS=reduction == "none",
        # Class targets divide by N_valid on the device; soft targets by N (grad_scale).
        MEAN_BY_NVALID=bool(has_grad) and reduction == "mean" and not soft,
        HAS_ROW_WEIGHT=bool(has_row_weight),
        HAS_Z_LOSS=z_loss != 0.0,
        WRITE_PER_TOKEN=bool(per_token),
    )


def _plogp_class(eps: float, n_classes: int) -> float:
    """Σ p log p of (1-ε)·onehot + ε/C, in float64 on the host (no tensor involved)."""
    if eps <= 0.0:
        return 0.0
    hi, lo = 1.0 - eps + eps / n_classes, eps / n_classes
    return hi * math.log(hi) + (n_classes - 1) * lo * math.log(lo)


def _launch(
    logits: Tensor,
    target: Tensor,
    mask: Tensor | None,
    grad: Tensor | None,
    loss_rows: Tensor | None,
    nvalid: Tensor | None,
    scalars: tuple,
    flags: dict,
    *,
    row_weight: Tensor | None,
    per_token_out: Tensor | None,
    z_loss: float,
    online: bool,
    block_n: int | None,
    block_c: int | None,
) -> Tensor:
    """Launches the kernel; returns its per-program partial sums [programs, N_PARTIALS]."""
    n, c = logits.shape
    cfg = launch_config(n, c, online=online, block_n=block_n, block_c=block_c)
    part = torch.empty((cfg.programs, N_PARTIALS), dtype=torch.float32, device=logits.device)
    # Unused pointers get any valid tensor: their constexpr flag keeps them unread/unwritten.
    _efe_kernel[(cfg.programs,)](
        logits,
        target,
        mask if mask is not None else part,
        grad if grad is not None else logits,
        loss_rows if loss_rows is not None else part,
        part,
        nvalid if nvalid is not None else part,
        n,
        c,
        *scalars,
        **flags,
        **cfg.meta,
        # The options' arguments: None (a constexpr) when their flag is off, as in a launch
        # that leaves them out.
        rw_ptr=row_weight,
        tok_ptr=per_token_out,
        z_loss=float(z_loss),
        num_warps=cfg.num_warps,
    )
    return part


def efe_forward_triton(
    logits: Tensor,
    target: Tensor,
    hard_mask: Tensor | None,
    grad: Tensor | None,
    *,
    row_weight: Tensor | None = None,
    soft: bool,
    log_target: bool,
    tau: float,
    easy_weight: float,
    entropy_weight: float,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    z_loss: float = 0.0,
    per_token_out: Tensor | None = None,
    online: bool | None = None,
    block_n: int | None = None,
    block_c: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused EFE forward (+ gradient) in one Triton launch; the fused-backend convention.

    Args:
        logits: [N, C] contiguous fp32/bf16/fp16 logits.
        target: [N] int64 class indices, or [N, C] contiguous float target (log P when
            ``log_target``).
        hard_mask: optional [N] bool, replaces the ``q[y] < tau`` rule.
        grad: optional [N, C] output (logits' dtype, may be ``logits`` itself): receives the
            gradient of the reduced loss (of each row's own loss for ``'none'``), with each
            row's factor r_i and the z-loss term: r_i·scale·(w_i·d_i + 2λ·lse_i·q_i).
        row_weight: optional [N] float r_i (any sign), multiplies each row's loss and
            gradient; the sums are not weighted.
        z_loss: λ, adds λ·lse_i² to each row's loss (before r_i).
        per_token_out: optional [4, N] contiguous float32 output: the per-row
            ``PER_TOKEN_FIELDS`` (logprob, entropy, correct, lse); 0 on ignored rows, NaN
            floats and correct = 0 on a NaN row.
        online: force the row-per-program online layout (True) or the tile layout (False);
            default: online when the row is wider than ``MAX_TILE_C``.
        block_n, block_c: override the tile layout's rows per program and the online layout's
            C-block (tests use them to exercise several programs and C-blocks).

    Returns:
        (loss, sums): fp32 loss ([N] for ``'none'``, 0-dim otherwise) and fp32 sums [5] =
        (n_hard, n_correct, Σ risk, Σ entropy, n_valid), all on the logits' device.
    """
    n, c = logits.shape
    device = logits.device
    if row_weight is not None:
        if row_weight.shape != (n,):
            raise ValueError(f"row_weight must be [{n}], got {tuple(row_weight.shape)}")
        row_weight = row_weight.contiguous()
    if per_token_out is not None:
        want = (len(PER_TOKEN_FIELDS), n)
        if (
            per_token_out.shape != want
            or per_token_out.dtype != torch.float32
            or not per_token_out.is_contiguous()
        ):
            raise ValueError(
                f"per_token_out must be a contiguous float32 {list(want)} tensor, got "
                f"{per_token_out.dtype} {list(per_token_out.shape)}"
            )
    if n == 0:
        loss = torch.zeros((0,) if reduction == "none" else (), dtype=torch.float32, device=device)
        return loss, torch.zeros(5, dtype=torch.float32, device=device)
    eps = float(label_smoothing)
    grad_scale = 1.0 / n if reduction == "mean" and soft else 1.0
    loss_rows = torch.empty(n, dtype=torch.float32, device=device) if reduction == "none" else None
    mask = hard_mask.view(torch.uint8) if hard_mask is not None else None
    scalars = (
        int(ignore_index),
        float(tau),
        float(easy_weight),
        float(entropy_weight),
        eps,
        _plogp_class(eps, c),
        grad_scale,
    )
    flags = kernel_flags(
        soft=soft,
        log_target=log_target,
        label_smoothing=eps,
        reduction=reduction,
        has_mask=hard_mask is not None,
        has_grad=grad is not None,
        has_row_weight=row_weight is not None,
        z_loss=float(z_loss),
        per_token=per_token_out is not None,
    )
    # N_valid stays on the device: the kernel loads it.
    nvalid = (target != ignore_index).sum() if flags["MEAN_BY_NVALID"] else None
    if online is None:
        online = picks_online(c)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        part = _launch(
            logits,
            target,
            mask,
            grad,
            loss_rows,
            nvalid,
            scalars,
            flags,
            row_weight=row_weight,
            per_token_out=per_token_out,
            z_loss=z_loss,
            online=online,
            block_n=block_n,
            block_c=block_c,
        )
    # Reduced on the device, each into a fresh tensor (not a view of one [6] total).
    sums = part[:, : len(SUM_FIELDS)].sum(0)
    if reduction == "none":
        loss = loss_rows
    elif reduction == "sum":
        loss = part[:, len(SUM_FIELDS)].sum()
    else:
        loss = part[:, len(SUM_FIELDS)].sum() / sums[SUM_FIELDS.index("n_valid")].clamp(min=1.0)
    return loss, sums
