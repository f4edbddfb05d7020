"""A trainer process for the multi-process tests and benchmarks, and the launcher that starts
several of them the way torchrun does (gloo on the CPU, one free port).

    python tests/distributed_worker.py SPEC.json

SPEC: ``config`` (TrainConfig fields), ``steps`` (train until this global step), ``batches``
("own": each rank's ``batch_at(step)``; "split": the two-rank split of
``tests/train/test_train.py``'s DDP test, one process taking both halves), ``greedy`` (RL actions
without sampling), ``save_at`` (steps after which to save a checkpoint), ``validate`` (run a
validation at the end), ``timed`` (steps whose wall time is measured after the others) and
``result`` (each rank writes ``<result>.<rank>``).
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORKER = Path(__file__).resolve()


def run(spec: dict[str, Any]) -> None:
    import torch

    from qwenrl.data import WorkingSetSampler, collate
    from qwenrl.train import TrainConfig, Trainer
    from qwenrl.train import distributed as D

    cfg = TrainConfig(**spec["config"])
    trainer = Trainer(cfg, quiet=True)
    rank, world = trainer.dist.rank, trainer.dist.world_size
    result: dict[str, Any] = {"start": trainer.step, "full_copies": full_qwen_copies(trainer)}
    policy = trainer.models.policy
    if spec.get("greedy"):
        act = policy.act
        policy.act = lambda refined, greedy=False: act(refined, greedy=True)
    samplers = [
        WorkingSetSampler(
            trainer.train_set, 2, working_set=4, refresh_every=cfg.refresh_every, rank=r,
            world_size=2,
        )
        for r in range(2)
    ]  # fmt: skip

    def batch(step: int):
        if spec.get("batches", "own") == "own":
            return trainer.batch_at(step)
        parts = [s.batch(step) for s in samplers]
        mine = parts[rank] if world > 1 else parts[0] + parts[1]
        return collate([trainer.train_set[j] for j in mine])

    def full_params() -> torch.Tensor:
        # Full values of the sharded parameters: a collective, in one order on every rank.
        return torch.cat([D.full_value(p.detach()).flatten() for p in trainer.main_params])

    losses, saved = [], {}
    while trainer.step < spec["steps"]:
        losses.append(trainer.train_step(batch(trainer.step)))
        if trainer.step in spec.get("save_at", []):
            saved[trainer.step] = (str(trainer.save_checkpoint()), full_params())
    result["losses"] = [m["loss"] for m in losses]
    result["saved"] = saved
    if spec.get("validate"):
        result["val"] = trainer.validate(0)
    timed = spec.get("timed", 0)
    if timed:
        batches = [batch(trainer.step + i) for i in range(timed)]
        D.barrier(trainer.dist)
        start = time.perf_counter()
        for b in batches:
            trainer.train_step(b)
        trainer.read_metrics()
        result["steps_per_s"] = timed / (time.perf_counter() - start)
        import resource

        result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["params"] = full_params()
    result["master_dtypes"] = {str(D.local_tensor(p).dtype) for p in trainer.main_params}
    result["rl"] = torch.cat([p.detach().flatten() for p in trainer.models.rl_parameters()])
    result["baseline"] = policy.baseline.clone()
    result["cache"] = trainer.cache.stats.to_dict()
    result["qwen_ran"] = [m["qwen_ran"] for m in losses]
    result["memory"] = D.rank_memory(trainer.models, [trainer.optimizer, trainer.rl_optimizer])
    result["sharded"] = [D.is_sharded(p) for p in trainer.main_params]
    torch.save(result, f"{spec['result']}.{rank}")
    trainer.close()
    print("DONE", flush=True)
    if trainer.dist.enabled:
        D.exit_without_teardown()


def full_qwen_copies(trainer: Any) -> list[tuple[int, ...]]:
    """Shapes of plain tensors alive in this process that are as large as a whole Qwen
    parameter of the same shape: after sharding setup there must be none (a sharded
    parameter reports its full shape but is a DTensor; FSDP's unsharded buffers are freed to
    an empty storage between uses)."""
    import torch

    from qwenrl.train import distributed as D

    if not trainer.cfg.fsdp:
        return []
    full = {tuple(p.shape): p.numel() * p.element_size() for p in trainer.qwen_params}
    # A shard of one parameter can have another one's full shape: skip the shards' storage.
    shards = {
        D.local_tensor(p).untyped_storage().data_ptr()
        for p in trainer.models.parameters()
        if D.is_sharded(p)
    }
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not D.is_sharded(obj):
            shape, storage = tuple(obj.shape), obj.untyped_storage()
            if shape in full and storage.nbytes() >= full[shape]:
                if storage.data_ptr() not in shards:
                    found.append(shape)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, argv: list[str], timeout: float) -> None:
    """Runs ``argv`` as ``world`` processes under torchrun's environment (gloo on the loopback,
    a free port) and waits for each to print ``DONE``; a rank that fails names itself and its
    stderr, and the others are killed rather than left waiting."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        env.setdefault("OMP_NUM_THREADS", "1")
        procs.append(
            subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    try:
        for rank, p in enumerate(procs):
            out, err = p.communicate(timeout=timeout)
            # A gloo process can abort in its C++ teardown after all its work is done
            # (SIGABRT, pytorch/pytorch#179291); that is not a training result.
            finished = "DONE" in out and p.returncode in (0, -6)
            assert finished, f"rank {rank}/{world} exited {p.returncode}:\n{err[-3000:]}"
    finally:
        for p in procs:  # one failed rank must not leave the others waiting forever
            p.kill()
            p.wait()


def launch(world: int, spec: dict[str, Any], tmp: Path, timeout: float = 240) -> list[dict]:
    """Runs ``world`` worker processes on ``spec`` (:func:`run_ranks`); returns each rank's
    result."""
    import torch

    tmp.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "result": str(tmp / f"result-{world}")}
    spec_file = tmp / f"spec-{world}.json"
    spec_file.write_text(json.dumps(spec))
    run_ranks(world, [sys.executable, str(WORKER), str(spec_file)], timeout)
    return [torch.load(f"{spec['result']}.{r}", weights_only=False) for r in range(world)]


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))
