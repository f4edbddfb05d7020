"""qwenrl.train.checkpoint: atomic writes, pruning, the newest complete checkpoint."""

from __future__ import annotations

import pytest
import torch

from qwenrl.train.checkpoint import (
    Checkpointer,
    latest_checkpoint,
    move_earlier_run,
    write_json_atomic,
)


def test_save_load_prune_and_latest(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (3, 10, 7):
        path = ckpt.save(step, {"w": torch.full((2,), float(step))}, {"step": step, "x": [1, 2]})
    assert path == tmp_path / "checkpoint-00000007"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-00000007",
        "checkpoint-00000010",
    ]
    assert ckpt.latest() == latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000010"
    weights, state = Checkpointer.load(path)
    assert torch.equal(weights["w"], torch.full((2,), 7.0)) and state == {"step": 7, "x": [1, 2]}


def test_torn_saves_are_ignored_then_cleaned(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3)
    good = ckpt.save(1, {"w": torch.zeros(1)}, {"step": 1})
    torn = tmp_path / ".tmp-checkpoint-00000002-999"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"half")
    half = tmp_path / "checkpoint-00000003"  # weights written, state missing
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"x")
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(FileNotFoundError, match="checkpoint-00000003"):
        Checkpointer.load(half)
    ckpt.save(4, {"w": torch.zeros(1)}, {"step": 4})
    assert not torn.exists()


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, keep=0)


def test_atomic_json_leaves_no_temp_file(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    write_json_atomic(tmp_path / "a.json", {"x": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert (tmp_path / "a.json").read_text() == '{"x": 2}'


def test_a_fresh_run_moves_an_earlier_one_aside(tmp_path):
    out = tmp_path / "run"
    assert move_earlier_run(out) is None  # nothing there
    out.mkdir()
    assert move_earlier_run(out) is None  # empty
    (out / "metrics.jsonl").write_text("{}\n")
    aside = move_earlier_run(out)
    assert aside is not None and (aside / "metrics.jsonl").is_file() and not out.exists()
