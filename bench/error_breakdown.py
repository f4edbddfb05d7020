"""Where a run's validation cells go wrong, by query kind: the output shape implied and the
input's, another shape implied, or none implied (then guessed).

    python bench/error_breakdown.py runs/default

For each of the evaluation test queries, the run's plain prediction (one augmentation, no
test-time training: its last validation) is scored cell by cell against the target, beside a
copy of the input (output cells beyond the input count as wrong). Prints one row per kind.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch

from qwenrl.data import load_tasks, output_shape_hint
from qwenrl.eval.run import load_run
from qwenrl.eval.voting import predict

KINDS = ("same shape, implied", "another shape, implied", "no shape implied")


def kind_of(demos, query: np.ndarray, target: np.ndarray) -> str:
    hint = output_shape_hint(demos, query.shape)
    if hint is None:
        return KINDS[2]
    return KINDS[0] if hint == query.shape == target.shape else KINDS[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory or a checkpoint")
    args = parser.parse_args()
    models, cfg, _ = load_run(args.run)
    _, tasks = load_tasks(cfg.data)
    count, cells, right, copied, coloured = (Counter() for _ in range(5))
    with torch.no_grad():
        for task in tasks:
            for query, target in task.test:
                kind = kind_of(task.train, query, target)
                h, w = target.shape
                pred = predict(models, task.train, query).canvas.view(30, 30)[:h, :w].numpy()
                qh, qw = min(h, query.shape[0]), min(w, query.shape[1])
                count[kind] += 1
                cells[kind] += target.size
                right[kind] += int((pred == target).sum())
                copied[kind] += int((query[:qh, :qw] == target[:qh, :qw]).sum())
                coloured[kind] += int((pred < 10).sum())
    total = sum(cells.values())
    print(
        "| queries | how many | share of the cells | copying the input | the run | cells given a colour |"
    )
    print("|---|---|---|---|---|---|")
    for kind in KINDS:
        print(
            f"| {kind} | {count[kind]} | {cells[kind] / total:.1%} | "
            f"{copied[kind] / cells[kind]:.3f} | {right[kind] / cells[kind]:.3f} | "
            f"{coloured[kind]} of {cells[kind]} |"
        )
    print(
        f"| all | {sum(count.values())} | | {sum(copied.values()) / total:.3f} | "
        f"{sum(right.values()) / total:.3f} | |"
    )


if __name__ == "__main__":
    main()
