"""qwenrl.train.checkpoint: atomic writes, pruning, the newest complete checkpoint."""

from __future__ import annotations

import pytest
import torch

from qwenrl.train.checkpoint import (
    Checkpointer,
    find_checkpoint,
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


def test_load_weights_reads_plain_and_sharded_checkpoints_in_one_process(tmp_path):
    """One reader for evaluation and the export: model.safetensors as saved, or DCP shards
    (here written by one process, as each FSDP rank writes its own) into ``like()``'s tensors,
    which it asks for only then."""
    from qwenrl.train.distributed import DistInfo

    ckpt = Checkpointer(tmp_path, keep=3)
    w = {"a": torch.arange(6.0), "b": torch.ones(2, 3)}
    plain = ckpt.save(1, w, {"step": 1})
    sharded = ckpt.save_sharded(
        2, {"model": {k: 2 * v for k, v in w.items()}}, {"step": 2}, {}, DistInfo()
    )
    asked = []

    def like():
        asked.append(1)
        return {k: torch.zeros_like(v) for k, v in w.items()}

    got = Checkpointer.load_weights(plain, like)
    assert not asked and got.keys() == w.keys() and all(torch.equal(got[k], w[k]) for k in w)
    got = Checkpointer.load_weights(sharded, like)
    assert asked == [1] and all(torch.equal(got[k], 2 * w[k]) for k in w)
    assert Checkpointer.load_state(sharded) == {"step": 2}
    assert find_checkpoint(tmp_path) == sharded and find_checkpoint(plain) == plain
    (tmp_path / "empty").mkdir()
    for nothing in (tmp_path / "nowhere", tmp_path / "empty"):
        with pytest.raises(FileNotFoundError):
            Checkpointer.load_weights(nothing, like)
        with pytest.raises(FileNotFoundError):
            find_checkpoint(nothing)
