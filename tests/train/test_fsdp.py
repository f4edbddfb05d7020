"""FSDP2 (``--fsdp``) on two gloo processes: same losses as one process, half the memory of
DDP per rank, exact resume from sharded checkpoints, atomic sharded saves, the export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_worker import launch
from tiny_run import tiny_config, write_arc_tasks

from qwenrl.eval.run import load_run
from qwenrl.models import QwenPromptEncoder, TinyQwenConfig
from qwenrl.train import Checkpointer, TrainConfig, Trainer, latest_checkpoint, parse_args
from qwenrl.train import checkpoint as checkpoint_mod
from qwenrl.train.distributed import DistInfo
from qwenrl.train.export import load_models
from qwenrl.train.export import main as export_main

# Qwen with several layers, so that the decoder layers are FSDP units of their own.
QWEN4 = TinyQwenConfig(hidden_size=48, num_layers=4, num_heads=4, num_kv_heads=1)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """ARC tasks (12 training, 3 evaluation) and a local 4-layer Qwen checkpoint."""
    root = tmp_path_factory.mktemp("fsdp")
    write_arc_tasks(root / "arc" / "training", 12, seed=1)
    write_arc_tasks(root / "arc" / "evaluation", 3, seed=2)
    torch.manual_seed(0)
    QwenPromptEncoder(32, tiny=QWEN4).save_pretrained(root / "qwen4")
    return root


def config(work: Path, out: str, **overrides) -> dict:
    """A worker's config: the tiny run on work/arc, validating on 3 tasks one at a time."""
    cfg = tiny_config(work / out, work / "arc", val_tasks=3, val_batch_size=1, **overrides)
    return cfg.to_dict()


# Random draws are taken out of the comparison with one process (each rank draws its own
# numbers): greedy actions, the RL head frozen, no prompt dropout.
SAME_DRAWS = dict(rl_lr=0.0, prompt_dropout=0.0)


def _combined(work: Path, name: str, world: int, **overrides) -> list[dict]:
    """Five steps on the two-rank split of the batch (one process: both halves), a local
    Qwen checkpoint, then a validation."""
    batch = 4 if world == 1 else 2
    cfg = config(work, name, batch_size=batch, qwen=str(work / "qwen4"), **SAME_DRAWS, **overrides)
    spec = {"config": cfg, "steps": 5, "batches": "split", "greedy": True, "validate": True}
    return launch(world, spec, work / f"w-{name}")


@pytest.fixture(scope="module")
def one(work) -> dict:
    return _combined(work, "one", 1)[0]


@pytest.fixture(scope="module")
def fsdp(work) -> list[dict]:
    return _combined(work, "fsdp", 2, fsdp=True)


@pytest.fixture(scope="module")
def ddp(work) -> list[dict]:
    return _combined(work, "ddp", 2)


@pytest.mark.slow
def test_fsdp_matches_one_process_on_the_combined_batch(one, fsdp):
    """Two ranks on half batches = one process on the whole batch: losses, parameters after
    five steps (gradients averaged by the reduce-scatter), and the validation totals (each
    rank scores its share; 3 tasks on 2 ranks: the shares differ in size)."""
    for rank in fsdp:
        assert rank["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-5)
        torch.testing.assert_close(rank["params"], one["params"], rtol=1e-3, atol=1e-5)
        for key in ("cell_accuracy", "canvas_accuracy", "mask_ratio", "samples"):
            assert rank["val"][key] == pytest.approx(one["val"][key], rel=1e-4, abs=1e-5), key
    assert one["losses"][0] != one["losses"][-1]  # the parameters moved


@pytest.mark.slow
def test_fsdp_ranks_hold_only_their_shards(fsdp, ddp, one):
    """Every main parameter is sharded, no rank keeps a full copy of a Qwen weight after
    loading the local checkpoint, and a rank's parameters + optimizer state are about half of
    what a DDP rank holds (DDP holds the whole model, as one process does)."""
    for rank in (0, 1):
        assert all(fsdp[rank]["sharded"]) and not any(ddp[rank]["sharded"])
        assert fsdp[rank]["full_copies"] == []
        assert fsdp[rank]["master_dtypes"] == {"torch.float32"}
        assert ddp[rank]["memory"] == one["memory"]
        fsdp_bytes = sum(fsdp[rank]["memory"].values())
        ddp_bytes = sum(ddp[rank]["memory"].values())
        assert 0.45 < fsdp_bytes / ddp_bytes < 0.55, (fsdp_bytes, ddp_bytes)


@pytest.fixture(scope="module")
def resumed(work) -> tuple[list[dict], list[dict]]:
    """An FSDP run in bf16 with the RL head training and prompt dropout on, saved at step 4
    (inside the cache window [3, 6)) and run on to step 6; and a run resumed from that
    checkpoint in new processes. Learning rates high enough that one step changes Qwen's
    output in bf16: a cached embedding differs from a recomputed one."""
    cfg = config(
        work, "resume", fsdp=True, amp="bf16", rl_lr=1e-2, prompt_dropout=0.3, qwen_lr=1e-2,
        agent_lr=1e-2, warmup_steps=1,
    )  # fmt: skip
    full = launch(2, {"config": cfg, "steps": 6, "save_at": [4]}, work / "w-full")
    path, _ = full[0]["saved"][4]
    resumed = launch(2, {"config": {**cfg, "resume": path}, "steps": 6}, work / "w-resumed")
    return full, resumed


@pytest.mark.slow
def test_fsdp_resume_continues_exactly(resumed):
    """The resumed run computes what the uninterrupted one did: each rank's embedding cache
    and RNG states, the sharded weights and AdamW state, the RL head and its baseline."""
    full, again = resumed
    for rank in (0, 1):
        assert again[rank]["start"] == 4
        assert again[rank]["losses"] == full[rank]["losses"][4:]
        assert again[rank]["cache"] == full[rank]["cache"]  # hits and misses: its own cache
        torch.testing.assert_close(again[rank]["params"], full[rank]["params"], rtol=0, atol=0)
        torch.testing.assert_close(again[rank]["rl"], full[rank]["rl"], rtol=0, atol=0)
        torch.testing.assert_close(again[rank]["baseline"], full[rank]["baseline"])
        assert full[rank]["master_dtypes"] == {"torch.float32"}  # bf16 compute, fp32 masters
    # One RL head on both ranks although each saw other data (gradients averaged).
    torch.testing.assert_close(full[0]["rl"], full[1]["rl"], rtol=0, atol=0)


@pytest.mark.slow
def test_export_consolidates_a_sharded_checkpoint(resumed, tmp_path, capsys):
    full, _ = resumed
    path, params = full[0]["saved"][4]
    run = Path(path).parent
    assert latest_checkpoint(run) is not None
    with pytest.raises(ValueError, match="sharded"):
        Checkpointer.load(path)
    assert export_main([str(path), "--out", str(tmp_path / "export")]) == 0
    models = load_models(tmp_path / "export")
    assert not models.training
    groups = models.main_param_groups(agent_lr=0.0, qwen_lr=0.0)
    flat = torch.cat([p.detach().flatten() for g in groups for p in g["params"]])
    torch.testing.assert_close(flat, params, rtol=0, atol=0)
    assert export_main([str(tmp_path / "nothing")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_load_run_reads_a_sharded_checkpoint(resumed):
    """Evaluation reads a two-rank FSDP checkpoint in one process, with no export first: the
    full weights the ranks held at the save, the step, the run's options for one process."""
    full, _ = resumed
    path, params = full[0]["saved"][4]
    for where in (Path(path), Path(path).parent):  # the checkpoint, or the run's newest
        models, cfg, step = load_run(where)
        assert step == 4 and not cfg.fsdp and cfg.amp == "bf16" and not models.training
        groups = models.main_param_groups(agent_lr=0.0, qwen_lr=0.0)
        flat = torch.cat([p.detach().flatten() for g in groups for p in g["params"]])
        torch.testing.assert_close(flat, params, rtol=0, atol=0)


# --- without processes ---------------------------------------------------------------------


def test_killed_sharded_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """A sharded save that dies after writing some shards leaves no checkpoint of its step:
    the previous one stays the newest complete one and loads; the next save cleans up."""
    import torch.distributed.checkpoint as dcp

    ckpt, info = Checkpointer(tmp_path, keep=3), DistInfo()
    weights = {"model": {"w": torch.arange(6.0)}}
    ckpt.save_sharded(1, weights, {"step": 1}, {"cache": 1}, info)
    real_save = dcp.save

    def dies_midway(state, *, storage_writer, **kwargs):
        (Path(storage_writer.path) / "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(dcp, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_sharded(2, {"model": {"w": torch.zeros(6)}}, {"step": 2}, {"cache": 2}, info)
    assert latest_checkpoint(tmp_path) == ckpt.path(1)
    assert not ckpt.path(2).exists()
    into = {"model": {"w": torch.zeros(6)}}
    state, own = Checkpointer.load_sharded(ckpt.path(1), into, rank=0)
    assert state == {"step": 1} and own == {"cache": 1}
    torch.testing.assert_close(into["model"]["w"], torch.arange(6.0))
    monkeypatch.setattr(dcp, "save", real_save)
    ckpt.save_sharded(3, weights, {"step": 3}, {"cache": 3}, info)
    assert latest_checkpoint(tmp_path) == ckpt.path(3)
    assert not list(tmp_path.glob(".tmp-*"))  # the killed save's remains are gone


def test_single_process_checkpoint_is_refused_by_the_sharded_loader(tmp_path):
    path = Checkpointer(tmp_path).save(1, {"w": torch.ones(2)}, {"step": 1})
    with pytest.raises(ValueError, match="without --fsdp"):
        Checkpointer.load_sharded(path, {}, rank=0)
    assert not checkpoint_mod.is_sharded_checkpoint(path)


def test_fsdp_with_fp16_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--fsdp", "--amp", "fp16"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--amp fp16 cannot be combined with --fsdp" in err and "bf16" in err


def test_fsdp_without_torchrun_names_torchrun(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"torchrun --nproc_per_node=N \(N >= 2\)"):
        Trainer(TrainConfig(fsdp=True, out=str(tmp_path / "run")), quiet=True)


@pytest.mark.parametrize("bf16", [True, False])
def test_fsdp_reduces_gradients_in_float32(tmp_path, monkeypatch, bf16):
    """Every FSDP unit reduces gradients in float32 (as docs/distributed.md says), computing
    in bf16 only with --amp bf16, and the RL head is left out of the root's shards."""
    import torch.distributed as dist
    import torch.distributed.fsdp as fsdp_mod

    from qwenrl.cache import EmbeddingCache
    from qwenrl.models import ModelConfig, QwenRLModels
    from qwenrl.train.distributed import is_sharded, shard_models
    from qwenrl.train.step import StepForward

    calls = []
    real = fsdp_mod.fully_shard

    def spy(module, **kwargs):
        calls.append((module, kwargs))
        return real(module, **kwargs)

    monkeypatch.setattr(fsdp_mod, "fully_shard", spy)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        models = QwenRLModels(ModelConfig(dim=32, agent_layers=1, max_length=128))
        root = StepForward(models, EmbeddingCache(8, 32))
        shard_models(models, root, torch.device("cpu"), bf16=bf16)
    finally:
        dist.destroy_process_group()
    units = [m for m, _ in calls]
    assert units[-1] is root and models.agent in units and models.refiner in units
    assert all(layer in units for layer in models.encoder.qwen.layers)
    for _, kwargs in calls:
        assert kwargs["mp_policy"].reduce_dtype == torch.float32
        assert kwargs["mp_policy"].param_dtype == (torch.bfloat16 if bf16 else None)
    # The root (StepForward) does not hold the RL head: nothing to ignore, and it stays whole.
    assert "ignored_params" not in calls[-1][1]
    assert not any(is_sharded(p) for p in models.rl_parameters())
