"""The trainer: step order, Qwen gradients, logs, red flags, checkpoints, resume, CLI, DDP."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_worker import run_ranks
from tiny_run import tiny_config, write_arc_tasks

import qwenrl
from qwenrl.eval.val_grids import check_val_grids
from qwenrl.train import (
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    latest_checkpoint,
    lr_factor,
    parse_args,
    tau_for_epoch,
)
from qwenrl.train import checkpoint as checkpoint_mod

SEED_LOG_LINE = re.compile(
    r"^\[Batch +\d+\] Reward: +-?\d+\.\d{4} \| Loss: +-?\d+\.\d{4} \| "
    r"Qwen_grad: \d\.\d{2}e[+-]\d{2} \| Mask_ratio: \d\.\d{4}$"
)


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
    # No prompt dropout: with two samples a batch, it can zero the one prompt Qwen encoded,
    # and then no gradient reaches Qwen on that step.
    trainer = Trainer(tiny_config(tmp_path / "run", arc_dir, prompt_dropout=0.0), quiet=True)
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
        skipped = trainer.train_step(trainer.batch_at(1))
        assert skipped.get("skipped") and isinstance(skipped["qwen_ran"], bool)
        assert trainer.train_step(trainer.batch_at(2)).get("skipped")
        with pytest.raises(NonFiniteLossError, match=r"saved in .*, or try --amp off\.$"):
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
    write_arc_tasks(root, 3, seed=0)
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
rl = torch.cat([p.detach().flatten() for p in trainer.models.rl_parameters()])
out = {"losses": losses, "params": params, "rl": rl, "baseline": policy.baseline.clone()}
torch.save(out, sys.argv[2] + f".{rank}")
trainer.close()
print("DONE", flush=True)
"""


def _launch(world: int, cfg: TrainConfig, result: Path) -> None:
    argv = [sys.executable, "-c", DDP_WORKER, json.dumps(cfg.__dict__), str(result)]
    run_ranks(world, argv, timeout=300)


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tmp_path, arc_dir):
    """Two ranks on half batches = one process on the combined batch (gradients averaged).

    Random draws are taken out of the comparison (each rank draws its own numbers): the RL head
    is frozen (rl_lr=0) with greedy actions, and prompt dropout is off.
    """
    opts = dict(refresh_every=3, rl_lr=0.0, prompt_dropout=0.0)
    _launch(1, tiny_config(tmp_path / "one", arc_dir, batch_size=4, **opts), tmp_path / "one.pt")
    _launch(2, tiny_config(tmp_path / "two", arc_dir, batch_size=2, **opts), tmp_path / "two.pt")
    one, two = torch.load(tmp_path / "one.pt.0"), torch.load(tmp_path / "two.pt.0")
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-5)
    torch.testing.assert_close(two["params"], one["params"], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_ddp_ranks_keep_one_rl_head(tmp_path, arc_dir):
    """With the RL head training, each rank sees other data, yet both hold the same head: its
    gradients (and the baseline's mean reward) are averaged over the ranks."""
    opts = dict(refresh_every=3, rl_lr=1e-2, prompt_dropout=0.0)
    _launch(2, tiny_config(tmp_path / "two", arc_dir, batch_size=2, **opts), tmp_path / "two.pt")
    a, b = torch.load(tmp_path / "two.pt.0"), torch.load(tmp_path / "two.pt.1")
    torch.testing.assert_close(a["rl"], b["rl"], rtol=0, atol=0)
    torch.testing.assert_close(a["baseline"], b["baseline"], rtol=0, atol=0)


def test_bf16_autocast_step(tmp_path, arc_dir):
    trainer = Trainer(tiny_config(tmp_path / "run", arc_dir, amp="bf16"), quiet=True)
    for step in range(2):
        metrics = trainer.train_step(trainer.batch_at(step))
        assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert trainer.qwen_params[0].dtype == torch.float32  # master weights stay fp32
    trainer.close()


# --- resume keeps everything -------------------------------------------------------------


def _state(trainer: Trainer) -> dict:
    """What must match between an uninterrupted run and a resumed one."""
    trainer.read_metrics()
    return {
        "weights": {k: v.clone() for k, v in trainer.models.state_dict().items()},
        "rl_optimizer": trainer.rl_optimizer.state_dict()["state"],
        "flags": trainer.flags.state_dict(),
        "cache": trainer.cache.stats.to_dict(),
        "lr": (trainer.lr("qwen"), trainer.lr("agent")),
    }


def test_resume_mid_cache_window_restores_every_part(tmp_path, arc_dir):
    """Saved at step 4, inside the cache window [3, 6): the resumed run reads step 3's
    embeddings from the restored cache, samples actions from the restored RNG, steps the
    restored RL optimizer and keeps the red-flag history."""
    cfg = dict(refresh_every=3, rl_lr=1e-2)
    straight = Trainer(tiny_config(tmp_path / "a", arc_dir, **cfg), quiet=True)
    metrics_a = [straight.train_step(straight.batch_at(s)) for s in range(7)]
    losses_a = [m["loss"] for m in metrics_a]
    end_a = _state(straight)
    straight.close()

    first = Trainer(tiny_config(tmp_path / "b", arc_dir, **cfg), quiet=True)
    for s in range(4):
        first.train_step(first.batch_at(s))
    path = first.save_checkpoint()
    first.close()
    resumed = Trainer(tiny_config(tmp_path / "b", arc_dir, resume=str(path), **cfg), quiet=True)
    metrics = [resumed.train_step(resumed.batch_at(s)) for s in range(4, 7)]
    assert [m["qwen_ran"] for m in metrics] == [m["qwen_ran"] for m in metrics_a[4:]]
    losses_b = [m["loss"] for m in metrics]
    end_b = _state(resumed)
    resumed.close()
    assert losses_b == pytest.approx(losses_a[4:], rel=1e-5, abs=1e-6)
    for k, v in end_a["weights"].items():
        torch.testing.assert_close(end_b["weights"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    for i, st in end_a["rl_optimizer"].items():
        torch.testing.assert_close(end_b["rl_optimizer"][i]["exp_avg_sq"], st["exp_avg_sq"])
    assert end_b["flags"]["losses"] == pytest.approx(end_a["flags"]["losses"], rel=1e-5)
    assert {k: v for k, v in end_b["flags"].items() if k != "losses"} == {
        k: v for k, v in end_a["flags"].items() if k != "losses"
    }
    assert end_b["cache"] == end_a["cache"]
    assert end_b["lr"] == pytest.approx(end_a["lr"])


def test_resume_restores_the_grad_scaler(tmp_path, arc_dir, monkeypatch):
    """An fp16 run's GradScaler (scale, growth tracker) comes back from the checkpoint. fp16
    needs CUDA, so the CPU trainer gets an enabled scaler here, with a short growth interval
    so that its state moves within a few steps."""
    import qwenrl.train.trainer as trainer_mod

    real = torch.amp.GradScaler

    def enabled_scaler(device, enabled=True):
        return real(device, enabled=True, init_scale=2.0**10, growth_interval=2)

    monkeypatch.setattr(trainer_mod.torch.amp, "GradScaler", enabled_scaler)
    first = Trainer(tiny_config(tmp_path / "run", arc_dir), quiet=True)
    for s in range(5):
        first.train_step(first.batch_at(s))
    saved = first.scaler.state_dict()
    assert saved["scale"] != 2.0**10 and saved["_growth_tracker"] == 1  # it moved: 5 = 2·2 + 1
    path = first.save_checkpoint()
    first.close()
    resumed = Trainer(tiny_config(tmp_path / "run", arc_dir, resume=str(path)), quiet=True)
    assert resumed.scaler.state_dict() == saved
    resumed.close()


def test_resume_with_max_batches_draws_the_uninterrupted_batches(tmp_path, arc_dir):
    """With --max_batches capping each epoch, the sampler positions a resumed train() draws
    after the checkpoint (mid-epoch 1) are the uninterrupted run's, in order; each epoch
    starts a new pass of the sampler (the rest of the capped pass is skipped)."""
    drawn: dict[str, list] = {"a": [], "b": []}

    def spy(trainer: Trainer, name: str) -> None:
        real = trainer.sampler.batch
        trainer.sampler.batch = lambda i: drawn[name].append(i) or real(i)

    cfg = dict(epochs=2, max_batches=3, save_every=4, val_tasks=1)
    straight = Trainer(tiny_config(tmp_path / "a", arc_dir, **cfg), quiet=True)
    spy(straight, "a")
    straight.train()
    straight.close()
    cut = Trainer(tiny_config(tmp_path / "b", arc_dir, **cfg), quiet=True)
    for s in range(4):
        cut.train_step(cut.batch_at(s))
    cut.save_checkpoint()
    cut.close()
    resumed = Trainer(tiny_config(tmp_path / "b", arc_dir, resume="auto", **cfg), quiet=True)
    assert resumed.step == 4 and resumed.steps_per_epoch == 3
    spy(resumed, "b")
    resumed.train()
    resumed.close()
    per_pass = resumed.sampler.steps_per_epoch
    assert per_pass > 3  # the cap is real
    assert drawn["a"] == [0, 1, 2, per_pass, per_pass + 1, per_pass + 2]
    assert drawn["b"] == drawn["a"][4:]


def test_resumed_training_loop_logs_what_the_uninterrupted_one_logs(tmp_path, arc_dir, monkeypatch):
    """Through train(): resuming in epoch 1 (τ = 0.3) gives the same log records and
    validation as the run that never stopped, and the epoch's progress bar starts where the
    run stopped."""
    from qwenrl.train import trainer as trainer_mod

    straight = Trainer(tiny_config(tmp_path / "a", arc_dir, save_every=3), quiet=True)
    summary_a = straight.train()
    straight.close()
    cut = Trainer(tiny_config(tmp_path / "b", arc_dir, save_every=3, epochs=2), quiet=True)
    for s in range(6):
        cut.train_step(cut.batch_at(s))
        if s == 3:
            cut.criterion.tau = cut.tau_at(1)  # what train() sets at the epoch boundary
    cut.save_checkpoint()
    cut.close()
    resumed = Trainer(tiny_config(tmp_path / "b", arc_dir, resume="auto"), quiet=True)
    assert resumed.step == 6 and resumed.criterion.tau == 0.3
    bars = []
    real_tqdm = trainer_mod.tqdm
    monkeypatch.setattr(
        trainer_mod, "tqdm", lambda *args, **kwargs: bars.append(kwargs) or real_tqdm(**kwargs)
    )
    summary_b = resumed.train()
    resumed.close()
    assert [(b["initial"], b["total"]) for b in bars] == [(6 % 4, 4)]  # 2 of epoch 1's 4 steps

    def records(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        out = [json.loads(line) for line in lines]
        return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in out if r["step"] >= 6]

    a, b = records("a"), records("b")
    assert [r["step"] for r in b] == [r["step"] for r in a] and len(a) >= 3
    for ra, rb in zip(a, b):
        assert rb == _approx_numbers(ra)
    assert summary_b == _approx_numbers(summary_a)


def _approx_numbers(expected):
    """``expected`` with every number compared by ``pytest.approx`` and everything else (names,
    flags) by equality, nested dicts and lists included: pytest >= 9.2 refuses a relative
    tolerance on a mapping that holds strings."""
    if isinstance(expected, dict):
        return {k: _approx_numbers(v) for k, v in expected.items()}
    if isinstance(expected, (list, tuple)):
        return type(expected)(_approx_numbers(v) for v in expected)
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return pytest.approx(expected, rel=1e-5, abs=1e-6)
    return expected


# --- wiring: each option reaches what it sets ---------------------------------------------


def test_learning_rates_reach_their_groups(tmp_path, arc_dir):
    cfg = tiny_config(tmp_path / "run", arc_dir, agent_lr=3e-3, qwen_lr=7e-5, warmup_steps=4)
    trainer = Trainer(cfg, quiet=True)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    qwen_ids = {id(p) for p in trainer.models.encoder.qwen.parameters()}
    assert {id(p) for p in groups["qwen"]["params"]} == qwen_ids
    assert not qwen_ids & {id(p) for p in groups["agent"]["params"]}
    assert trainer.lr("qwen") == pytest.approx(7e-5 * lr_factor(0, 4, trainer.total_steps))
    assert trainer.lr("agent") == pytest.approx(3e-3 * lr_factor(0, 4, trainer.total_steps))
    assert trainer.rl_optimizer.param_groups[0]["lr"] == cfg.rl_lr
    for s in range(3):
        trainer.train_step(trainer.batch_at(s))
    assert trainer.lr("qwen") == pytest.approx(7e-5 * lr_factor(3, 4, trainer.total_steps))
    trainer.close()


def test_loss_flags_reach_the_criterion(tmp_path, arc_dir):
    argv = ["--easy_weight", "0.9", "--entropy_weight", "0.2", "--loss_backend", "reference"]
    argv += ["--tau_start", "0.45"]
    parsed = parse_args(argv)
    cfg = tiny_config(tmp_path / "run", arc_dir)
    for k in ("easy_weight", "entropy_weight", "loss_backend", "tau_start"):
        setattr(cfg, k, getattr(parsed, k))
    trainer = Trainer(cfg, quiet=True)
    logits, target = torch.randn(2, 900, 12), torch.randint(0, 12, (2, 900))
    expected = qwenrl.efe_loss(
        logits, target, tau=0.45, easy_weight=0.9, entropy_weight=0.2, backend="reference"
    )
    torch.testing.assert_close(trainer.criterion(logits, target), expected)
    assert trainer.criterion.tau == 0.45
    trainer.close()


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_qwen_grad_is_read_before_clipping_and_clipping_applies(tmp_path, arc_dir, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path / "run", arc_dir, grad_clip=1e-6), quiet=True)
    norms = []
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):  # the gradient the optimizer sees
        grads = [p.grad.norm() for p in trainer.main_params if p.grad is not None]
        norms.append(float(torch.stack(grads).norm()))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", step)
    metrics = trainer.train_step(trainer.batch_at(0))
    assert metrics["qwen_ran"] and metrics["qwen_grad"] > 1e-4  # the unclipped norm
    assert norms[0] <= 1e-6 * 1.01
    trainer.close()


def test_validation_restores_train_mode(tmp_path, arc_dir):
    trainer = Trainer(tiny_config(tmp_path / "run", arc_dir), quiet=True)
    trainer.step = 7
    summary = trainer.validate(1)
    assert all(m.training for m in trainer.models.modules())
    assert summary["samples"] == len(trainer.val_set)
    grids = json.loads((tmp_path / "run" / "val_grids.json").read_text())
    assert (grids["step"], grids["epoch"], grids["tau"]) == (7, 1, trainer.criterion.tau)
    assert len(check_val_grids(grids)) == len(trainer.val_set)  # tiny set: all in one batch
    trainer.close()


def test_metrics_are_read_once_per_log_step(tmp_path, arc_dir):
    trainer = Trainer(tiny_config(tmp_path / "run", arc_dir, log_every=3), quiet=True)
    metrics = [trainer.train_step(trainer.batch_at(s)) for s in range(5)]
    # step 0 and step 3 are log steps: everything up to them is read, step 4 is pending
    assert [m._read is not None for m in metrics] == [True, True, True, True, False]
    assert len(trainer.flags.losses) == 4  # the red flags saw every read step, in order
    assert trainer.flags.losses[-1] == metrics[3]["loss"]
    trainer.close()


def test_run_writes_its_config_and_the_file_reproduces_it(tmp_path, arc_dir):
    cfg = tiny_config(tmp_path / "run", arc_dir, agent_lr=1e-3)
    Trainer(cfg, quiet=True).close()
    saved = tmp_path / "run" / "config.yaml"
    assert parse_args(["--config", str(saved)]) == cfg


@pytest.mark.parametrize(
    ("step", "factor"), [(0, 0.25), (3, 1.0), (4, 1.0), (54, 0.55), (104, 0.1), (500, 0.1)]
)
def test_lr_schedule_warmup_cosine_and_floor(step, factor):
    assert lr_factor(step, warmup=4, total=104) == pytest.approx(factor)


def test_lr_schedule_decays_monotonically():
    values = [lr_factor(s, warmup=5, total=60) for s in range(5, 70)]
    assert all(a >= b for a, b in zip(values, values[1:])) and values[-1] == pytest.approx(0.1)


def test_tau_curriculum_switches_at_tau_epoch():
    assert [tau_for_epoch(e, 0.6, 0.3, 2) for e in range(4)] == [0.6, 0.6, 0.3, 0.3]


def test_under_ddp_rl_gradients_go_through_the_cross_rank_mean(tmp_path, arc_dir, monkeypatch):
    """In-process view of the rule the DDP tests check end to end: with more than one rank,
    train_step averages the step metrics and every RL-head gradient over the ranks."""
    from qwenrl.train import trainer as trainer_mod
    from qwenrl.train.distributed import DistInfo

    trainer = Trainer(tiny_config(tmp_path / "run", arc_dir), quiet=True)
    averaged: list[torch.Tensor] = []
    monkeypatch.setattr(trainer, "dist", DistInfo(rank=0, world_size=2))
    monkeypatch.setattr(trainer_mod.D, "agree_any", lambda flag, info, device: flag)
    monkeypatch.setattr(trainer_mod.D, "all_reduce_mean", lambda t, info: averaged.append(t) or t)
    trainer.train_step(trainer.batch_at(0))
    rl_grads = [p.grad for p in trainer.models.rl_parameters()]
    assert rl_grads and all(any(g is t for t in averaged) for g in rl_grads)
    assert any(t.shape == (len(trainer_mod.METRIC_NAMES),) for t in averaged)  # the metrics
    # Validation: each rank scores its shard, the totals are summed over the ranks.
    monkeypatch.setattr(trainer_mod.torch.distributed, "all_reduce", lambda t: t.mul_(2))
    summary = trainer.validate(0)
    assert summary["samples"] == 2 * len(trainer.dist.shard(len(trainer.val_set)))
    trainer.close()


# --- main(): exit statuses ------------------------------------------------------------------


def _tiny_argv(out: Path, data: Path) -> list[str]:
    argv = ["--data", str(data), "--out", str(out), "--epochs", "1", "--max_batches", "2"]
    argv += ["--batch_size", "2", "--working_set", "4", "--refresh_every", "3", "--dim", "32"]
    return argv + ["--agent_layers", "1", "--qwen_max_length", "128", "--val_tasks", "2"]


def test_main_trains_and_prints_the_validation_summary(tmp_path, arc_dir, capsys):
    from qwenrl.train import main

    assert main(_tiny_argv(tmp_path / "run", arc_dir)) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary["epoch"] == 0 and summary["samples"] == 2 and "kind" not in summary
    assert latest_checkpoint(tmp_path / "run").name == f"checkpoint-{2:08d}"


def test_main_exit_statuses(tmp_path, arc_dir, capsys, monkeypatch):
    from qwenrl.train import cli

    bad = tmp_path / "bad"
    write_arc_tasks(bad, 3, seed=0)
    (bad / "task001.json").write_text("{not json")
    assert cli.main(_tiny_argv(tmp_path / "o1", bad)) == 2
    assert "task001.json" in capsys.readouterr().err

    def interrupted(self):
        self.train_step(self.batch_at(0))
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.Trainer, "train", interrupted)
    assert cli.main(_tiny_argv(tmp_path / "o2", arc_dir)) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and latest_checkpoint(tmp_path / "o2").name == f"checkpoint-{1:08d}"

    def diverged(self):
        raise NonFiniteLossError("5 non-finite losses in a row")

    monkeypatch.setattr(cli.Trainer, "train", diverged)
    assert cli.main(_tiny_argv(tmp_path / "o3", arc_dir)) == 1
    assert "error: 5 non-finite losses" in capsys.readouterr().err


def test_checkpoint_cadence_and_saved_config(tmp_path, arc_dir):
    """--save_every 3 over two epochs of 4 steps: every third step, and each epoch's end."""
    cfg = tiny_config(tmp_path / "run", arc_dir, save_every=3, keep_checkpoints=10)
    trainer = Trainer(cfg, quiet=True)
    trainer.train()
    trainer.close()
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run").glob("checkpoint-*"))
    assert saved == [3, 4, 6, 8]
    state = torch.load(latest_checkpoint(tmp_path / "run") / "state.pt", weights_only=True)
    assert state["config"] == cfg.to_dict() and state["step"] == 8


def test_logged_speed_is_steps_per_second(tmp_path, arc_dir, monkeypatch):
    from qwenrl.train import trainer as trainer_mod

    cfg = tiny_config(tmp_path / "run", arc_dir, epochs=1, log_every=2)
    trainer = Trainer(cfg, quiet=True)
    # A clock that advances one second per optimizer step: the logged speed is 1 step/s.
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: 10.0 + trainer.step)
    trainer.train()
    trainer.close()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    speeds = [r["steps_per_s"] for r in records if r["kind"] == "train"]
    assert speeds == [1.0, 1.0]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_grad_clip_zero_means_no_clipping(tmp_path, arc_dir, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path / "run", arc_dir, grad_clip=0.0), quiet=True)
    norms = []
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):
        grads = [p.grad.norm() for p in trainer.main_params if p.grad is not None]
        norms.append(float(torch.stack(grads).norm()))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", step)
    trainer.train_step(trainer.batch_at(0))
    assert norms[0] > 1e-3
    trainer.close()


def test_setup_details(tmp_path, arc_dir, capsys):
    """Quiet means silent; a nested run dir is created; Python's RNG is seeded; the cache
    holds four working sets; config.yaml keeps the fields' order."""
    import random

    cfg = tiny_config(tmp_path / "a" / "b" / "run", arc_dir, seed=3)
    trainer = Trainer(cfg, quiet=True)
    first = random.random()
    assert trainer.cache.capacity == 4 * cfg.working_set
    trainer.train()
    trainer.close()
    assert capsys.readouterr().out == ""
    assert (tmp_path / "a" / "b" / "run" / "config.yaml").read_text().startswith("epochs: 2\n")
    Trainer(tiny_config(tmp_path / "c", arc_dir, seed=3), quiet=True).close()
    assert random.random() == first
    default_ws = Trainer(tiny_config(tmp_path / "d", arc_dir, working_set=0), quiet=True)
    assert default_ws.cache.capacity == 4 * 4 * default_ws.cfg.batch_size
    default_ws.close()


@pytest.mark.parametrize(("epochs", "val_every", "validated"), [(3, 2, [1, 2]), (4, 3, [2, 3])])
def test_val_every_skips_validations_but_never_the_last(
    tmp_path, arc_dir, epochs, val_every, validated
):
    """Epochs are counted from 0: validation after epochs val_every - 1, 2·val_every - 1, ...
    and after the last one."""
    cfg = tiny_config(tmp_path / "run", arc_dir, epochs=epochs, max_batches=1, val_every=val_every)
    trainer = Trainer(cfg, quiet=True)
    summary = trainer.train()
    trainer.close()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records if r["kind"] == "val"] == validated
    assert summary["epoch"] == epochs - 1
    last = f"checkpoint-{epochs:08d}"
    assert latest_checkpoint(tmp_path / "run").name == last  # every epoch saves
