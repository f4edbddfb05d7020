"""The EFE kernel: the loss, the stat sums and the gradient of every row in one launch, in one
of two layouts chosen by the constexpr ``ONLINE``:

* tile (``ONLINE=False``, rows up to ``efe.MAX_TILE_C`` classes, e.g. ARC's C = 12): a
  [BLOCK_N, BLOCK_C] tile of whole rows in registers, many rows per program;
* online (``ONLINE=True``, wide rows: LLM vocabularies): one row per program, streamed in
  C-blocks with an online softmax, and a second pass for the gradient.

One signature serves both, so the launcher, the ahead-of-time compile and the tests call one
kernel. The launcher and the calling convention are in :mod:`qwenrl.kernels.efe`; the per-row
math both layouts share is in :mod:`qwenrl.kernels.efe_math`."""

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
def _efe_kernel(
    z_ptr,  # [N, C] logits (fp32 | bf16 | fp16)
    tgt_ptr,  # [N] int64 class indices, or [N, C] target P (log P when LOG_TARGET)
    mask_ptr,  # [N] uint8 hard mask (read when HAS_MASK)
    grad_ptr,  # [N, C] gradient out, logits' dtype (written when WRITE_GRAD; may alias z_ptr)
    loss_ptr,  # [N] fp32 per-row loss (written when WRITE_LOSS)
    part_ptr,  # [programs, N_PARTIALS] fp32 partial sums of each program's rows
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
    ONLINE: tl.constexpr,  # one row per program, streamed (else: a tile of whole rows)
    BLOCK_N: tl.constexpr,  # rows per program (tile layout; 1 when ONLINE)
    BLOCK_C: tl.constexpr,  # the padded row (tile layout) or the streamed C-block (ONLINE)
    rw_ptr=None,  # [N] row weights r_i (read when HAS_ROW_WEIGHT)
    tok_ptr=None,  # [4, N] fp32 per-token outputs (written when WRITE_PER_TOKEN)
    z_loss=0.0,  # λ (read when HAS_Z_LOSS)
    HAS_ROW_WEIGHT: tl.constexpr = False,
    HAS_Z_LOSS: tl.constexpr = False,
    WRITE_PER_TOKEN: tl.constexpr = False,
):
    pid = tl.program_id(0)
    if ONLINE:
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
            hard, valid, y_in, risk, entropy, easy_weight, beta, lse, r, z_loss, HAS_Z_LOSS
        )
        correct = valid & (arg_z == y)

        if WRITE_LOSS:
            tl.store(loss_ptr + row, loss_row)
        if WRITE_PER_TOKEN:
            _store_per_token(
                tok_ptr, row, N, pid < N, valid, y_in, lse, z_y - lse, entropy, correct
            )
        if WRITE_GRAD:
            # Pass 2: the gradient, block by block (each block is read before it is written, so
            # grad_ptr may alias z_ptr). Ignored rows write zeros without reading.
            scale = grad_scale
            if MEAN_BY_NVALID:
                scale = scale / tl.maximum(tl.load(nvalid_ptr).to(tl.float32), 1.0)
            coef, zcoef = _grad_coefs(w, scale, lse, r, z_loss, HAS_Z_LOSS)
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
    else:
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
            hard, valid, y_in, risk, entropy, easy_weight, beta, lse, r, z_loss, HAS_Z_LOSS
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
            coef, zcoef = _grad_coefs(w, scale, lse, r, z_loss, HAS_Z_LOSS)
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
