"""The trainer: step order, Qwen gradients, logs, red flags, checkpoints, resume, CLI, DDP."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qwenrl.train import (
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    latest_checkpoint,
    parse_args,
)
from qwenrl.train import checkpoint as checkpoint_mod

SEED_LOG_LINE = re.compile(
    r"^\[Batch +\d+\] Reward: +-?\d+\.\d{4} \| Loss: +-?\d+\.\d{4} \| "
    r"Qwen_grad: \d\.\d{2}e[+-]\d{2} \| Mask_ratio: \d\.\d{4}$"
)


def _write_tasks(root: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = rng.integers(2, 6, size=2)

        def pair(h=h, w=w):
            grid = rng.integers(0, 10, size=(h, w))
            return {"input": grid.tolist(), "output": np.fliplr(grid).tolist()}

        task = {"train": [pair(), pair(), pair()], "test": [pair()]}
        (root / f"task{i:03d}.json").write_text(json.dumps(task))


@pytest.fixture(scope="module")
def arc_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("arc")
    _write_tasks(root / "training", 12, seed=1)
    _write_tasks(root / "evaluation", 3, seed=2)
    return root


def tiny_config(out: Path, data: Path, **overrides) -> TrainConfig:
    cfg = TrainConfig(
        epochs=2,
        max_batches=4,
        batch_size=2,
        working_set=4,
        refresh_every=3,
        dim=32,
        agent_layers=1,
        qwen_max_length=128,
        val_tasks=2,
        val_batch_size=4,
        log_every=1,
        data=str(data),
        out=str(out),
        seed=0,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def install_trace(trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the phases of a step through wrappers the test installs (nothing in the
    trainer's hot path): qwen, loss, backward, unscale, qwen_grad, clip, scaler.step,
    scaler.update, rl_update."""
    from qwenrl.train import trainer as trainer_mod

    trace: list[str] = []

    def wrap(obj, name, label):
        real = getattr(obj, name)

        def recorded(*args, **kwargs):
            trace.append(label)
            return real(*args, **kwargs)

        monkeypatch.setattr(obj, name, recorded)

    wrap(trainer.models.encoder, "forward", "qwen")
    wrap(trainer.criterion, "forward", "loss")
    wrap(trainer.scaler, "unscale_", "unscale")
    wrap(trainer_mod, "grad_norm", "qwen_grad")
    wrap(trainer_mod.nn.utils, "clip_grad_norm_", "clip")
    wrap(trainer.scaler, "step", "scaler.step")
    wrap(trainer.scaler, "update", "scaler.update")
    wrap(trainer.models.policy, "update", "rl_update")
    real_scale = trainer.scaler.scale

    def scale(loss):
        scaled = real_scale(loss)
        scaled.register_hook(lambda g: trace.append("backward"))  # backward reached the loss
        return scaled

    monkeypatch.setattr(trainer.scaler, "scale", scale)
    return trace


def test_step_order_and_qwen_gradients(tmp_path, arc_dir, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path / "run", arc_dir), quiet=True)
    trace = install_trace(trainer, monkeypatch)
    qwen_steps, cached_steps = 0, 0
    for step in range(6):
        trace.clear()
        metrics = trainer.train_step(trainer.batch_at(step))
        # The RL update strictly after scaler.step, which is after backward; the Qwen grad
        # norm read after unscaling and before clipping.
        after_forward = ["loss", "backward", "unscale", "qwen_grad", "clip", "scaler.step"]
        after_forward += ["scaler.update", "rl_update"]
        if metrics["qwen_ran"]:
            qwen_steps += 1
            assert trace == ["qwen", *after_forward], trace
            assert metrics["qwen_grad"] > 0  # gradients reach Qwen
        else:
            cached_steps += 1
            assert trace == after_forward, trace
            assert metrics["qwen_grad"] == 0.0  # Qwen did not run: cached embeddings
    assert qwen_steps >= 2 and cached_steps >= 1
    trainer.close()


def test_qwen_parameters_receive_gradients_on_recompute(tmp_path, arc_dir):
    trainer = Trainer(tiny_config(tmp_path / "run", arc_dir), quiet=True)
    seen = {"hook": False}
    layer = trainer.models.encoder.qwen.layers[0]
    layer.register_full_backward_hook(lambda *_: seen.__setitem__("hook", True))
    before = [p.detach().clone() for p in trainer.qwen_params]
    metrics = trainer.train_step(trainer.batch_at(0))
    assert metrics["qwen_ran"] and seen["hook"]
    changed = [not torch.equal(a, p.detach()) for a, p in zip(before, trainer.qwen_params)]
    assert all(changed), "every Qwen parameter must be updated on a recompute step"
    trainer.close()


def test_curriculum_and_full_run_outputs(tmp_path, arc_dir, capsys):
    cfg = tiny_config(tmp_path / "run", arc_dir)
    trainer = Trainer(cfg)
    summary = trainer.train()
    trainer.close()
    out = capsys.readouterr().out
    log_lines = [line for line in out.splitlines() if line.startswith("[Batch")]
    assert len(log_lines) == cfg.epochs * cfg.max_batches
    for line in log_lines:
        assert SEED_LOG_LINE.match(line), line
    assert "validation: cell accuracy" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train_records = [r for r in records if r["kind"] == "train"]
    keys = {"step", "epoch", "loss", "reward", "qwen_grad", "mask_ratio", "tau", "lr"}
    keys |= {"cache_hit_rate", "steps_per_s"}
    assert all(keys <= set(r) for r in train_records)
    taus = {r["epoch"]: r["tau"] for r in train_records}
    assert taus == {0: 0.6, 1: 0.3}  # the curriculum
    assert sum(r["kind"] == "val" for r in records) == cfg.epochs
    assert 0.0 <= summary["cell_accuracy"] <= 1.0
    assert latest_checkpoint(tmp_path / "run").name == f"checkpoint-{8:08d}"


def test_resume_gives_the_same_losses(tmp_path, arc_dir):
    straight = Trainer(tiny_config(tmp_path / "a", arc_dir), quiet=True)
    losses_a = [straight.train_step(straight.batch_at(s))["loss"] for s in range(6)]
    straight.close()

    first = Trainer(tiny_config(tmp_path / "b", arc_dir), quiet=True)
    for s in range(3):
        first.train_step(first.batch_at(s))
    path = first.save_checkpoint()
    first.close()
    resumed = Trainer(tiny_config(tmp_path / "b", arc_dir, resume=str(path)), quiet=True)
    assert resumed.step == 3
    losses_b = [resumed.train_step(resumed.batch_at(s))["loss"] for s in range(3, 6)]
    resumed.close()
    assert losses_b == pytest.approx(losses_a[3:], rel=1e-5, abs=1e-6)


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, arc_dir, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path / "run", arc_dir), quiet=True)
    trainer.train_step(trainer.batch_at(0))
    good = trainer.save_checkpoint()
    trainer.train_step(trainer.batch_at(1))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process died while writing state.pt

    monkeypatch.setattr(checkpoint_mod.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.undo()
    trainer.close()
    assert latest_checkpoint(tmp_path / "run") == good
    assert list((tmp_path / "run").glob(".tmp-checkpoint-*"))  # the torn write, ignored
    resumed = Trainer(tiny_config(tmp_path / "run", arc_dir, resume="auto"), quiet=True)
    assert resumed.step == 1
    resumed.close()


SIGKILL_WORKER = r"""
import json, sys, time
from qwenrl.train import Trainer, TrainConfig, checkpoint as T
trainer = Trainer(TrainConfig(**json.loads(sys.argv[1])), quiet=True)
trainer.train_step(trainer.batch_at(0))
trainer.save_checkpoint()
trainer.train_step(trainer.batch_at(1))
real_save = T.torch.save
def save_then_hang(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    print("MID-SAVE", flush=True)  # weights and state written, not yet renamed into place
    time.sleep(600)
T.torch.save = save_then_hang
trainer.save_checkpoint()
"""


def test_sigkill_mid_save_resumes_from_the_last_complete_checkpoint(tmp_path, arc_dir):
    import os
    import signal

    cfg = tiny_config(tmp_path / "run", arc_dir)
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGKILL_WORKER, json.dumps(cfg.__dict__)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "MID-SAVE"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert latest_checkpoint(tmp_path / "run").name == f"checkpoint-{1:08d}"
    assert list((tmp_path / "run").glob(".tmp-checkpoint-*"))
    resumed = Trainer(tiny_config(tmp_path / "run", arc_dir, resume="auto"), quiet=True)
    assert resumed.step == 1
    resumed.close()


def test_nonfinite_loss_is_skipped_then_stops_with_a_checkpoint(tmp_path, arc_dir, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path / "run", arc_dir, max_nonfinite=3), quiet=True)
    trainer.train_step(trainer.batch_at(0))
    params = [p.detach().clone() for p in trainer.main_params]
    real = trainer.criterion.forward
    monkeypatch.setattr(trainer.criterion, "forward", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        assert trainer.train_step(trainer.batch_at(1)).get("skipped")
        assert trainer.train_step(trainer.batch_at(2)).get("skipped")
        with pytest.raises(NonFiniteLossError, match="saved"):
            trainer.train_step(trainer.batch_at(3))
    assert all(torch.equal(a, p.detach()) for a, p in zip(params, trainer.main_params))
    assert latest_checkpoint(tmp_path / "run") is not None
    trainer.close()


def test_frozen_qwen_raises_the_red_flag(tmp_path, arc_dir):
    trainer = Trainer(tiny_config(tmp_path / "run", arc_dir, refresh_every=0), quiet=True)
    trainer.flags.qwen_window = 3
    for p in trainer.models.encoder.qwen.parameters():
        p.requires_grad_(False)  # Qwen gets no gradient
    with pytest.warns(RuntimeWarning, match="Qwen_grad has been 0"):
        for step in range(3):
            metrics = trainer.train_step(trainer.batch_at(step))
            assert metrics["qwen_ran"] and metrics["qwen_grad"] == 0.0
    trainer.close()


def test_cli_help_lists_every_flag():
    proc = subprocess.run(
        [sys.executable, "-m", "qwenrl.train", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    for flag in ("--epochs", "--agent_lr", "--qwen_lr", "--device", "--max_batches"):
        assert flag in proc.stdout
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name}" in proc.stdout


def test_cli_parses_the_seed_command():
    cfg = parse_args(
        "--epochs 10 --agent_lr 1e-5 --qwen_lr 5e-5 --device cpu --max_batches 500".split()
    )
    assert (cfg.epochs, cfg.agent_lr, cfg.qwen_lr, cfg.max_batches) == (10, 1e-5, 5e-5, 500)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "/nonexistent/arc"], "no such directory"),
        (["--qwen", "/nonexistent/qwen"], "local Qwen checkpoint"),
        (["--amp", "fp16", "--device", "cpu"], "fp16"),
        (["--refresh_every", "-5"], "refresh_every"),
    ],
)
def test_cli_rejects_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_data_directory_names_the_file(tmp_path):
    root = tmp_path / "bad"
    _write_tasks(root, 3, seed=0)
    (root / "task001.json").write_text("{not json")
    proc = subprocess.run(
        [sys.executable, "-m", "qwenrl.train", "--data", str(root), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "task001.json" in proc.stderr


# --- DistributedDataParallel on two gloo processes ----------------------------------------

DDP_WORKER = r"""
import json, sys, torch
from qwenrl.data import WorkingSetSampler, collate
from qwenrl.train import Trainer, TrainConfig
cfg = TrainConfig(**json.loads(sys.argv[1]))
trainer = Trainer(cfg, quiet=True)
rank, world = trainer.dist.rank, trainer.dist.world_size
policy = trainer.models.policy
act = policy.act
policy.act = lambda refined, greedy=False: act(refined, greedy=True)  # same actions in both runs
# The two ranks' samplers (disjoint prompts, so each rank's cache sees its own keys); the
# single process trains on the concatenation of both ranks' batches.
samplers = [
    WorkingSetSampler(trainer.train_set, 2, working_set=4, refresh_every=cfg.refresh_every,
                      rank=r, world_size=2)
    for r in range(2)
]
losses = []
for step in range(5):
    parts = [s.batch(step) for s in samplers]
    mine = parts[rank] if world > 1 else parts[0] + parts[1]
    losses.append(trainer.train_step(collate([trainer.train_set[j] for j in mine]))["loss"])
params = torch.cat([p.detach().flatten() for p in trainer.main_params])
if rank == 0:
    torch.save({"losses": losses, "params": params}, sys.argv[2])
trainer.close()
print("DONE", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, cfg: TrainConfig, result: Path) -> None:
    import os

    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        env["OMP_NUM_THREADS"] = "1"
        cfg_json = json.dumps(cfg.__dict__)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", DDP_WORKER, cfg_json, str(result)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        for rank, p in enumerate(procs):
            out, err = p.communicate(timeout=300)
            # A gloo process can abort in its C++ teardown at interpreter exit (SIGABRT) after
            # all its work and destroy_process_group are done; that is not a training result.
            finished = "DONE" in out and (p.returncode == 0 or p.returncode == -6)
            assert finished, f"rank {rank}/{world} exited {p.returncode}:\n{err[-3000:]}"
    finally:
        for p in procs:  # one failed rank must not leave the other waiting forever
            p.kill()
            p.wait()


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tmp_path, arc_dir):
    """Two ranks on half batches = one process on the combined batch (gradients averaged).

    Random draws are taken out of the comparison (each rank draws its own numbers): the RL head
    is frozen (rl_lr=0) with greedy actions, and prompt dropout is off.
    """
    opts = dict(refresh_every=3, rl_lr=0.0, prompt_dropout=0.0)
    _launch(1, tiny_config(tmp_path / "one", arc_dir, batch_size=4, **opts), tmp_path / "one.pt")
    _launch(2, tiny_config(tmp_path / "two", arc_dir, batch_size=2, **opts), tmp_path / "two.pt")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-5)
    torch.testing.assert_close(two["params"], one["params"], rtol=1e-3, atol=1e-5)


def test_bf16_autocast_step(tmp_path, arc_dir):
    trainer = Trainer(tiny_config(tmp_path / "run", arc_dir, amp="bf16"), quiet=True)
    for step in range(2):
        metrics = trainer.train_step(trainer.batch_at(step))
        assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert trainer.qwen_params[0].dtype == torch.float32  # master weights stay fp32
    trainer.close()
