"""Per-rank checkpoint state and the module DDP wraps.

* Every checkpoint holds one ``rank-<r>.pt`` per rank (embedding cache and RNG states): on
  resume each DDP rank gets back its own, not rank 0's (two gloo processes on the CPU).
* Single-process round trip; checkpoints from before the rank files (cache and RNG inside
  ``state.pt``, steering vectors named ``policy.steering``) still resume, evaluate and export.
* ``StepForward`` holds exactly the main optimizer's parameters (no RL head), so DDP wraps it
  without an ignore list and FSDP shards it without ``ignored_params``.

    python tests/train/test_rank_state.py SPEC.json     # one rank of the two-process test
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenrl.cache import EmbeddingCache
from qwenrl.eval.evaluate import main as evaluate_main
from qwenrl.eval.run import load_run
from qwenrl.models import ModelConfig, QwenRLModels, Steering
from qwenrl.train import TrainConfig, Trainer
from qwenrl.train import distributed as D
from qwenrl.train.checkpoint import Checkpointer, rng_state
from qwenrl.train.export import export, load_models
from qwenrl.train.step import StepForward

THIS = Path(__file__).resolve()

# A cache window is [3, 6): a checkpoint at step 4 holds embeddings that steps 4 and 5 read.
# Learning rates high enough that a recomputed embedding differs from the cached one.
SAVE_AT, STEPS = 4, 6


def write_arc(root: Path) -> Path:
    """12 training and 3 evaluation tasks: random grids (2 to 5 cells a side) and mirrors."""
    rng = np.random.default_rng(1)
    for split, n in (("training", 12), ("evaluation", 3)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = rng.integers(2, 6, size=2)
            pairs = []
            for _ in range(4):
                grid = rng.integers(0, 10, size=(h, w))
                pairs.append({"input": grid.tolist(), "output": np.fliplr(grid).tolist()})
            task = {"train": pairs[:3], "test": pairs[3:]}
            (root / split / f"task{i:03d}.json").write_text(json.dumps(task))
    return root


def config(arc: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    cfg = dict(
        epochs=2, max_batches=4, batch_size=2, working_set=4, refresh_every=3, dim=32,
        agent_layers=1, qwen_max_length=128, val_tasks=2, val_batch_size=4, log_every=1,
        seed=0, qwen_lr=1e-2, agent_lr=1e-2, rl_lr=1e-2, warmup_steps=1, prompt_dropout=0.3,
        data=str(arc), out=str(out),
    )  # fmt: skip
    return {**cfg, **overrides}


def own_state(trainer: Any) -> dict[str, Any]:
    """What this rank must get back on resume: its cache and RNG states, as saved."""
    return {"cache": trainer.cache.state_dict(), "rng": rng_state()}


def assert_same(a: Any, b: Any) -> None:
    """Nested dicts / lists / tensors equal, bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def differs(a: Any, b: Any) -> bool:
    try:
        assert_same(a, b)
    except AssertionError:
        return True
    return False


# --- two DDP ranks ----------------------------------------------------------------------------


def worker(spec: dict[str, Any]) -> None:
    """One rank: train to SAVE_AT and save (``resume`` unset), or resume; then train to STEPS.
    Writes what the rank held at the save (or right after resuming) and the losses after it."""
    trainer = Trainer(TrainConfig(**spec["config"]), quiet=True)
    rank = trainer.dist.rank
    result: dict[str, Any] = {"start": trainer.step}
    if not spec["config"].get("resume"):
        while trainer.step < SAVE_AT:
            trainer.train_step(trainer.batch_at(trainer.step))
        # The ranks are seeded alike and draw alike: make their RNG states differ, so that a
        # rank given another rank's states is caught.
        torch.rand(rank + 1)
        for _ in range(rank + 1):
            random.random()
        result["path"] = str(trainer.save_checkpoint())
    result["own"] = own_state(trainer)
    result["losses"] = [
        trainer.train_step(trainer.batch_at(s))["loss"] for s in range(trainer.step, STEPS)
    ]
    policy = trainer.models.policy
    result["steering"] = policy.steering.detach().clone()
    result["head"] = torch.cat([p.detach().flatten() for p in policy.policy_parameters()])
    result["wrapped"] = type(trainer.forward).__name__
    torch.save(result, f"{spec['result']}.{rank}")
    trainer.close()
    print("DONE", flush=True)
    D.exit_without_teardown()


def launch(world: int, spec: dict[str, Any], tmp: Path, timeout: float = 300) -> list[dict]:
    """``world`` processes of :func:`worker` with torchrun's environment (gloo, loopback)."""
    tmp.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "result": str(tmp / "result")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, str(THIS), str(tmp / "spec.json")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    try:
        for rank, p in enumerate(procs):
            out, err = p.communicate(timeout=timeout)
            # gloo can abort in its C++ teardown after all work is done (pytorch#179291).
            assert "DONE" in out and p.returncode in (0, -6), f"rank {rank}: {err[-3000:]}"
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return [torch.load(f"{spec['result']}.{r}", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    """Two DDP ranks saved at SAVE_AT and run on to STEPS; the same resumed in new processes."""
    root = tmp_path_factory.mktemp("rank_state")
    cfg = config(write_arc(root / "arc"), root / "run")
    full = launch(2, {"config": cfg}, root / "full")
    resumed = launch(2, {"config": {**cfg, "resume": full[0]["path"]}}, root / "resumed")
    return full, resumed


@pytest.mark.slow
def test_ddp_ranks_resume_their_own_cache_and_rng(ddp_runs):
    full, resumed = ddp_runs
    path = Path(full[0]["path"])
    assert full[1]["path"] == str(path)
    assert sorted(p.name for p in path.glob("rank-*.pt")) == ["rank-00000.pt", "rank-00001.pt"]
    state = torch.load(path / "state.pt", weights_only=True)
    assert "cache" not in state and "rng" not in state and state["world_size"] == 2
    # The ranks cache disjoint prompts and hold different RNG states: the test can tell them
    # apart.
    assert differs(full[0]["own"]["cache"], full[1]["own"]["cache"])
    assert differs(full[0]["own"]["rng"], full[1]["own"]["rng"])
    for rank in (0, 1):
        assert resumed[rank]["start"] == SAVE_AT
        assert_same(resumed[rank]["own"], full[rank]["own"])
        assert resumed[rank]["losses"] == full[rank]["losses"]  # the run continues exactly


@pytest.mark.slow
def test_ddp_wraps_the_main_parameters_and_keeps_them_in_step(ddp_runs):
    """DDP (no private ignore list) all-reduces the steering vectors, which now sit in their
    own module; the RL head, outside it, averages its own gradients: both agree on the
    ranks."""
    full, resumed = ddp_runs
    for run in (full, resumed):
        assert run[0]["wrapped"] == run[1]["wrapped"] == "DistributedDataParallel"
        torch.testing.assert_close(run[0]["steering"], run[1]["steering"], rtol=0, atol=0)
        torch.testing.assert_close(run[0]["head"], run[1]["head"], rtol=0, atol=0)


# --- one process ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arc(tmp_path_factory) -> Path:
    return write_arc(tmp_path_factory.mktemp("arc"))


def test_single_process_round_trip(arc, tmp_path):
    trainer = Trainer(TrainConfig(**config(arc, tmp_path / "run")), quiet=True)
    while trainer.step < SAVE_AT:
        trainer.train_step(trainer.batch_at(trainer.step))
    saved = own_state(trainer)
    path = trainer.save_checkpoint()
    losses = [trainer.train_step(trainer.batch_at(s))["loss"] for s in range(SAVE_AT, STEPS)]
    trainer.close()
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors",
        "rank-00000.pt",
        "state.pt",
    ]
    assert set(torch.load(path / "rank-00000.pt", weights_only=True)) == {"cache", "rng"}
    resumed = Trainer(TrainConfig(**config(arc, tmp_path / "run", resume=str(path))), quiet=True)
    assert_same(own_state(resumed), saved)
    again = [resumed.train_step(resumed.batch_at(s))["loss"] for s in range(SAVE_AT, STEPS)]
    resumed.close()
    assert again == losses


def test_missing_rank_file_warns_and_starts_fresh(arc, tmp_path):
    trainer = Trainer(TrainConfig(**config(arc, tmp_path / "run")), quiet=True)
    trainer.train_step(trainer.batch_at(0))
    path = trainer.save_checkpoint()
    trainer.close()
    (path / "rank-00000.pt").unlink()
    with pytest.warns(RuntimeWarning, match="rank-00000.pt.*empty embedding cache"):
        resumed = Trainer(TrainConfig(**config(arc, tmp_path / "run", resume="auto")), quiet=True)
    assert resumed.step == 1 and len(resumed.cache) == 0
    resumed.close()


def test_another_number_of_ranks_gives_no_rank_state(arc, tmp_path):
    trainer = Trainer(TrainConfig(**config(arc, tmp_path / "run")), quiet=True)
    trainer.train_step(trainer.batch_at(0))
    path = trainer.save_checkpoint()
    trainer.close()
    state = Checkpointer.load_state(path)
    own, why = Checkpointer.load_rank_state(path, state, D.DistInfo(0, 2))
    assert own is None and "saved by 1 ranks, this run has 2" in why
    own, why = Checkpointer.load_rank_state(path, state, D.DistInfo())
    assert own is not None and why == ""


def test_checkpoint_from_before_rank_files_still_loads(arc, tmp_path):
    """The earlier layout: rank 0's cache and RNG inside ``state.pt``, no rank files, no
    world size, the steering vectors under ``policy.steering``. It resumes exactly (one
    process), and evaluation and the export read it."""
    trainer = Trainer(TrainConfig(**config(arc, tmp_path / "run")), quiet=True)
    while trainer.step < SAVE_AT:
        trainer.train_step(trainer.batch_at(trainer.step))
    saved = own_state(trainer)
    weights = {k: v.clone() for k, v in trainer.models.state_dict().items()}
    weights["policy.steering"] = weights.pop("policy.steerer.vectors")
    state = {**trainer.state_dict(), **saved}
    del state["world_size"]
    path = Checkpointer(tmp_path / "run").save(trainer.step, weights, state)
    losses = [trainer.train_step(trainer.batch_at(s))["loss"] for s in range(SAVE_AT, STEPS)]
    trainer.close()
    assert not list(path.glob("rank-*"))

    resumed = Trainer(TrainConfig(**config(arc, tmp_path / "run", resume=str(path))), quiet=True)
    assert_same(own_state(resumed), saved)
    assert torch.equal(resumed.models.policy.steering, weights["policy.steering"])
    again = [resumed.train_step(resumed.batch_at(s))["loss"] for s in range(SAVE_AT, STEPS)]
    resumed.close()
    assert again == losses

    # Under DDP rank 0 takes its state from state.pt; another rank has none.
    old = Checkpointer.load_state(path)
    assert Checkpointer.load_rank_state(path, old, D.DistInfo(0, 2))[0] is not None
    own, why = Checkpointer.load_rank_state(path, old, D.DistInfo(1, 2))
    assert own is None and "rank 0 only" in why

    models, _, step = load_run(path)
    assert step == SAVE_AT
    assert torch.equal(models.policy.steering, weights["policy.steering"])
    out = export(path, tmp_path / "export")
    exported = load_models(out)
    assert torch.equal(exported.policy.steering, weights["policy.steering"])
    assert "policy.steerer.vectors" in load_file(str(out / "model.safetensors"))


def test_old_key_loads_through_the_pre_hook():
    cfg = ModelConfig(dim=32, agent_layers=1, max_length=128)
    source, target = QwenRLModels(cfg), QwenRLModels(cfg)
    weights = source.state_dict()
    weights["policy.steering"] = weights.pop("policy.steerer.vectors")
    assert not target.load_state_dict(weights).unexpected_keys  # strict: nothing left over
    assert torch.equal(target.policy.steering, source.policy.steering)
    assert "policy.steering" in weights  # the caller's dict is left as it was
    # The policy alone, with its own prefix.
    alone = {k.removeprefix("policy."): v for k, v in weights.items() if k.startswith("policy.")}
    target.policy.load_state_dict(alone)


# --- the module DDP wraps and FSDP's root -----------------------------------------------------


def test_step_forward_holds_exactly_the_main_optimizer_parameters():
    models = QwenRLModels(ModelConfig(dim=32, agent_layers=1, max_length=128))
    step = StepForward(models, EmbeddingCache(8, 32))
    groups = models.main_param_groups(agent_lr=1.0, qwen_lr=1.0)
    main = [id(p) for g in groups for p in g["params"]]
    assert len(main) == len(set(main))
    assert {id(p) for p in step.parameters()} == set(main)
    assert not {id(p) for p in models.rl_parameters()} & set(main)
    # The same module objects as the models', the RL policy held but not registered.
    assert dict(step.named_children()) == {
        "encoder": models.encoder,
        "refiner": models.refiner,
        "steerer": models.policy.steerer,
        "agent": models.agent,
    }
    assert step.models is models and isinstance(models.policy.steerer, Steering)
    assert models.policy.steering is models.policy.steerer.vectors
    assert models.policy.steering_parameters() == [models.policy.steering]


def test_fsdp_shards_the_steering_module_the_policy_uses(tmp_path):
    """FSDP (one gloo rank) shards every main parameter, the steering vectors as the root's,
    on the module ``models.policy`` steers with; the RL head stays a plain tensor. An earlier
    sharded checkpoint (``policy.steering`` in the weights and in AdamW's state) loads."""
    import torch.distributed as dist

    def sharded_models() -> tuple[QwenRLModels, torch.optim.Optimizer]:
        models = QwenRLModels(ModelConfig(dim=32, agent_layers=1, max_length=128))
        root = StepForward(models, EmbeddingCache(8, 32))
        D.shard_models(models, root, torch.device("cpu"), bf16=False)
        groups = models.main_param_groups(agent_lr=1e-2, qwen_lr=1e-2)
        return models, torch.optim.AdamW(groups)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        models, optimizer = sharded_models()
        assert D.is_sharded(models.policy.steering)
        assert models.policy.steering is models.policy.steerer.vectors
        assert all(D.is_sharded(p) for g in optimizer.param_groups for p in g["params"])
        assert not any(D.is_sharded(p) for p in models.rl_parameters())
        for g in optimizer.param_groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        optimizer.step()
        # Saved as before the steering vectors moved into their own module.
        earlier = D.sharded_state_dict(models, optimizer)
        D.rename_parameters(earlier, {"policy.steerer.vectors": "policy.steering"})
        assert "policy.steering" in earlier["optimizer"]["state"]
        path = Checkpointer(tmp_path / "run").save_sharded(
            1, earlier, {"step": 1}, {}, D.DistInfo()
        )

        torch.manual_seed(1)
        fresh, fresh_optimizer = sharded_models()
        into = D.sharded_state_dict(fresh, fresh_optimizer)
        state, own = Checkpointer.load_sharded(path, into, 0, QwenRLModels.RENAMED)
        assert state == {"step": 1} and own == {}
        D.load_sharded_state_dict(fresh, fresh_optimizer, into)
        for a, b in zip(models.parameters(), fresh.parameters()):
            assert torch.equal(D.full_value(a.detach()), D.full_value(b.detach()))
        moments = [optimizer.state[models.policy.steering]["exp_avg"]]
        moments.append(fresh_optimizer.state[fresh.policy.steering]["exp_avg"])
        assert torch.equal(*(D.full_value(m) for m in moments))
        weights = Checkpointer.load_weights(
            path, lambda: QwenRLModels(fresh.config).state_dict(), QwenRLModels.RENAMED
        )
        assert torch.equal(weights["policy.steerer.vectors"], D.full_value(fresh.policy.steering))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    worker(json.loads(Path(sys.argv[1]).read_text()))


def test_weights_from_another_version_are_refused_by_name(arc, tmp_path, capsys):
    """A checkpoint saved before a parameter existed (the rule hint's) or with one this
    version lacks: evaluation, the export's loader and resuming each refuse it naming the
    parameters, and ``python -m qwenrl.evaluate`` says so in one line."""
    trainer = Trainer(TrainConfig(**config(arc, tmp_path / "run")), quiet=True)
    weights = {k: v.clone() for k, v in trainer.models.state_dict().items()}
    del weights["agent.rule_gain"]
    weights["agent.old_part"] = torch.zeros(1)
    states = weights["agent.state_emb.weight"]  # saved when the agent had one cell state less
    weights["agent.state_emb.weight"] = states[:-1].clone()
    path = Checkpointer(tmp_path / "run").save(0, weights, trainer.state_dict())
    trainer.close()
    rows, dim = states.shape
    why = (
        r"missing: agent.rule_gain; unexpected: agent.old_part; other shapes: "
        rf"agent.state_emb.weight \(saved \[{rows - 1}, {dim}\], here \[{rows}, {dim}\]\)"
    )
    with pytest.raises(ValueError, match=why):
        load_run(path)
    assert evaluate_main([str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: its weights do not fit")
    assert re.search(why, err)
    with pytest.raises(ValueError, match=why):
        Trainer(TrainConfig(**config(arc, tmp_path / "run", resume=str(path))), quiet=True)
    out = tmp_path / "export"
    out.mkdir()
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.yaml").write_text((tmp_path / "run" / "config.yaml").read_text())
    with pytest.raises(ValueError, match=f"{out}: its weights do not fit"):
        load_models(out)
