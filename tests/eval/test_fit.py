"""``python -m qwenrl.eval.fit``: test-time training on a task's demonstrations, then each
demonstration predicted back leave-one-out."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from tiny_run import tiny_config, write_arc_tasks

from qwenrl.data import ArcTask
from qwenrl.eval import fit as fit_mod
from qwenrl.eval.fit import TaskFit, fit_task, main
from qwenrl.eval.ttt import TTTConfig
from qwenrl.eval.voting import Prediction
from qwenrl.models import ModelConfig, QwenRLModels
from qwenrl.train import Trainer


def _task(n_train: int = 3) -> ArcTask:
    rng = np.random.default_rng(5)
    pairs = []
    for _ in range(n_train):
        g = rng.integers(0, 10, size=(3, 4))
        pairs.append((g, np.fliplr(g).copy()))
    return ArcTask(id="flip", train=tuple(pairs), test=((pairs[0][0], None),))


@pytest.fixture
def models() -> QwenRLModels:
    torch.manual_seed(0)
    return QwenRLModels(ModelConfig(dim=32, agent_layers=1, max_length=256)).eval()


def test_each_pair_is_predicted_from_the_others_and_compared(models, monkeypatch):
    task = _task()
    seen = []

    def fake_predict(tuned, demos, query_input, **kw):
        seen.append((len(demos), query_input))
        j = next(i for i, (x, _) in enumerate(task.train) if x is query_input)
        assert all(x is not query_input for x, _ in demos)  # pair j is not in its own prompt
        out = task.train[j][1].copy()
        if j == 2:
            out[0, 0] = (out[0, 0] + 1) % 10  # one wrong cell: not exact
        return Prediction([out], [1.0], torch.zeros(900, dtype=torch.long))

    monkeypatch.setattr(fit_mod, "predict", fake_predict)
    result = fit_task(models, task, TTTConfig(steps=0))
    assert [n for n, _ in seen] == [2, 2, 2]
    assert (result.exact, result.pairs) == (2, 3)
    assert not result.fits(0.8) and result.fits(0.6)
    assert TaskFit("t", 4, 5, 0.0).fits(0.8) and not TaskFit("t", 0, 0, 0.0).fits(0.8)


def test_a_wrong_shape_is_not_exact(models, monkeypatch):
    task = _task(2)
    monkeypatch.setattr(
        fit_mod,
        "predict",
        lambda *a, **k: Prediction([np.zeros((1, 1), np.int64)], [1.0], torch.zeros(900)),
    )
    assert fit_task(models, task, TTTConfig(steps=0)).exact == 0


def test_training_on_the_demonstrations_raises_the_fit(models):
    """Untrained, the flip task's pairs come back wrong; test-time training fits at least one.
    (Without the rule hint, which finds the flip in the demonstrations and fits it untrained.)"""
    task = _task()
    models.agent.use_rule = False
    before = fit_task(models, task, TTTConfig(steps=0))
    after = fit_task(models, task, TTTConfig(steps=100, lr=1e-2, batch_size=4, num_colour_perms=1))
    assert before.exact == 0 and after.exact > before.exact


def test_a_task_with_one_demonstration_has_no_pair_to_predict(models):
    fit = fit_task(models, _task(1), TTTConfig(steps=1))
    assert (fit.task_id, fit.exact, fit.pairs, fit.seconds) == ("flip", 0, 0, 0.0)
    assert not fit.fits()


def test_the_help_describes_the_command():
    assert fit_mod.build_parser().description == fit_mod.__doc__.split("\n\n")[0]
    assert "demonstration" in fit_mod.build_parser().description


def test_the_command_writes_a_summary(tmp_path, capsys, monkeypatch):
    write_arc_tasks(tmp_path / "arc" / "training", 4, seed=1, prefix="train")
    write_arc_tasks(tmp_path / "arc" / "evaluation", 2, seed=2, prefix="eval")
    cfg = tiny_config(tmp_path / "run", tmp_path / "arc", epochs=1, max_batches=2, val_tasks=1)
    trainer = Trainer(cfg, quiet=True)
    trainer.train()
    trainer.close()
    out = tmp_path / "fit.json"
    argv = [str(tmp_path / "run"), "--tasks", "2", "--ttt_steps", "1", "--quiet", "--out", str(out)]
    start = time.perf_counter()
    assert main(argv) == 0
    wall = time.perf_counter() - start
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tasks"] == 2 and summary["pairs"] == 6 and summary["ttt_steps"] == 1
    assert 0 <= summary["fitted"] <= 2 and summary["fit_rate"] == summary["fitted"] / 2
    saved = json.loads(out.read_text())
    assert [r["task_id"] for r in saved["per_task"]] == ["eval000", "eval001"]
    seconds = [r["seconds"] for r in saved["per_task"]]
    assert all(0 < t < wall for t in seconds)
    assert summary["seconds_per_task"] == round(sum(seconds) / 2, 2)
    assert summary["max_seconds"] == round(max(seconds), 2)
    # Without --quiet a progress bar; tasks without a leave-one-out prompt are not counted.
    monkeypatch.setattr(fit_mod, "fit_task", lambda m, task, *a, **k: TaskFit(task.id, 0, 0, 0.0))
    assert main([str(tmp_path / "run"), "--tasks", "1", "--out", str(tmp_path / "none.json")]) == 0
    captured = capsys.readouterr()
    assert "Fitting: " in captured.err  # the bar, "Fitting: 100%|..."
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert (summary["tasks"], summary["fit_rate"], summary["max_seconds"]) == (0, 0.0, 0.0)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "run"), "--fit_share", "0"])
    assert "--fit_share must be" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere")]) == 2
