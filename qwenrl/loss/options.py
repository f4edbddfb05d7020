"""The options of one EFE loss call, as one typed object.

Every backend (C++, Triton, reference) and the ``torch.compile`` custom op receive the same
:class:`EFEOptions`, and pass its fields on *by name* (:meth:`EFEOptions.kernel_kwargs`), so a
new option cannot silently land in another option's position.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

REDUCTIONS = ("none", "mean", "sum")
# What every backend returns as ``sums`` [5], in this order: the C++ kernel exports the same
# tuple (checked when it loads), the Triton kernels store at these indices, and
# :func:`qwenrl.loss.reference.stats_from_sums` reads them by name.
SUM_FIELDS = ("n_hard", "n_correct", "risk", "entropy", "n_valid")
# The per-row outputs of ``return_per_token``, the rows of every backend's float32 [4, N]
# buffer in this order: the C++ kernel exports the same tuple (checked when it loads) and the
# Triton kernels store at these indices.
PER_TOKEN_FIELDS = ("logprob", "entropy", "correct", "lse")


@dataclass(frozen=True)
class EFEOptions:
    """What :func:`qwenrl.efe_loss` computes; see ``docs/loss.md`` for the math.

    Attributes:
        soft: the target is a [N, C] distribution (set from the target's dtype, not by users).
        log_target: a soft target holds log-probabilities.
        tau: a row is *hard* when q[y] < tau (a tie q[y] == tau is easy).
        easy_weight: weight w_e of the rows that are not hard.
        entropy_weight: β, the weight of the ambiguity term H(q).
        label_smoothing: ε, mixed into the target as (1 - ε)·p + ε/C.
        z_loss: λ, the weight of lse² (log-partition regulariser) in each row's loss.
        ignore_index: class-target rows with this value are skipped.
        reduction: ``'none'`` | ``'mean'`` (over non-ignored rows) | ``'sum'``.
        validate: check that class targets lie in [0, C) before the kernel runs.
        per_token: also return the per-row outputs (``PER_TOKEN_FIELDS`` of
            :mod:`qwenrl.loss.reference`), computed in the same pass.
    """

    soft: bool = False
    log_target: bool = False
    tau: float = 0.6
    easy_weight: float = 0.5
    entropy_weight: float = 0.0
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    ignore_index: int = -100
    reduction: str = "mean"
    validate: bool = True
    per_token: bool = False

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        if not (self.z_loss >= 0.0 and math.isfinite(self.z_loss)):
            raise ValueError(f"z_loss must be a finite number >= 0, got {self.z_loss}")
        if self.log_target and not self.soft:
            raise ValueError("log_target=True needs a floating [..., C] target distribution")
        # Normalise types once, so kernels and the custom op's schema see plain values.
        for name, kind in (
            ("soft", bool),
            ("log_target", bool),
            ("validate", bool),
            ("per_token", bool),
            ("tau", float),
            ("easy_weight", float),
            ("entropy_weight", float),
            ("label_smoothing", float),
            ("z_loss", float),
            ("ignore_index", int),
        ):
            object.__setattr__(self, name, kind(getattr(self, name)))

    def kernel_kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments (the C++ binding, the Triton launcher and the custom
        op all take these names)."""
        return {name: getattr(self, name) for name in FIELDS}

    def loss_kwargs(self) -> dict[str, Any]:
        """The options a caller chooses, as keyword arguments of :func:`qwenrl.efe_loss` and
        the reference: :data:`CALLER_FIELDS`."""
        return {name: getattr(self, name) for name in CALLER_FIELDS}

    def replace(self, **changes: Any) -> EFEOptions:
        return dataclasses.replace(self, **changes)


def op_schema(arguments: str, returns: str) -> str:
    """A ``torch.library`` schema whose keyword-only arguments are :class:`EFEOptions`' fields.

    ``op_schema("Tensor logits", "Tensor")`` is ``"(Tensor logits, *, bool soft, ...) ->
    Tensor"``: the custom ops declare their own tensors and take the options from this one
    declaration, by name, so an option added to :class:`EFEOptions` reaches every op.
    """
    # The annotations are strings (``from __future__ import annotations``) and name the schema
    # types directly: bool, float, int, str.
    options = ", ".join(f"{f.type} {f.name}" for f in dataclasses.fields(EFEOptions))
    return f"({arguments}, *, {options}) -> {returns}"


# Every field, in declaration order.
FIELDS = tuple(f.name for f in dataclasses.fields(EFEOptions))

# The fields a caller chooses as loss options (``soft`` comes from the target's dtype,
# ``validate`` has a per-device default, ``per_token`` is what a call returns), in declaration
# order.
CALLER_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(EFEOptions)
    if f.name not in ("soft", "validate", "per_token")
)


def caller_options(values: dict[str, Any]) -> dict[str, Any]:
    """The :data:`CALLER_FIELDS` found in ``values``, a loss module constructor's ``locals()``:
    the signature lists the options (for help and defaults) and the body reads them back here
    instead of spelling the list again. Not for :func:`qwenrl.efe_loss` /
    :func:`qwenrl.linear_efe_loss`, which ``torch.compile`` traces (it cannot read locals())."""
    return {name: values[name] for name in CALLER_FIELDS}
