"""``python -m qwenrl.train``: parse the options, train, report.

    python -m qwenrl.train                                   # the embedded default run (CPU)
    python -m qwenrl.train --config recipes/cpu_default.yaml --epochs 5
    python -m qwenrl.train --epochs 10 --agent_lr 1e-5 --qwen_lr 5e-5 --device cuda --max_batches 500
    python -m qwenrl.train --resume                          # continue the newest checkpoint in --out
    torchrun --nproc_per_node=2 -m qwenrl.train              # DistributedDataParallel
    torchrun --nproc_per_node=8 -m qwenrl.train --fsdp --amp bf16 --device cuda   # FSDP2

Exit status: 0 done, 1 stopped on non-finite losses, 2 bad options or data, 130 interrupted
(a checkpoint is saved first).
"""

from __future__ import annotations

import json
import sys

from qwenrl.train.config import parse_args
from qwenrl.train.distributed import exit_without_teardown
from qwenrl.train.trainer import NonFiniteLossError, Trainer

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        trainer = Trainer(cfg)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = trainer.train()
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        path = trainer.save_checkpoint()
        print(
            f"\ninterrupted: state saved in {path}; continue with --resume {path}", file=sys.stderr
        )
        return 130
    finally:
        trainer.close()
    if trainer.dist.is_main and summary:
        print(json.dumps({k: v for k, v in summary.items() if k != "kind"}))
    if trainer.dist.enabled:
        exit_without_teardown()  # the process group is gone; see its docstring
    return 0
