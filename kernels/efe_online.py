"""The online kernel: one row per program, streamed in C-blocks with an online softmax
(wide rows: LLM vocabularies), and a second pass for the gradient.

The launcher and the calling convention are in :mod:`qwenrl.kernels.efe`."""

from __future__ import annotations

import triton
import triton.language as tl

from qwenrl.kernels.efe_math import (
    _CORRECT,
    _ENTROPY,
    _HARD,
    _LOSS,
    _RISK,
    _VALID,
    N_PARTIALS,
    _grad_coefs,
    _soft_target,
    _store_per_token,
    _weighted_loss,
)


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
