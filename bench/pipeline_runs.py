"""Whole training runs that measure the pipeline: ablations and the compute curve.

    python bench/pipeline_runs.py ablations            # the default run, then one per part off
    python bench/pipeline_runs.py curve --epochs 2 8 28  # validation against training minutes
    python bench/pipeline_runs.py --flags="--num_threads 1" ablations   # flags for every run

Each run is ``python -m qwenrl.train`` with the embedded defaults and a few flags, in its own
directory under ``--root`` (default ``runs/``): ``ablations/<name>`` or ``curve/epochs-<E>``.
A run whose directory already holds its final validation and its wall time (``wall.json``) is
read, not run again, so an interrupted sweep resumes where it stopped. The tables (markdown,
as in bench/RESULTS.md) are printed and written beside the runs with the numbers as JSON; the
curve also gets a figure, ``curve/compute_curve.png``.

The validation figures are those every run logs after its last epoch (``metrics.jsonl``, all
400 ARC-AGI-1 evaluation tasks, 419 test queries); the minutes are the wall time of the whole
``python -m qwenrl.train`` process, set-up and validation included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Without refresh windows (refresh_every 0 or -1) the sampler's window is one step, so an epoch
# (one pass over the prompts, one working set per window) is 10 times shorter: 20 such epochs,
# τ switching after 10 and one validation at the end keep the default's 960 steps and schedule.
SAME_STEPS = ["--epochs", "20", "--tau_epoch", "10", "--val_every", "20"]

# name → (the flags that turn the part off, what is off). "default" is the run itself.
ABLATIONS: dict[str, tuple[list[str], str]] = {
    "default": ([], "nothing: the default run"),
    "no_rl": (["--num_actions", "1"], "the RL policy: one fixed steering action"),
    "no_refiner": (["--refiner_depth", "0"], "the refiner: identity"),
    "frozen_qwen": (["--qwen_lr", "0"], "Qwen's updates (lr 0: Qwen stays at its initialisation)"),
    "refresh_every_step": (
        ["--refresh_every", "0", *SAME_STEPS],
        "the cache: Qwen re-encodes every step",
    ),
    "refresh_never": (
        ["--refresh_every", "-1", *SAME_STEPS],
        "the cache refresh: embeddings never expire",
    ),
    "no_hints": (["--no-demo_hints"], "the demonstration hints"),
    "no_rule": (["--no-rule_hint"], "the hints' rule alone"),
    "no_guess": (["--no-shape_guess"], "the guessed output shape alone"),
    "tau_fixed": (["--tau_end", "0.6"], "the τ curriculum: τ = 0.6 throughout"),
}


def final_validation(run_dir: Path) -> dict | None:
    """The last validation record of a finished run (with its wall time), or ``None``."""
    wall = run_dir / "wall.json"
    metrics = run_dir / "metrics.jsonl"
    if not (wall.is_file() and metrics.is_file()):
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    vals = [r for r in records if r.get("kind") == "val"]
    if not vals:
        return None
    return {**vals[-1], **json.loads(wall.read_text())}


def train(run_dir: Path, flags: list[str]) -> dict:
    """Run ``python -m qwenrl.train --out run_dir *flags`` unless it already finished; returns
    its final validation and wall time. The log goes beside it, to ``<run_dir>.log`` (the
    trainer moves a non-empty run directory aside, so nothing is written into it first)."""
    done = final_validation(run_dir)
    if done is not None:
        print(f"{run_dir}: done before, read", file=sys.stderr)
        return done
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.with_name(run_dir.name + ".log")
    cmd = [sys.executable, "-m", "qwenrl.train", "--out", str(run_dir), *flags]
    print(" ".join(cmd), file=sys.stderr)
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log_path}")
    wall = {"wall_s": round(time.perf_counter() - start, 1), "flags": flags}
    (run_dir / "wall.json").write_text(json.dumps(wall))
    result = final_validation(run_dir)
    if result is None:
        raise SystemExit(f"{run_dir}: the run finished without a validation record")
    return result


def _row(label: str, r: dict, base: dict | None = None) -> str:
    cells = f"{r['cell_accuracy']:.4f}"
    exact = f"{r['exact']}/{r['samples']}"
    if base is not None:
        cells += f" ({r['cell_accuracy'] - base['cell_accuracy']:+.4f})"
        exact += f" ({r['exact'] - base['exact']:+d})"
    return f"| {label} | {cells} | {exact} | {r['canvas_accuracy']:.4f} | {r['wall_s'] / 60:.1f} |"


def ablations(root: Path, names: list[str], extra: list[str]) -> str:
    results = {
        name: train(root / "ablations" / name, [*extra, *ABLATIONS[name][0]]) for name in names
    }
    base = results.get("default")
    lines = [
        "| part off | cell accuracy (Δ) | exact (Δ) | canvas accuracy | minutes |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        flags = " ".join(ABLATIONS[name][0]) or "(none)"
        lines.append(
            _row(f"{ABLATIONS[name][1]} `{flags}`", r, base if name != "default" else None)
        )
    (root / "ablations" / "ablations.json").write_text(json.dumps(results, indent=1))
    return "\n".join(lines)


def curve(root: Path, epochs: list[int], extra: list[str]) -> str:
    results = {
        e: train(root / "curve" / f"epochs-{e}", [*extra, "--epochs", str(e)]) for e in epochs
    }
    lines = [
        "| epochs | cell accuracy | exact | canvas accuracy | minutes |",
        "|---|---|---|---|---|",
    ]
    lines += [_row(str(e), r) for e, r in results.items()]
    (root / "curve" / "curve.json").write_text(json.dumps(results, indent=1))
    _plot(results, root / "curve" / "compute_curve.png")
    return "\n".join(lines)


def _plot(results: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["wall_s"] / 60 for r in results.values()]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in (
        (axes[0], "cell_accuracy", "cell accuracy"),
        (axes[1], "exact", "exact match (of 419)"),
    ):
        ax.plot(minutes, [r[key] for r in results.values()], "o-")
        for m, (e, r) in zip(minutes, results.items()):
            ax.annotate(f"{e} ep", (m, r[key]), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("training minutes (2-core CPU, whole process)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Validation on the 400 ARC-AGI-1 evaluation tasks against training time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs"), help="where the runs go")
    parser.add_argument("--flags", default="", help="trainer flags added to every run")
    sub = parser.add_subparsers(dest="what", required=True)
    abl = sub.add_parser("ablations", help="the default run and one run per part turned off")
    abl.add_argument("--only", nargs="+", choices=list(ABLATIONS), default=list(ABLATIONS))
    cur = sub.add_parser("curve", help="validation after runs of several lengths")
    cur.add_argument("--epochs", type=int, nargs="+", default=[2, 8, 28])
    args = parser.parse_args(argv)
    if args.what == "curve" and any(e < 1 for e in args.epochs):
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    extra = args.flags.split()
    if args.what == "ablations":
        table = ablations(args.root, args.only, extra)
    else:
        table = curve(args.root, args.epochs, extra)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
