"""qwenrl.plot: PNGs from a synthetic run directory, and its error reporting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from qwenrl.data.grids import OUTSIDE, PAD
from qwenrl.plot import main, plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train(step: int, epoch: int, *, loss: float = 1.0, qwen_grad: float = 0.5) -> dict:
    return {
        "kind": "train",
        "step": step,
        "epoch": epoch,
        "loss": loss,
        "reward": 0.1 * step,
        "qwen_grad": qwen_grad,
        "mask_ratio": 0.8 - 0.05 * step,
        "accuracy": 0.05 * step,
        "tau": 0.6 if epoch < 1 else 0.3,
        "lr": 1e-4,
        "qwen_lr": 5e-5,
        "cache_hit_rate": min(1.0, 0.2 * step),
        "steps_per_s": 3.0,
    }


def _sample(rng: np.random.Generator, task_id: str, h: int, w: int) -> dict:
    inp = np.full((30, 30), PAD)
    inp[: h - 1, : w + 1] = rng.integers(0, 10, (h - 1, w + 1))
    target = np.full((30, 30), OUTSIDE)
    target[:h, :w] = rng.integers(0, 10, (h, w))
    pred = target.copy()
    pred[0, :2] = (target[0, :2] + 1) % 10  # two wrong cells
    pred[h, 0] = 3  # one cell predicted beyond the target grid
    hard = np.zeros((30, 30), dtype=bool)
    hard[:2, :3] = True
    return {
        "task_id": task_id,
        "input": inp.tolist(),
        "prediction": pred.tolist(),
        "target": target.tolist(),
        "hard": hard.tolist(),
    }


def make_run(root: Path) -> Path:
    """A run directory with 8 train records over 2 epochs, 2 val records and 2 val grids."""
    run = root / "run"
    run.mkdir()
    records = [_train(s, 0) for s in range(1, 5)] + [_train(s, 1) for s in range(5, 9)]
    records[2]["loss"] = math.nan
    records[3]["qwen_grad"] = 0.0
    records.insert(
        4,
        {
            "kind": "val",
            "step": 4,
            "epoch": 0,
            "cell_accuracy": 0.4,
            "exact_match": 0.0,
            "mask_ratio": 0.6,
            "samples": 16,
        },
    )
    records.append(
        {
            "kind": "val",
            "step": 8,
            "epoch": 1,
            "cell_accuracy": 0.7,
            "exact_match": 0.25,
            "mask_ratio": 0.4,
            "samples": 16,
        }
    )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rng = np.random.default_rng(0)
    grids = {"step": 8, "epoch": 1, "tau": 0.3}
    grids["samples"] = [_sample(rng, "007bbfc7", 6, 5), _sample(rng, "00d62c1b", 12, 14)]
    (run / "val_grids.json").write_text(json.dumps(grids))
    return run


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    assert image.shape[2] in (3, 4)
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_plot_run_writes_pngs(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    paths = plot_run(run)
    assert paths == [run / "training_curves.png", run / "val_grids.png"]
    for p in paths:
        assert_png(p)
    curves = mpimg.imread(paths[0])
    assert curves.shape[1] > curves.shape[0]  # 2×3 panels: wider than tall


def test_main_out_dir_and_no_val_grids(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = make_run(tmp_path)
    (run / "val_grids.json").unlink()
    out = tmp_path / "figs"
    assert main([str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / "training_curves.png")]
    assert_png(out / "training_curves.png")
    assert not (out / "val_grids.png").exists()


def _error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_missing_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope"
    err = _error([str(missing)], capsys)
    assert str(missing) in err and "not found" in err


def test_missing_and_empty_metrics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    err = _error([str(run)], capsys)
    assert str(run / "metrics.jsonl") in err and "not found" in err
    (run / "metrics.jsonl").write_text("\n")
    err = _error([str(run)], capsys)
    assert str(run / "metrics.jsonl") in err and "empty" in err


def test_malformed_line_names_line_number(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = make_run(tmp_path)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines.insert(2, '{"kind": "train", "step": 3,')
    metrics.write_text("\n".join(lines) + "\n")
    err = _error([str(run)], capsys)
    assert f"{metrics}:3:" in err and "malformed" in err
    assert not (run / "training_curves.png").exists()


def test_malformed_val_grids(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = make_run(tmp_path)
    (run / "val_grids.json").write_text('{"samples": [{"task_id": "x"}]}')
    err = _error([str(run)], capsys)
    assert str(run / "val_grids.json") in err and "sample 0" in err
