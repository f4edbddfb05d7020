"""The expected-free-energy loss in plain PyTorch: the spec (``docs/loss.md``) and the fallback.

Every fused kernel (C++ on CPU, Triton on GPU) is tested against this file. It works on
flattened inputs: ``logits`` [N, C], ``target`` [N] class indices or [N, C] probabilities.

Per valid row i, with q = softmax(z_i) in fp32 (or the input dtype when ``upcast=False``)::

    p_i    = (1-ε)·onehot(y_i) + ε/C          (soft targets: (1-ε)·P_i + ε/C)
    risk_i = KL(p_i ‖ q_i)                     (0·log 0 = 0)
    amb_i  = H(q_i)
    hard_i = q_i[y_i] < τ                      (soft: y_i = argmax P_i; or a given mask)
    w_i    = w_e + (1 - w_e)·hard_i            (not differentiated)
    lse_i  = log Σ_c exp(z_ic)
    loss_i = r_i·(w_i·(risk_i + β·amb_i) + λ·lse_i²)   (r_i: row_weight, 1 if not given;
                                                         λ: z_loss)

The per-row outputs (``return_per_token``) are, on valid rows, ``logprob`` = log q_i[y_i],
``entropy`` = H(q_i), ``correct`` = (argmax z_i == y_i) and ``lse`` = lse_i; all four are 0
on ignored rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qwenrl.loss.options import PER_TOKEN_FIELDS, REDUCTIONS, SUM_FIELDS

STAT_NAMES = ("mask_ratio", "accuracy", "risk", "entropy", "n_valid")


def per_token_by_name(per_token: Tensor) -> dict[str, Tensor]:
    """The fused kernels' float32 [4, N] per-row buffer (:data:`PER_TOKEN_FIELDS`) by name;
    ``correct`` as bool."""
    out = {name: per_token[i] for i, name in enumerate(PER_TOKEN_FIELDS)}
    out["correct"] = out["correct"] != 0
    return out


def sums_by_name(sums: Tensor) -> dict[str, Tensor]:
    """The [5] sums every backend returns, by name (:data:`SUM_FIELDS`)."""
    return {name: sums[i] for i, name in enumerate(SUM_FIELDS)}


def stats_from_sums(sums: Tensor) -> dict[str, Tensor]:
    """Turns the per-call sums every backend produces into the loss's stats.

    ``sums`` is a float32 tensor [5] (:data:`SUM_FIELDS`: n_hard, n_correct, Σ risk, Σ entropy,
    n_valid). The divisions stay on the device (no host sync); with no valid rows every mean
    is 0.
    """
    s = sums_by_name(sums)
    denom = s["n_valid"].clamp(min=1.0)
    return {
        "mask_ratio": s["n_hard"] / denom,
        "accuracy": s["n_correct"] / denom,
        "risk": s["risk"] / denom,
        "entropy": s["entropy"] / denom,
        "n_valid": s["n_valid"],
    }


def efe_loss_reference(
    logits: Tensor,
    target: Tensor,
    *,
    tau: float = 0.6,
    easy_weight: float = 0.5,
    entropy_weight: float = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    log_target: bool = False,
    z_loss: float = 0.0,
    hard_mask: Tensor | None = None,
    row_weight: Tensor | None = None,
    upcast: bool = True,
    return_per_token: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Reference EFE loss on flattened inputs.

    Args:
        logits: [N, C] float logits.
        target: [N] integer class indices (``ignore_index`` rows skipped) or [N, C]
            probabilities (log-probabilities when ``log_target``).
        hard_mask: optional [N] bool; replaces the ``q[y] < tau`` rule.
        row_weight: optional [N] float, each row's factor r_i (any sign); not differentiated.
        z_loss: λ, the weight of lse².
        upcast: compute in fp32 (at least); ``False`` computes in the input's own dtype,
            which the tests use as "PyTorch's own error" in low precision.

    Returns:
        (loss, sums): loss is [N] for ``reduction='none'`` (0 on ignored rows) or a 0-dim
        tensor, in the compute dtype and differentiable w.r.t. ``logits``; sums is the
        float32 [5] tensor of :func:`stats_from_sums`. With ``return_per_token``, also the
        float32 [4, N] per-row outputs (:data:`PER_TOKEN_FIELDS`, detached).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    z = logits.float() if upcast and logits.dtype in (torch.float16, torch.bfloat16) else logits
    n, c = z.shape
    eps = float(label_smoothing)
    soft = target.is_floating_point()

    lse = torch.logsumexp(z, dim=-1)
    log_q = torch.log_softmax(z, dim=-1)
    q = log_q.exp()
    # 0·log 0 = 0: where q (or p below) is exactly zero, e.g. a class masked with a -inf
    # logit, log q is -inf. It is replaced before the product, not after: 0·(-inf) would be a
    # NaN in the forward, and in the backward even when masked out by a where.
    log_q_finite = torch.where(q > 0, log_q, torch.zeros_like(log_q))
    entropy = -(q * log_q_finite).sum(-1)

    if soft:
        tgt = target.to(z.dtype)
        p = tgt.exp() if log_target else tgt
        if eps > 0:
            p = (1.0 - eps) * p + eps / c
            log_p = torch.log(p)
        else:
            log_p = tgt if log_target else torch.log(p)
        valid = torch.ones(n, dtype=torch.bool, device=z.device)
        y = p.argmax(-1)
    else:
        valid = target != ignore_index
        y = torch.where(valid, target, torch.zeros_like(target)).long()
        p = torch.full_like(z, eps / c)
        p.scatter_(1, y[:, None], 1.0 - eps + eps / c)
        log_p = torch.log(p)
    plogp = torch.where(p > 0, p * log_p, torch.zeros_like(p))
    # p ≠ 0 on a class with q = 0 gives an infinite risk, as cross-entropy does.
    risk = (plogp - torch.where(p != 0, p * log_q, torch.zeros_like(p))).sum(-1)

    with torch.no_grad():
        q_y = q.gather(1, y[:, None]).squeeze(1)
        hard = hard_mask.bool() if hard_mask is not None else q_y < tau
        hard = hard & valid
        w = easy_weight + (1.0 - easy_weight) * hard.to(z.dtype)
        correct = (z.argmax(-1) == y) & valid

    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    per_row = w * (risk + entropy_weight * entropy)
    if z_loss:
        per_row = per_row + z_loss * lse.square()
    if row_weight is not None:
        per_row = row_weight.to(z.dtype) * per_row
    per_row = torch.where(valid, per_row, zero)
    n_valid = valid.sum()
    if reduction == "none":
        loss = per_row
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        loss = per_row.sum() / n_valid.clamp(min=1).to(z.dtype)

    with torch.no_grad():
        vf = valid.float()
        sums = torch.stack(
            [
                hard.float().sum(),
                correct.float().sum(),
                torch.where(valid, risk.detach().float(), 0.0).sum(),
                torch.where(valid, entropy.detach().float(), 0.0).sum(),
                vf.sum(),
            ]
        )
    if not return_per_token:
        return loss, sums
    with torch.no_grad():
        log_q_y = log_q.gather(1, y[:, None]).squeeze(1)
        per_token = torch.stack([log_q_y, entropy, correct.to(z.dtype), lse]).float()
        per_token = torch.where(valid, per_token, 0.0)
    return loss, sums, per_token
