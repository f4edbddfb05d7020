"""What a run tells its user: the console line, ``metrics.jsonl``, TensorBoard, red flags.

:meth:`Monitor.log` takes one record (a flat dict with ``kind`` ``"train"`` or ``"val"``) and
sends it everywhere; :meth:`Monitor.observe` feeds every step's read metrics to the
:class:`RedFlags`. Only rank 0 writes; the other ranks' monitors stay silent.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = ["LOG_FORMAT", "Monitor", "RedFlags"]

LOG_FORMAT = (
    "[Batch {step:>4d}] Reward: {reward:>7.4f} | Loss: {loss:>7.4f} | "
    "Qwen_grad: {qwen_grad:.2e} | Mask_ratio: {mask_ratio:.4f}"
)
VAL_FORMAT = (
    "[Epoch {epoch}] validation: cell accuracy {cell_accuracy:.4f} | "
    "canvas accuracy {canvas_accuracy:.4f} | exact match {exact_match:.4f} "
    "({exact}/{samples}) | mask ratio {mask_ratio:.4f}"
)


class RedFlags:
    """Warnings for a run that is going wrong, each raised once per run.

    * ``qwen_grad``: Qwen's grad norm is 0 on ``qwen_window`` consecutive steps where Qwen ran
      (something detaches the prompt path or Qwen is missing from the optimizer);
    * ``reward``: the reward is 0 for ``reward_window`` consecutive steps;
    * ``loss_flat``: the mean loss of the last ``loss_window / 2`` steps is not below that of
      the ``loss_window / 2`` before them.

    ``nonfinite_streak`` counts consecutive skipped non-finite losses; the trainer stops the
    run at ``--max_nonfinite``. The whole state is saved with checkpoints, so a resumed run
    warns exactly when an uninterrupted one would.
    """

    def __init__(
        self,
        warn: Callable[[str], None],
        *,
        qwen_window: int = 100,
        reward_window: int = 200,
        loss_window: int = 200,
    ) -> None:
        self.warn = warn
        self.qwen_window = qwen_window
        self.reward_window = reward_window
        self.loss_window = loss_window
        self.qwen_zero_streak = 0
        self.reward_zero_streak = 0
        self.nonfinite_streak = 0
        self.losses: deque[float] = deque(maxlen=loss_window)
        self.raised: set[str] = set()

    def _once(self, key: str, msg: str) -> None:
        if key not in self.raised:
            self.raised.add(key)
            self.warn(msg)

    def update(self, m: dict[str, Any]) -> None:
        """One step's read metrics (``qwen_ran``, ``qwen_grad``, ``reward``, ``loss``)."""
        if m["qwen_ran"]:
            self.qwen_zero_streak = self.qwen_zero_streak + 1 if m["qwen_grad"] == 0 else 0
            if self.qwen_zero_streak >= self.qwen_window:
                self._once(
                    "qwen_grad",
                    f"Qwen_grad has been 0 on {self.qwen_zero_streak} consecutive steps where Qwen "
                    "ran: gradients are not reaching Qwen (a no_grad or detach on the prompt path, "
                    "or Qwen missing from the optimizer)",
                )
        self.reward_zero_streak = self.reward_zero_streak + 1 if m["reward"] == 0 else 0
        if self.reward_zero_streak >= self.reward_window:
            self._once(
                "reward",
                f"reward has been 0 for {self.reward_zero_streak} steps: check the reward computation",
            )
        self.losses.append(m["loss"])
        if len(self.losses) == self.loss_window:
            half = self.loss_window // 2
            first = sum(list(self.losses)[:half]) / half
            second = sum(list(self.losses)[half:]) / half
            if second >= first * 0.999:
                self._once(
                    "loss_flat",
                    f"loss is flat or rising over the last {self.loss_window} steps "
                    f"({first:.4f} → {second:.4f}): check the learning rates",
                )

    def reset_loss_window(self) -> None:
        """Forget the loss history (the loss changes definition when τ moves)."""
        self.losses.clear()

    def state_dict(self) -> dict[str, Any]:
        return {
            "qwen_zero_streak": self.qwen_zero_streak,
            "reward_zero_streak": self.reward_zero_streak,
            "nonfinite_streak": self.nonfinite_streak,
            "losses": list(self.losses),
            "raised": sorted(self.raised),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.qwen_zero_streak = state["qwen_zero_streak"]
        self.reward_zero_streak = state["reward_zero_streak"]
        self.nonfinite_streak = state.get("nonfinite_streak", 0)
        self.losses.clear()
        self.losses.extend(state["losses"])
        self.raised = set(state["raised"])


class Monitor:
    """Console, JSONL and TensorBoard output of one process, and its red flags.

    Args:
        out: run directory (``metrics.jsonl`` and ``tb/`` go there).
        is_main: only the main rank writes files and warns.
        quiet: no console lines (tests, benchmarks, ranks other than 0).
        tensorboard: also write TensorBoard scalars.
    """

    def __init__(self, out: Path, *, is_main: bool, quiet: bool, tensorboard: bool) -> None:
        self.out = out
        self.is_main = is_main
        self.quiet = quiet or not is_main
        self.flags = RedFlags(warn=self.warn)
        self._tb = None
        if tensorboard and is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tb"))

    def print(self, msg: str) -> None:
        if not self.quiet:
            tqdm.write(msg, file=sys.stdout)

    def warn(self, msg: str) -> None:
        if self.is_main:
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def observe(self, steps: Iterable[dict[str, Any]]) -> None:
        """Every step's read metrics, in step order, for the red flags."""
        for values in steps:
            self.flags.update(values)

    def log(self, record: dict[str, Any]) -> None:
        """One record: a ``metrics.jsonl`` line, TensorBoard scalars and a console line."""
        if not self.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self._tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])
        self.print((LOG_FORMAT if record["kind"] == "train" else VAL_FORMAT).format(**record))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
