"""``python -m qwenrl.evaluate`` on a saved run: same figures as validation, scoring, no leaks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sealed import SealedGrid, seal_test_outputs

from qwenrl import evaluate as evaluate_mod
from qwenrl.data import OUTSIDE, grid_to_canvas, load_json_dir
from qwenrl.evaluate import EvalTotals, evaluate_tasks, main, score_query
from qwenrl.train import TrainConfig, Trainer
from qwenrl.ttt import TTTConfig


def _write_tasks(root: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = rng.integers(2, 6, size=2)

        def pair(h=h, w=w):
            grid = rng.integers(0, 10, size=(h, w))
            return {"input": grid.tolist(), "output": np.fliplr(grid).tolist()}

        task = {"train": [pair(), pair(), pair()], "test": [pair(), pair()]}
        (root / f"task{i:03d}.json").write_text(json.dumps(task))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny trained run on synthetic tasks, and its last validation record."""
    root = tmp_path_factory.mktemp("eval")
    _write_tasks(root / "arc" / "training", 8, seed=1)
    _write_tasks(root / "arc" / "evaluation", 4, seed=2)
    cfg = TrainConfig(
        epochs=1,
        max_batches=3,
        batch_size=2,
        working_set=4,
        refresh_every=3,
        dim=32,
        agent_layers=1,
        qwen_max_length=128,
        val_tasks=3,
        val_batch_size=4,
        data=str(root / "arc"),
        out=str(root / "run"),
    )
    trainer = Trainer(cfg, quiet=True)
    trainer.train()
    trainer.close()
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").open()]
    return root / "run", [r for r in records if r["kind"] == "val"][-1]


def test_a_saved_run_scores_as_its_last_validation(saved_run, capsys):
    run, val = saved_run
    assert main([str(run), "--tasks", "3", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["queries"] == val["samples"] == 6
    assert summary["cell_accuracy"] == pytest.approx(val["cell_accuracy"], abs=1e-6)
    assert summary["exact_match"] == pytest.approx(val["exact_match"])
    saved = json.loads((run / "eval" / "checkpoint-00000003-v1-ttt0-n3.json").read_text())
    assert saved["exact"] == summary["exact"] and len(saved["per_task"]) == 3


def test_voting_and_ttt_from_the_command_line(saved_run, capsys, tmp_path):
    run, _ = saved_run
    out = tmp_path / "r.json"
    argv = [str(run), "--tasks", "2", "--vote_transforms", "4", "--ttt_steps", "2", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["vote_transforms"] == 4 and summary["ttt_steps"] == 2
    assert summary["tasks"] == 2 and summary["queries"] == 4 and summary["wall_s"] > 0
    assert 0.0 <= summary["cell_accuracy"] <= 1.0
    assert json.loads(out.read_text())["queries"] == 4


def test_bad_runs_and_flags_are_named(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    for flags in (["--vote_transforms", "0"], ["--ttt_steps", "-1"], ["--ttt_lr", "0"]):
        with pytest.raises(SystemExit):
            main([str(tmp_path), *flags])
        assert "must be" in capsys.readouterr().err


def test_predictions_never_read_a_test_output(saved_run, monkeypatch):
    run, _ = saved_run
    models, cfg, _ = evaluate_mod.load_run(evaluate_mod.find_checkpoint(run), "cpu")
    _, tasks = load_json_dir(cfg["data"])
    scored: list[int] = []
    monkeypatch.setattr(
        evaluate_mod, "score_query", lambda totals, attempts, canvas, target: scored.append(1)
    )
    SealedGrid.reads.clear()
    evaluate_tasks(
        models,
        seal_test_outputs(tasks),
        vote_transforms=3,
        ttt=TTTConfig(steps=2, batch_size=2),
        progress=False,
    )
    assert SealedGrid.reads == [] and len(scored) == 2 * len(tasks)


def test_score_query_counts_pass_at_2_and_cells():
    target = np.array([[1, 2], [3, 4]])
    wrong, right = np.array([[1, 2], [3, 5]]), target.copy()
    canvas = grid_to_canvas(np.array([[1, 2, 7], [3, 0, 7]]), OUTSIDE).view(-1)
    totals = EvalTotals()
    assert score_query(totals, [wrong, right], canvas, target)  # the second attempt counts
    assert not score_query(totals, [wrong], canvas, target)
    assert not score_query(totals, [np.array([[1, 2]])], torch.full((900,), OUTSIDE), target)
    s = totals.summary()
    assert (s["queries"], s["exact"]) == (3, 1)
    assert s["cell_accuracy"] == pytest.approx((3 + 3 + 0) / 12)
    assert s["attempt_cell_accuracy"] == pytest.approx((3 + 3 + 2) / 12)
