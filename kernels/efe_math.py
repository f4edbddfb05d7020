"""The per-row math both layouts of the Triton EFE kernel share (:mod:`qwenrl.kernels.efe_kernel`,
tile and online): the soft target, the weighted row loss, the gradient's coefficients and the
per-token stores, and the indices of the per-program partial sums and of the per-token
rows."""

from __future__ import annotations

import triton
import triton.language as tl

from qwenrl.loss.options import PER_TOKEN_FIELDS, SUM_FIELDS

# Per program: the sums of qwenrl.loss.options.SUM_FIELDS at these indices, then Σ loss.
_HARD = tl.constexpr(SUM_FIELDS.index("n_hard"))
_CORRECT = tl.constexpr(SUM_FIELDS.index("n_correct"))
_RISK = tl.constexpr(SUM_FIELDS.index("risk"))
_ENTROPY = tl.constexpr(SUM_FIELDS.index("entropy"))
_VALID = tl.constexpr(SUM_FIELDS.index("n_valid"))
_LOSS = tl.constexpr(len(SUM_FIELDS))
N_PARTIALS = tl.constexpr(len(SUM_FIELDS) + 1)
# Rows of the per-token buffer [4, N] (qwenrl.loss.options.PER_TOKEN_FIELDS).
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
    hard, valid, y_in, risk, entropy, easy_weight, beta, lse, r, z_loss, HAS_Z_LOSS: tl.constexpr
):
    """Hard-cell weight w and the row loss r·(w·(risk + β·H) + λ·lse²) (0 on ignored rows,
    NaN weight on an out-of-range target) → (hard & valid, w, loss). ``lse`` is read only
    under HAS_Z_LOSS; without row weights ``r`` is the constant 1.0, which the compiler folds
    away."""
    hard = hard & valid
    w = easy_weight + (1.0 - easy_weight) * hard.to(tl.float32)
    w = tl.where(y_in, w, float("nan"))
    loss = w * (risk + beta * entropy)
    if HAS_Z_LOSS:
        loss = loss + z_loss * lse * lse
    return hard, w, tl.where(valid, r * loss, 0.0)


@triton.jit
def _grad_coefs(w, scale, lse, r, z_loss, HAS_Z_LOSS: tl.constexpr):
    """The gradient of a row is coef·d + zcoef·q: coef = r·w·scale, zcoef = r·scale·2λ·lse
    (zcoef is 0 and unused without HAS_Z_LOSS; ``r`` is 1.0 without row weights)."""
    coef = r * (w * scale)
    zcoef = 0.0
    if HAS_Z_LOSS:
        zcoef = r * ((2.0 * z_loss * scale) * lse)
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
