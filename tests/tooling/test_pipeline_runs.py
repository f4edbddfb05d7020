"""bench/pipeline_runs.py: ablation and compute-curve sweeps read finished runs, run the rest
with the right flags, and tabulate the final validation against the default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import pipeline_runs  # noqa: E402


def _finished(run: Path, cell: float, exact: int, wall_s: float = 300.0) -> None:
    run.mkdir(parents=True)
    val = {"kind": "val", "cell_accuracy": cell, "canvas_accuracy": 0.9, "exact": exact}
    records = [{"kind": "train", "loss": 1.0}, {**val, "exact": 0}, {**val, "samples": 419}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (run / "wall.json").write_text(json.dumps({"wall_s": wall_s}))


def test_finished_runs_are_read_and_compared_with_the_default(tmp_path, monkeypatch):
    _finished(tmp_path / "ablations" / "default", 0.786, 2)
    _finished(tmp_path / "ablations" / "no_hints", 0.700, 1)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a finished run reran"))
    table = pipeline_runs.ablations(tmp_path, ["default", "no_hints"], [])
    rows = table.splitlines()[2:]
    assert rows[0].startswith("| nothing: the default run `(none)` | 0.7860 | 2/419 |")
    assert "`--no-demo_hints` | 0.7000 (-0.0860) | 1/419 (-1) | 0.9000 | 5.0 |" in rows[1]
    saved = json.loads((tmp_path / "ablations" / "ablations.json").read_text())
    assert saved["no_hints"]["exact"] == 1  # the last validation, not an earlier one


def test_an_unfinished_run_is_trained_with_its_flags(tmp_path, monkeypatch):
    seen = []

    def fake_run(cmd, stdout, stderr, env):
        seen.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        assert not out.exists()  # nothing written into it first: the trainer would move it
        out.mkdir()
        (out / "metrics.jsonl").write_text(
            json.dumps({"kind": "val", "cell_accuracy": 0.5, "canvas_accuracy": 0.8, "exact": 3})
        )
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    result = pipeline_runs.train(tmp_path / "curve" / "epochs-8", ["--num_threads", "1"])
    assert seen[0][1:] == ["-m", "qwenrl.train", "--out", str(tmp_path / "curve" / "epochs-8"),
                           "--num_threads", "1"]  # fmt: skip
    assert result["exact"] == 3 and result["wall_s"] >= 0
    assert (tmp_path / "curve" / "epochs-8.log").is_file()


def test_a_failed_run_stops_the_sweep_and_names_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(SystemExit, match=r"failed \(1\); see .*no_rl\.log"):
        pipeline_runs.train(tmp_path / "ablations" / "no_rl", ["--num_actions", "1"])


def test_every_ablation_turns_one_part_off_with_real_flags():
    from qwenrl.train.config import build_parser, check_config, config_from_dict

    parser = build_parser()
    defaults = vars(parser.parse_args([]))
    for name, (flags, _) in pipeline_runs.ABLATIONS.items():
        args = vars(parser.parse_args(flags))
        changed = {k for k in args if args[k] != defaults[k]}
        if "--refresh_every" in flags:  # the schedule kept at the default's 960 steps
            changed -= {"epochs", "tau_epoch", "val_every"}
        assert len(changed) == (0 if name == "default" else 1), (name, changed)
        args.pop("config")
        check_config(config_from_dict(args))
