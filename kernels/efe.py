"""Fused Triton kernels for the expected-free-energy loss (``docs/loss.md``).

One launch computes, for every row, the loss, the stat sums and the gradient of the reduced
loss w.r.t. the logits. Two kernels share the same math:

* ``_efe_tile_kernel`` (rows up to ``MAX_TILE_C`` classes, e.g. ARC's C = 12): a
  [BLOCK_N, BLOCK_C] tile of whole rows in registers, many rows per program, so the logits are
  read once and the gradient written once.
* ``_efe_online_kernel`` (wider rows, LLM vocabularies up to ~152k): one row per program.
  Pass 1 streams the row in C-blocks with an online softmax that also carries Σ e·(z − m) for
  the entropy; pass 2 reads the row again to write the gradient (skipped without a gradient).

Nothing synchronises the host: N_valid for ``mean`` is a device scalar that the kernels load,
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
import triton.language as tl
from torch import Tensor

from qwenrl.loss.options import SUM_FIELDS
from qwenrl.loss.reference import PER_TOKEN_FIELDS

MAX_TILE_C = 8192  # widest row the tile kernel keeps whole in registers
TILE_ELEMS = 2048  # BLOCK_N · BLOCK_C of a tile-kernel program
# The online kernel streams C-blocks of 4096 with 8 warps (16 elements per thread per block).
# ptxas caps a program at 65536 / (2 · threads) registers, to fit two per SM: 8192 with 16
# warps (64 registers) spilled in 13 of the 252 soft-target / smoothing variants on sm_80/90,
# and 8192 with 8 warps (128) in 8; 4096 with 8 warps spills in none (bench/gpu_compile.py).
ONLINE_BLOCK_C = 4096
ONLINE_NUM_WARPS = 8
# Per program: the sums of qwenrl.loss.options.SUM_FIELDS at these indices, then Σ loss.
_HARD = tl.constexpr(SUM_FIELDS.index("n_hard"))
_CORRECT = tl.constexpr(SUM_FIELDS.index("n_correct"))
_RISK = tl.constexpr(SUM_FIELDS.index("risk"))
_ENTROPY = tl.constexpr(SUM_FIELDS.index("entropy"))
_VALID = tl.constexpr(SUM_FIELDS.index("n_valid"))
_LOSS = tl.constexpr(len(SUM_FIELDS))
N_PARTIALS = tl.constexpr(len(SUM_FIELDS) + 1)
# Rows of the per-token buffer [4, N] (qwenrl.loss.reference.PER_TOKEN_FIELDS).
_LOGPROB = tl.constexpr(PER_TOKEN_FIELDS.index("logprob"))
_TOK_ENTROPY = tl.constexpr(PER_TOKEN_FIELDS.index("entropy"))
_TOK_CORRECT = tl.constexpr(PER_TOKEN_FIELDS.index("correct"))
_LSE = tl.constexpr(PER_TOKEN_FIELDS.index("lse"))


@triton.jit
def _soft_target(t, eps, C, LOG_TARGET: tl.constexpr, SMOOTH: tl.constexpr):
    """Soft-target values as loaded → (p, log p): exp for ``log_target``, then smoothing."""
    if LOG_TARGET:
        prob = tl.exp(t)
    else:
        prob = t
    if SMOOTH:
        p = (1.0 - eps) * prob + eps / C
        log_p = tl.log(tl.where(p > 0, p, 1.0))
    elif LOG_TARGET:
        p = prob
        log_p = t
    else:
        p = prob
        log_p = tl.log(tl.where(prob > 0, prob, 1.0))
    return p, log_p


@triton.jit
def _weighted_loss(
    hard,
    valid,
    y_in,
    risk,
    entropy,
    easy_weight,
    beta,
    lse,
    r,
    z_loss,
    HAS_ROW_WEIGHT: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
):
    """Hard-cell weight w and the row loss r·(w·(risk + β·H) + λ·lse²) (0 on ignored rows,
    NaN weight on an out-of-range target) → (hard & valid, w, loss). ``r`` and ``lse`` are
    read only under their flags."""
    hard = hard & valid
    w = easy_weight + (1.0 - easy_weight) * hard.to(tl.float32)
    w = tl.where(y_in, w, float("nan"))
    loss = w * (risk + beta * entropy)
    if HAS_Z_LOSS:
        loss = loss + z_loss * lse * lse
    if HAS_ROW_WEIGHT:
        loss = r * loss
    return hard, w, tl.where(valid, loss, 0.0)


@triton.jit
def _grad_coefs(w, scale, lse, r, z_loss, HAS_ROW_WEIGHT: tl.constexpr, HAS_Z_LOSS: tl.constexpr):
    """The gradient of a row is coef·d + zcoef·q: coef = r·w·scale, zcoef = r·scale·2λ·lse
    (zcoef is 0 and unused without HAS_Z_LOSS)."""
    coef = w * scale
    zcoef = 0.0
    if HAS_Z_LOSS:
        zcoef = (2.0 * z_loss * scale) * lse
    if HAS_ROW_WEIGHT:
        coef = r * coef
        zcoef = r * zcoef
    return coef, zcoef


@triton.jit
def _store_per_token(tok_ptr, rows, N, row_in, valid, y_in, lse, log_q_y, entropy, correct):
    """The per-token outputs of these rows (PER_TOKEN_FIELDS): 0 on ignored rows; on a NaN
    row (NaN or +inf logits, every class masked, an out-of-range class target) NaN floats and
    correct = 0, as the C++ kernel. Such a row is the one whose lse is not finite (NaN, or -inf
    when every class is masked), or whose target is out of range."""
    bad = (tl.abs(lse) < float("inf")) == 0
    bad = bad | (y_in == 0)
    nan = float("nan")
    logprob = tl.where(valid, tl.where(bad, nan, log_q_y), 0.0)
    ent = tl.where(valid, tl.where(bad, nan, entropy), 0.0)
    hit = tl.where(correct & (bad == 0), 1.0, 0.0)
    lse_out = tl.where(valid, tl.where(bad, nan, lse), 0.0)
    tl.store(tok_ptr + _LOGPROB * N + rows, logprob, mask=row_in)
    tl.store(tok_ptr + _TOK_ENTROPY * N + rows, ent, mask=row_in)
    tl.store(tok_ptr + _TOK_CORRECT * N + rows, hit, mask=row_in)
    tl.store(tok_ptr + _LSE * N + rows, lse_out, mask=row_in)


@triton.jit
def _efe_tile_kernel(
    z_ptr,  # [N, C] logits (fp32 | bf16 | fp16)
    tgt_ptr,  # [N] int64 class indices, or [N, C] target P (log P when LOG_TARGET)
    mask_ptr,  # [N] uint8 hard mask (read when HAS_MASK)
    grad_ptr,  # [N, C] gradient out, logits' dtype (written when WRITE_GRAD; may alias z_ptr)
    loss_ptr,  # [N] fp32 per-row loss (written when WRITE_LOSS)
    part_ptr,  # [programs, N_PARTIALS] fp32 partial sums of this program's rows
    nvalid_ptr,  # [] int64 number of valid rows (read when MEAN_BY_NVALID)
    N,
    C,
    ignore_index,
    tau,
    easy_weight,
    beta,
    eps,
    plogp_class,  # Σ p log p of a smoothed one-hot target (class targets)
    grad_scale,
    SOFT: tl.constexpr,
    LOG_TARGET: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    MEAN_BY_NVALID: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    rw_ptr=None,  # [N] row weights r_i (read when HAS_ROW_WEIGHT)
    tok_ptr=None,  # [4, N] fp32 per-token outputs (written when WRITE_PER_TOKEN)
    z_loss=0.0,  # λ (read when HAS_Z_LOSS)
    HAS_ROW_WEIGHT: tl.constexpr = False,
    HAS_Z_LOSS: tl.constexpr = False,
    WRITE_PER_TOKEN: tl.constexpr = False,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    row_in = rows < N
    col_in = cols < C
    tile_in = row_in[:, None] & col_in[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]

    z = tl.load(z_ptr + offs, mask=tile_in, other=0.0).to(tl.float32)
    z = tl.where(col_in[None, :], z, float("-inf"))  # padding columns: masked classes
    m = tl.max(z, 1)
    e = tl.exp(z - m[:, None])  # 0 on masked classes (a -inf logit) and padding
    live = z > float("-inf")
    zs = tl.where(live, z - m[:, None], 0.0)  # finite, so that 0·log 0 = 0 where q = 0
    s = tl.sum(e, 1)
    log_s = tl.log(s)
    log_q = zs - log_s[:, None]  # log q where live; a finite stand-in where q = 0
    q = e / s[:, None]
    entropy = log_s - tl.sum(e * zs, 1) / s
    arg_z = tl.argmax(z, 1)

    if SOFT:
        t = tl.load(tgt_ptr + offs, mask=tile_in, other=0.0).to(tl.float32)
        p, log_p = _soft_target(t, eps, C, LOG_TARGET, SMOOTH)
        p = tl.where(col_in[None, :], p, 0.0)
        plogp = tl.sum(tl.where(p > 0, p * log_p, 0.0), 1)
        sum_p = tl.sum(p, 1)[:, None]
        y = tl.argmax(p, 1)
        valid = row_in
        y_in = row_in
    else:
        y = tl.load(tgt_ptr + rows, mask=row_in, other=ignore_index)
        valid = row_in & (y != ignore_index)
        y_in = (y >= 0) & (y < C)  # an out-of-range target gives a NaN row, never a stray read
        p = tl.where(cols[None, :] == y[:, None], 1.0 - eps + eps / C, eps / C)
        p = tl.where(col_in[None, :], p, 0.0)
        plogp = plogp_class
        sum_p = 1.0
    # p ≠ 0 on a class with q = 0 makes the risk infinite, as in cross-entropy.
    p_log_q = tl.where(live, p * log_q, tl.where(p != 0, float("-inf"), 0.0))
    risk = plogp - tl.sum(p_log_q, 1)
    risk = tl.where(y_in, risk, float("nan"))

    q_y = tl.sum(tl.where(cols[None, :] == y[:, None], q, 0.0), 1)
    if WRITE_PER_TOKEN:
        # log q[y] from the tile (never read again from memory: grad may alias the logits),
        # -inf when the target class is masked, as in the reference. Taken here, where live
        # and log_q are live anyway: later, live would be kept for it (spills at 1 × 8192).
        log_q_live = tl.where(live, log_q, float("-inf"))
        log_q_y = tl.sum(tl.where(cols[None, :] == y[:, None], log_q_live, 0.0), 1)
    if HAS_MASK:
        hard = tl.load(mask_ptr + rows, mask=row_in, other=0) != 0
    else:
        hard = q_y < tau
    lse = m + log_s
    r = 1.0
    if HAS_ROW_WEIGHT:
        r = tl.load(rw_ptr + rows, mask=row_in, other=0.0).to(tl.float32)
    hard, w, loss_row = _weighted_loss(
        hard,
        valid,
        y_in,
        risk,
        entropy,
        easy_weight,
        beta,
        lse,
        r,
        z_loss,
        HAS_ROW_WEIGHT,
        HAS_Z_LOSS,
    )
    correct = valid & (arg_z == y)

    if WRITE_LOSS:
        tl.store(loss_ptr + rows, loss_row, mask=row_in)
    if WRITE_PER_TOKEN:
        _store_per_token(tok_ptr, rows, N, row_in, valid, y_in, lse, log_q_y, entropy, correct)
    if WRITE_GRAD:
        scale = grad_scale
        if MEAN_BY_NVALID:
            scale = scale / tl.maximum(tl.load(nvalid_ptr).to(tl.float32), 1.0)
        coef, zcoef = _grad_coefs(w, scale, lse, r, z_loss, HAS_ROW_WEIGHT, HAS_Z_LOSS)
        g = (sum_p * q - p) - beta * q * (log_q + entropy[:, None])
        g = coef[:, None] * g
        if HAS_Z_LOSS:
            g = g + zcoef[:, None] * q
        g = tl.where(valid[:, None], g, 0.0)
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=tile_in)

    out = part_ptr + pid * N_PARTIALS
    tl.store(out + _HARD, tl.sum(hard.to(tl.float32), 0))
    tl.store(out + _CORRECT, tl.sum(correct.to(tl.float32), 0))
    tl.store(out + _RISK, tl.sum(tl.where(valid, risk, 0.0), 0))
    tl.store(out + _ENTROPY, tl.sum(tl.where(valid, entropy, 0.0), 0))
    tl.store(out + _VALID, tl.sum(valid.to(tl.float32), 0))
    tl.store(out + _LOSS, tl.sum(loss_row, 0))


@triton.jit
def _efe_online_kernel(
    z_ptr,  # [N, C] logits (fp32 | bf16 | fp16)
    tgt_ptr,  # [N] int64 class indices, or [N, C] target P (log P when LOG_TARGET)
    mask_ptr,  # [N] uint8 hard mask (read when HAS_MASK)
    grad_ptr,  # [N, C] gradient out, logits' dtype (written when WRITE_GRAD; may alias z_ptr)
    loss_ptr,  # [N] fp32 per-row loss (written when WRITE_LOSS)
    part_ptr,  # [N, N_PARTIALS] fp32 partial sums of this program's row
    nvalid_ptr,  # [] int64 number of valid rows (read when MEAN_BY_NVALID)
    N,
    C,
    ignore_index,
    tau,
    easy_weight,
    beta,
    eps,
    plogp_class,  # Σ p log p of a smoothed one-hot target (class targets)
    grad_scale,
    SOFT: tl.constexpr,
    LOG_TARGET: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    MEAN_BY_NVALID: tl.constexpr,
    BLOCK_C: tl.constexpr,
    rw_ptr=None,  # [N] row weights r_i (read when HAS_ROW_WEIGHT)
    tok_ptr=None,  # [4, N] fp32 per-token outputs (written when WRITE_PER_TOKEN)
    z_loss=0.0,  # λ (read when HAS_Z_LOSS)
    HAS_ROW_WEIGHT: tl.constexpr = False,
    HAS_Z_LOSS: tl.constexpr = False,
    WRITE_PER_TOKEN: tl.constexpr = False,
):
    pid = tl.program_id(0)
    row = pid.to(tl.int64)
    z_row = z_ptr + row * C
    t_row = tgt_ptr + row * C
    cols = tl.arange(0, BLOCK_C)
    if SOFT:
        valid = pid < N
        y_in = pid < N
    else:
        y = tl.load(tgt_ptr + row)
        valid = y != ignore_index
        y_in = (y >= 0) & (y < C)  # an out-of-range target gives a NaN row, never a stray read
        z_y = tl.load(z_row + tl.where(y_in & valid, y, 0)).to(tl.float32)

    # Pass 1: running max m, s = Σ e^(z-m), t = Σ e^(z-m)·(z-m), rescaled as m grows.
    # Ignored rows are never read (an empty range), their results are discarded below.
    c_end = tl.where(valid, C, 0)
    m = float("-inf")
    s = 0.0
    t = 0.0
    arg_z = 0
    sum_zs = 0.0  # class targets with smoothing: Σ_c (z_c - m)
    plogp = 0.0  # soft targets: Σ p log p, Σ p·(z - m), Σ p, and argmax p with z there
    pzs = 0.0
    sum_p = 0.0
    p_best = -1.0
    y_soft = 0
    z_soft = 0.0
    for c0 in tl.range(0, c_end, BLOCK_C):
        offs = c0 + cols
        inb = offs < C
        z = tl.load(z_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
        blk_max = tl.max(z, 0)
        arg_z = tl.where(blk_max > m, c0 + tl.argmax(z, 0), arg_z)
        m_new = tl.maximum(m, blk_max)
        # While every class so far is masked (-inf), subtract 0, never -inf - (-inf).
        m_sub = tl.where(m_new > float("-inf"), m_new, 0.0)
        shift = m - m_sub  # -inf until the first unmasked class: the guards drop it
        alpha = tl.exp(shift)
        e = tl.exp(z - m_sub)  # 0 on masked classes and padding
        live = z > float("-inf")
        zs_raw = tl.where(inb, z - m_sub, 0.0)  # -inf on masked classes
        zs = tl.where(live, zs_raw, 0.0)  # finite, so that 0·log 0 = 0 where q = 0
        t = alpha * (t + tl.where(s > 0, shift * s, 0.0)) + tl.sum(e * zs, 0)
        s = alpha * s + tl.sum(e, 0)
        if SOFT:
            tv = tl.load(t_row + offs, mask=inb, other=0.0).to(tl.float32)
            p, log_p = _soft_target(tv, eps, C, LOG_TARGET, SMOOTH)
            p = tl.where(inb, p, 0.0)
            plogp += tl.sum(tl.where(p > 0, p * log_p, 0.0), 0)
            p_zs = tl.where(p != 0, p * zs_raw, 0.0)  # -inf where p ≠ 0 but q = 0
            pzs = pzs + tl.where(sum_p > 0, shift * sum_p, 0.0) + tl.sum(p_zs, 0)
            sum_p += tl.sum(p, 0)
            blk_pmax = tl.max(p, 0)
            blk_parg = tl.argmax(p, 0)
            better = blk_pmax > p_best
            y_soft = tl.where(better, c0 + blk_parg, y_soft)
            z_soft = tl.where(better, tl.sum(tl.where(cols == blk_parg, z, 0.0), 0), z_soft)
            p_best = tl.maximum(p_best, blk_pmax)
        elif SMOOTH:
            sum_zs = sum_zs + tl.where(c0 > 0, shift * c0, 0.0) + tl.sum(zs_raw, 0)
        m = m_new

    log_s = tl.log(s)
    lse = m + log_s
    entropy = log_s - t / s
    if SOFT:
        y = y_soft
        z_y = z_soft
        risk = plogp - (pzs - sum_p * log_s)
    else:
        sum_p = 1.0
        cross = z_y - lse  # log q_y
        if SMOOTH:
            cross = (1.0 - eps) * cross + eps / C * (sum_zs - C * log_s)
        risk = tl.where(y_in, plogp_class - cross, float("nan"))

    if HAS_MASK:
        hard = tl.load(mask_ptr + row) != 0
    else:
        hard = tl.exp(z_y - lse) < tau
    r = 1.0
    if HAS_ROW_WEIGHT:
        r = tl.load(rw_ptr + row).to(tl.float32)
    hard, w, loss_row = _weighted_loss(
        hard,
        valid,
        y_in,
        risk,
        entropy,
        easy_weight,
        beta,
        lse,
        r,
        z_loss,
        HAS_ROW_WEIGHT,
        HAS_Z_LOSS,
    )
    correct = valid & (arg_z == y)

    if WRITE_LOSS:
        tl.store(loss_ptr + row, loss_row)
    if WRITE_PER_TOKEN:
        _store_per_token(tok_ptr, row, N, pid < N, valid, y_in, lse, z_y - lse, entropy, correct)
    if WRITE_GRAD:
        # Pass 2: the gradient, block by block (each block is read before it is written, so
        # grad_ptr may alias z_ptr). Ignored rows write zeros without reading.
        scale = grad_scale
        if MEAN_BY_NVALID:
            scale = scale / tl.maximum(tl.load(nvalid_ptr).to(tl.float32), 1.0)
        coef, zcoef = _grad_coefs(w, scale, lse, r, z_loss, HAS_ROW_WEIGHT, HAS_Z_LOSS)
        g_row = grad_ptr + row * C
        for c0 in tl.range(0, C, BLOCK_C):
            offs = c0 + cols
            inb = offs < C
            z = tl.load(z_row + offs, mask=offs < c_end, other=0.0).to(tl.float32)
            log_q = z - lse
            q = tl.exp(log_q)
            log_q = tl.where(z > float("-inf"), log_q, 0.0)  # q = 0 there: 0·log 0 = 0
            if SOFT:
                tv = tl.load(t_row + offs, mask=offs < c_end, other=0.0).to(tl.float32)
                p, _ = _soft_target(tv, eps, C, LOG_TARGET, SMOOTH)
            else:
                p = tl.where(offs == y, 1.0 - eps + eps / C, eps / C)
            g = coef * ((sum_p * q - p) - beta * q * (log_q + entropy))
            if HAS_Z_LOSS:
                g = g + zcoef * q
            g = tl.where(valid, g, 0.0)
            tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=inb)

    out = part_ptr + row * N_PARTIALS
    tl.store(out + _HARD, hard.to(tl.float32))
    tl.store(out + _CORRECT, correct.to(tl.float32))
    tl.store(out + _RISK, tl.where(valid, risk, 0.0))
    tl.store(out + _ENTROPY, tl.where(valid, entropy, 0.0))
    tl.store(out + _VALID, valid.to(tl.float32))
    tl.store(out + _LOSS, loss_row)


def _num_warps(elems: int) -> int:
    """8 elements per thread, 4 to 32 warps. A 1 × 8192 tile at 16 warps (128 registers)
    spilled on sm_100 with soft targets and smoothing; at 32 warps it takes 64 and does not."""
    return max(4, min(32, elems // 256))


def picks_online(n_classes: int) -> bool:
    """The default kernel: online when the padded row is wider than ``MAX_TILE_C``."""
    return triton.next_power_of_2(n_classes) > MAX_TILE_C


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How one [N, C] call is launched: which kernel, its grid and block sizes, num_warps."""

    kernel: Any  # _efe_tile_kernel or _efe_online_kernel
    programs: int  # grid = (programs,)
    block_n: int | None  # rows per program (tile kernel); None for the online kernel
    block_c: int  # padded row (tile kernel) or streamed C-block (online kernel)
    num_warps: int

    @property
    def meta(self) -> dict[str, int]:
        """The block sizes as the kernel's constexpr keyword arguments."""
        if self.block_n is None:
            return dict(BLOCK_C=self.block_c)
        return dict(BLOCK_N=self.block_n, BLOCK_C=self.block_c)


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
        return LaunchConfig(_efe_online_kernel, n_rows, None, block_c, num_warps)
    block_c = triton.next_power_of_2(n_classes)
    block_n = block_n or max(1, min(TILE_ELEMS // block_c, triton.next_power_of_2(n_rows)))
    programs = triton.cdiv(n_rows, block_n)
    return LaunchConfig(_efe_tile_kernel, programs, block_n, block_c, _num_warps(block_n * block_c))


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
    """The kernels' constexpr flags for one call of :func:`efe_forward_triton` (pure: the
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
    """Launches one kernel; returns its per-program partial sums [programs, N_PARTIALS]."""
    n, c = logits.shape
    cfg = launch_config(n, c, online=online, block_n=block_n, block_c=block_c)
    part = torch.empty((cfg.programs, N_PARTIALS), dtype=torch.float32, device=logits.device)
    # Unused pointers get any valid tensor: their constexpr flag keeps them unread/unwritten.
    cfg.kernel[(cfg.programs,)](
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
        online: force the row-per-program online kernel (True) or the tile kernel (False);
            default: online when the row is wider than ``MAX_TILE_C``.
        block_n, block_c: override the tile kernel's rows per program and the online kernel's
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
