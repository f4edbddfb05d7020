"""``python -m qwenrl.eval.evaluate`` (alias ``qwenrl.evaluate``) on a saved run: same figures as
validation, scoring, no leaks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sealed import SealedGrid, seal_test_outputs
from tiny_run import tiny_config, write_arc_tasks

from qwenrl.data import OUTSIDE, grid_to_canvas, load_json_dir, load_tasks
from qwenrl.eval import tasks as evaluation_mod
from qwenrl.eval.evaluate import main
from qwenrl.eval.run import find_checkpoint, load_run
from qwenrl.eval.scoring import TaskTotals, score_query
from qwenrl.eval.tasks import evaluate_tasks
from qwenrl.eval.ttt import TTTConfig
from qwenrl.train import TrainConfig, Trainer
from qwenrl.train.config import ConfigError


def _tiny(root: Path, **overrides) -> TrainConfig:
    """The tiny run on root/arc, writing to root/run unless told, validating on 3 tasks (6
    queries)."""
    return tiny_config(overrides.pop("out", root / "run"), root / "arc", val_tasks=3, **overrides)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny trained run on synthetic tasks, and its last validation record."""
    root = tmp_path_factory.mktemp("eval")
    write_arc_tasks(root / "arc" / "training", 8, seed=1, prefix="train", n_test=2)
    write_arc_tasks(root / "arc" / "evaluation", 4, seed=2, prefix="eval", n_test=2)
    cfg = _tiny(root, epochs=1, max_batches=3, eval_demos=False)
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
    for flag, value in (("vote_transforms", "0"), ("ttt_steps", "-1"), ("ttt_lr", "0")):
        with pytest.raises(SystemExit):
            main([str(tmp_path), f"--{flag}", value])
        assert f"--{flag} must be" in capsys.readouterr().err


def test_predictions_never_read_a_test_output(saved_run, monkeypatch):
    run, _ = saved_run
    models, cfg, _ = load_run(find_checkpoint(run))
    _, tasks = load_json_dir(cfg.data)
    scored: list[int] = []
    monkeypatch.setattr(
        evaluation_mod, "score_query", lambda totals, attempts, canvas, target: scored.append(1)
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


def test_the_second_attempt_and_the_task_offset_reach_the_scores(saved_run, monkeypatch):
    from qwenrl.eval import voting
    from qwenrl.eval.voting import Prediction

    run, _ = saved_run
    models, cfg, _ = load_run(find_checkpoint(run))
    _, tasks = load_json_dir(cfg.data)
    answers = {id(q): out for t in tasks for q, out in t.test}
    offsets = []

    def predict(models, demos, query_input, *, prompt_offset=None, **kwargs):
        offsets.append(prompt_offset)
        wrong = np.zeros((1, 1), dtype=np.int64)
        return Prediction([wrong, answers[id(query_input)]], [2.0, 1.0], torch.zeros(900))

    monkeypatch.setattr(voting, "predict", predict)
    totals = evaluate_tasks(models, tasks, ttt=TTTConfig(steps=1, lr=0.1), progress=False)
    assert totals.exact == totals.queries == 2 * len(tasks)  # each solved by its second attempt
    assert all(o is not None and o.abs().sum() > 0 for o in offsets)  # the task's own offset


def test_score_query_counts_pass_at_2_and_cells():
    target = np.array([[1, 2], [3, 4]])
    wrong, right = np.array([[1, 2], [3, 5]]), target.copy()
    canvas = grid_to_canvas(np.array([[1, 2, 7], [3, 0, 7]]), OUTSIDE).view(-1)
    totals = TaskTotals()
    assert score_query(totals, [wrong, right], canvas, target)  # the second attempt counts
    assert not score_query(totals, [wrong], canvas, target)
    assert not score_query(totals, [np.array([[1, 2]])], torch.full((900,), OUTSIDE), target)
    s = totals.summary()
    assert (s["queries"], s["exact"]) == (3, 1)
    assert s["cell_accuracy"] == pytest.approx((3 + 3 + 0) / 12)
    assert s["attempt_cell_accuracy"] == pytest.approx((3 + 3 + 2) / 12)


def test_training_never_reads_an_evaluation_test_output(saved_run, tmp_path, monkeypatch):
    from qwenrl.data import dataset as dataset_mod

    real = dataset_mod.load_tasks
    monkeypatch.setattr(
        dataset_mod, "load_tasks", lambda src: (real(src)[0], seal_test_outputs(real(src)[1]))
    )
    SealedGrid.reads.clear()
    cfg = _tiny(saved_run[0].parent, out=str(tmp_path / "run"), max_batches=0)
    trainer = Trainer(cfg, quiet=True)
    _, eval_tasks = real(cfg.data)
    eval_ids = {t.id for t in eval_tasks}
    seen = set()
    for step in range(cfg.epochs * trainer.steps_per_epoch):  # every batch of the run
        seen |= set(trainer.batch_at(step).task_ids) & eval_ids
    for step in range(2):
        trainer.train_step(trainer.batch_at(step))
    trainer.close()
    assert seen == eval_ids, "the evaluation tasks' demonstrations should be trained on"
    assert SealedGrid.reads == []


def test_validation_votes_and_tunes_when_asked(saved_run, tmp_path, monkeypatch):
    root = saved_run[0].parent
    trainer = Trainer(_tiny(root, out=str(tmp_path / "run"), eval_demos=False), quiet=True)
    trainer.train_step(trainer.batch_at(0))
    plain = trainer.validate(0)
    trainer.cfg.vote_transforms = 3
    voted = trainer.validate(0)
    # Without test-time training the per-cell argmax is the plain one; the attempts vote.
    for key in ("cell_accuracy", "canvas_accuracy", "mask_ratio", "samples"):
        assert voted[key] == pytest.approx(plain[key]), key
    assert voted["vote_transforms"] == 3 and "vote_transforms" not in plain
    from qwenrl.eval import ttt

    calls: list[ttt.TTTConfig] = []
    real = ttt.adapt_to_task
    monkeypatch.setattr(
        ttt, "adapt_to_task", lambda m, d, c, **k: calls.append(c) or real(m, d, c, **k)
    )
    trainer.cfg.ttt_steps, trainer.cfg.ttt_lr = 3, 1e-2
    tuned = trainer.validate(0)
    assert tuned["ttt_steps"] == 3 and tuned["samples"] == plain["samples"]
    assert len(calls) == 3 and all((c.steps, c.lr) == (3, 1e-2) for c in calls)  # one per task
    assert trainer.models.training  # validation hands the models back in train mode
    trainer.close()


def test_validation_computes_then_logs(saved_run, tmp_path, monkeypatch):
    """Trainer.validate = Trainer.validation_totals (no log line, no file written) then
    log_validation (the ``kind: val`` line and val_grids.json); the two give what validate
    gives."""
    from qwenrl.eval.val_grids import VAL_GRIDS_FILE, read_val_grids
    from qwenrl.eval.validation import log_validation

    cfg = _tiny(saved_run[0].parent, out=str(tmp_path / "run"), eval_demos=False)
    trainer = Trainer(cfg, quiet=True)
    logged: list[dict] = []
    monkeypatch.setattr(trainer.monitor, "log", logged.append)
    totals, shown = trainer.validation_totals()
    assert logged == [] and not (trainer.out / VAL_GRIDS_FILE).exists()
    assert totals.samples == len(trainer.val_set) and shown
    kwargs = dict(step=trainer.step, epoch=0, tau=trainer.criterion.tau)
    summary = log_validation(trainer.monitor, trainer.out, totals, shown, **kwargs)
    assert logged == [summary] and summary["kind"] == "val"
    assert read_val_grids(trainer.out / VAL_GRIDS_FILE)["samples"] == shown
    assert trainer.validate(0) == summary and logged == [summary, summary]
    trainer.close()


def test_validation_scores_under_the_runs_autocast(saved_run, tmp_path, monkeypatch):
    """--amp bf16 reaches validation's forward passes (the trainer's autocast context)."""
    from qwenrl.eval import validation as validation_mod

    seen = []
    real = validation_mod.predict_attempts

    def spy(models, batch, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(models, batch, **kwargs)

    monkeypatch.setattr(validation_mod, "predict_attempts", spy)
    cfg = _tiny(saved_run[0].parent, out=str(tmp_path / "run"), eval_demos=False, amp="bf16")
    trainer = Trainer(cfg, quiet=True)
    trainer.validation_totals()
    trainer.close()
    assert seen and all(s == (True, torch.bfloat16) for s in seen)


def test_tasks_0_evaluates_every_task_and_n_the_first_n(saved_run, monkeypatch):
    from qwenrl.eval import evaluate as evaluate_mod

    seen = []

    def fake_evaluate_tasks(models, tasks, **kwargs):
        seen.append([t.id for t in tasks])
        return TaskTotals()

    monkeypatch.setattr(evaluate_mod, "evaluate_tasks", fake_evaluate_tasks)
    run, _ = saved_run
    _, every = load_tasks(run.parent / "arc")
    for n in (0, 2):
        assert main([str(run), "--tasks", str(n), "--quiet"]) == 0
    assert len(every) == 4
    assert seen == [[t.id for t in every], [t.id for t in every[:2]]]


def test_load_run_reads_weights_saved_under_earlier_names(saved_run, tmp_path):
    """A checkpoint whose tensors carry the names of an earlier version
    (QwenRLModels.RENAMED) loads into today's models, equal to the same weights saved today."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qwenrl.models import QwenRLModels
    from qwenrl.train.checkpoint import WEIGHTS

    checkpoint = find_checkpoint(saved_run[0])
    earlier = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, earlier)
    weights = load_file(str(earlier / WEIGHTS))
    old_name = {new: old for old, new in QwenRLModels.RENAMED.items()}
    assert old_name and old_name.keys() <= weights.keys()
    save_file({old_name.get(k, k): v for k, v in weights.items()}, str(earlier / WEIGHTS))
    models, _, _ = load_run(earlier)
    today, _, _ = load_run(checkpoint)
    got, want = models.state_dict(), today.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_python_m_qwenrl_evaluate_is_the_same_command():
    import subprocess
    import sys

    from qwenrl import evaluate as alias
    from qwenrl.eval import evaluate as evaluate_mod

    assert alias.main is evaluate_mod.main
    done = subprocess.run(
        [sys.executable, "-m", "qwenrl.evaluate", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--vote_transforms" in done.stdout


def test_validation_takes_cells_and_exact_matches_from_the_voted_path(
    saved_run, tmp_path, monkeypatch
):
    from qwenrl.eval import validation as validation_mod

    fake = TaskTotals(tasks=3, queries=6, exact=4, target_cells=10, correct_cells=7)
    seen = {}

    def evaluate_tasks(models, tasks, **kwargs):
        seen.update(kwargs, n=len(tasks))
        return fake

    monkeypatch.setattr(validation_mod, "evaluate_tasks", evaluate_tasks)
    cfg = _tiny(saved_run[0].parent, out=str(tmp_path / "run"), eval_demos=False)
    cfg.vote_transforms, cfg.ttt_steps, cfg.ttt_batch_size = 5, 7, 3
    trainer = Trainer(cfg, quiet=True)
    summary = trainer.validate(0)
    trainer.close()
    assert summary["samples"] == 6 and summary["exact_match"] == pytest.approx(4 / 6)
    assert (summary["exact"], summary["cell_accuracy"]) == (4, pytest.approx(0.7))
    assert seen["n"] == 3 and seen["vote_transforms"] == 5 and seen["aug_seed"] == cfg.seed
    assert (seen["ttt"].steps, seen["ttt"].batch_size, seen["ttt"].tau) == (7, 3, cfg.tau_end)


def test_voting_and_ttt_in_validation_are_refused_with_fsdp():
    from qwenrl.train.config import ConfigError, check_config

    check_config(TrainConfig(fsdp=True))
    for flags in ({"vote_transforms": 2}, {"ttt_steps": 1}):
        with pytest.raises(ConfigError, match="--fsdp"):
            check_config(TrainConfig(fsdp=True, **flags))


def test_a_larger_prediction_is_never_exact_even_when_its_corner_matches():
    target = np.array([[1, 2], [3, 4]])
    bigger = np.array([[1, 2, 5], [3, 4, 6], [7, 8, 9]])  # its top-left 2×2 is the target
    totals = TaskTotals()
    canvas = grid_to_canvas(bigger, OUTSIDE).view(-1)
    assert not score_query(totals, [bigger], canvas, target)
    assert not score_query(totals, [bigger, bigger[:2]], canvas, target[:1])  # also wider
    assert totals.exact == 0
    # The cells inside the target are right in both the canvas and the first attempt.
    assert totals.correct_cells == totals.attempt_cells == 4 + 2


def test_exact_match_is_averaged_over_queries_not_tasks():
    """Task A has two queries, one solved; task B one query, unsolved: 1 of 3 queries (a
    per-task average would say (1/2 + 0) / 2 = 0.25)."""
    target = np.array([[1, 2]])
    canvas = grid_to_canvas(target, OUTSIDE).view(-1)
    totals = TaskTotals()
    for attempts in ([target], [target[:, :1]], [target + 1]):
        score_query(totals, attempts, canvas, target)
    totals.tasks = 2
    assert totals.summary()["exact_match"] == pytest.approx(1 / 3)


def test_cli_flags_reach_voting_and_test_time_training(saved_run, capsys, monkeypatch):
    """--vote_transforms reaches every prediction and --ttt_steps / --ttt_lr the tuning, not
    only the printed summary."""
    import qwenrl.eval.ttt as ttt_mod
    import qwenrl.eval.voting as voting_mod

    votes, tunings = [], []
    real_predict, real_adapt = voting_mod.predict, ttt_mod.adapt_to_task
    monkeypatch.setattr(
        voting_mod, "predict", lambda *a, **kw: votes.append(kw) or real_predict(*a, **kw)
    )
    monkeypatch.setattr(
        ttt_mod,
        "adapt_to_task",
        lambda m, d, cfg, **kw: tunings.append(cfg) or real_adapt(m, d, cfg, **kw),
    )
    run, _ = saved_run
    argv = [str(run), "--tasks", "2", "--vote_transforms", "3", "--ttt_steps", "1", "--quiet"]
    assert main([*argv, "--ttt_lr", "0.002"]) == 0
    capsys.readouterr()
    assert len(votes) == 4 and all(kw["vote_transforms"] == 3 for kw in votes)
    assert len(tunings) == 2 and all((c.steps, c.lr) == (1, 0.002) for c in tunings)


# --- the CLI's wiring: help, messages, the checkpoint it reads, the run's precision ---------


def test_help_describes_the_command_and_every_flag():
    from qwenrl.eval import evaluate as evaluate_mod

    parser = evaluate_mod.build_parser()
    assert parser.description == evaluate_mod.__doc__.split("\n\n")[0]
    for action in parser._actions:
        assert action.help, f"{action.dest} has no help"
    text = parser.format_help()
    assert text.startswith("usage: python -m qwenrl.eval.evaluate ")
    for phrase in (
        "the first N evaluation tasks (0: all)",
        "default: the run's value",
        "cpu, cuda or cuda:N; default: the run's",
        "result JSON; default: RUN_DIR/eval/...",
        "no progress bar",
    ):
        assert phrase in " ".join(text.split()), phrase
    assert parser.parse_args(["runs/x"]).tasks == 0  # all tasks by default


def test_the_result_file_and_line_name_what_was_run(saved_run, capsys, tmp_path):
    """The summary names the checkpoint, device and settings it ran with and its wall time;
    --out may point into folders that do not exist yet; one row per task; a progress bar on
    stderr unless --quiet."""
    import time

    run, _ = saved_run
    out = tmp_path / "deeper" / "still" / "result.json"
    start = time.perf_counter()
    argv = [str(run), "--tasks", "2", "--ttt_steps", "1", "--ttt_lr", "0.003", "--out", str(out)]
    assert main(argv) == 0
    elapsed = time.perf_counter() - start
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert "Evaluating" in captured.err and "task" in captured.err  # tqdm: "Evaluating: ... task/s"
    saved = json.loads(out.read_text())
    assert summary["checkpoint"] == str(find_checkpoint(run)) == saved["checkpoint"]
    assert (summary["device"], summary["ttt_steps"], summary["ttt_lr"]) == ("cpu", 1, 0.003)
    settings = ("vote_transforms", "ttt_batch_size", "ttt_augment", "ttt_stop_after")
    assert [summary[k] for k in settings] == [1, 8, True, 3]  # the run's own values
    assert summary["step"] == saved["step"] > 0
    assert 0 < summary["wall_s"] <= elapsed and summary["wall_s"] == round(summary["wall_s"], 2)
    assert [set(r) for r in saved["per_task"]] == [{"task_id", "solved"}] * 2
    assert [r["task_id"] for r in saved["per_task"]] == ["eval000", "eval001"]
    assert main([str(run), "--tasks", "1", "--quiet", "--out", str(out)]) == 0
    assert "Evaluating" not in capsys.readouterr().err


def test_evaluate_tasks_passes_the_augmentation_seed_to_voting(saved_run, monkeypatch):
    import qwenrl.eval.voting as voting_mod

    seeds = []
    real = voting_mod.predict
    monkeypatch.setattr(
        voting_mod, "predict", lambda *a, **kw: seeds.append(kw["aug_seed"]) or real(*a, **kw)
    )
    run, _ = saved_run
    models, cfg, _ = load_run(find_checkpoint(run), {})
    _, eval_tasks = load_tasks(cfg.data)
    evaluate_tasks(models, eval_tasks[:1], vote_transforms=2, aug_seed=7, progress=False)
    assert seeds and set(seeds) == {7}


def test_negative_tasks_and_bad_overrides_are_named(saved_run, capsys):
    run, _ = saved_run
    with pytest.raises(SystemExit):
        main([str(run), "--tasks", "-1"])
    assert "--tasks must be >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(run), "--device", "tpu"])
    assert "--device must be cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err


def test_a_checkpoint_directory_is_read_as_it_is(saved_run):
    run, _ = saved_run
    newest = find_checkpoint(run)
    assert newest.parent == run and (newest / "state.pt").is_file()
    assert find_checkpoint(newest) == newest


def test_load_run_names_the_checkpoint_and_keeps_fp16_off_the_cpu(saved_run):
    run, _ = saved_run
    checkpoint = find_checkpoint(run)
    with pytest.raises(ConfigError, match=str(checkpoint)):
        load_run(checkpoint, {"no_such_option": 1})
    _, cfg, _ = load_run(checkpoint, {"amp": "fp16"})
    assert cfg.amp == "off"  # fp16 autocast needs CUDA: the CPU evaluates in fp32
    _, cfg, _ = load_run(checkpoint, {"amp": "bf16"})
    assert cfg.amp == "bf16"


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_predictions_run_under_the_runs_autocast(saved_run, monkeypatch, capsys, amp):
    from qwenrl.eval import evaluate as evaluate_mod
    from qwenrl.eval import run as run_mod

    seen = []

    def fake_evaluate_tasks(models, tasks, *, autocast, **kwargs):
        with autocast():
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return TaskTotals()

    real_load = run_mod.load_run
    monkeypatch.setattr(evaluate_mod, "evaluate_tasks", fake_evaluate_tasks)
    monkeypatch.setattr(run_mod, "load_run", lambda c, o: real_load(c, {**o, "amp": amp}))
    run, _ = saved_run
    assert main([str(run), "--tasks", "1", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert isinstance(summary["wall_s"], float)
    (enabled, dtype), *rest = seen
    assert not rest
    assert enabled == (amp == "bf16")
    if enabled:
        assert dtype == torch.bfloat16
