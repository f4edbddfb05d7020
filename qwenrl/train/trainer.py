"""The :class:`Trainer`: setup phases → :meth:`~Trainer.train_step` → :meth:`~Trainer.train`
→ :meth:`~Trainer.close`.

The step order and the reasons for it are in docs/training.md; the package layout in
docs/trainer-layout.md.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from qwenrl.cache import CachePlan, EmbeddingCache
from qwenrl.data import Batch, WorkingSetSampler, build_datasets, cell_accuracy, collate
from qwenrl.eval.scoring import ValTotals
from qwenrl.eval.validation import log_validation, validation_totals
from qwenrl.loss import EFELoss
from qwenrl.models import QwenRLModels
from qwenrl.train import distributed as D
from qwenrl.train.checkpoint import Checkpointer, move_earlier_run, write_text_atomic
from qwenrl.train.config import TrainConfig, loss_options, model_config, ttt_config
from qwenrl.train.monitor import Monitor, RedFlags
from qwenrl.train.resume import TrainerCheckpoints
from qwenrl.train.step import (
    METRIC_NAMES,
    StepForward,
    StepMetrics,
    grad_norm,
    lr_factor,
    read_all,
    tau_for_epoch,
)

__all__ = ["NonFiniteLossError", "Trainer"]


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite`` consecutive non-finite losses (a checkpoint is saved)."""


class Trainer(TrainerCheckpoints):
    """Trains :class:`~qwenrl.models.QwenRLModels` on ARC tasks as ``cfg`` says.

    ``__init__`` runs the setup phases (runtime, data, models, optimizers, loss, output) and
    resumes when ``cfg.resume`` is set; :meth:`train` runs the remaining epochs; tests and
    benchmarks may call :meth:`train_step` on :meth:`batch_at` directly.
    """

    def __init__(self, cfg: TrainConfig, *, quiet: bool = False) -> None:
        self.cfg = cfg
        self.step = 0  # optimizer steps taken (global, all epochs; skipped steps included)
        self._setup_runtime()
        self._setup_data()
        self._setup_model()
        self._setup_optimizers()
        self._setup_loss()
        self._setup_output(quiet)
        if cfg.resume:
            path = self.checkpointer.latest() if cfg.resume == "auto" else Path(cfg.resume)
            if path is None:
                self.monitor.print(f"--resume: no checkpoint in {self.out}; starting fresh")
            else:
                self.load_checkpoint(path)

    # --- setup phases ----------------------------------------------------------------------

    def _setup_runtime(self) -> None:
        """Process group, device, threads, run directory, seeds."""
        cfg = self.cfg
        self.dist = D.init_distributed(cfg.device)
        if cfg.fsdp and not self.dist.enabled:
            raise ValueError(
                "--fsdp shards the models over the processes of torchrun: launch with "
                "torchrun --nproc_per_node=N (N >= 2), or drop --fsdp for one process"
            )
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        per_rank = cfg.device == "cuda" and self.dist.enabled
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if per_rank else cfg.device)
        if self.device.type == "cuda":
            if self.device.index is None:  # torch.cuda.set_device needs an index
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        self.out = Path(cfg.out)
        if not cfg.resume and self.dist.is_main:
            move_earlier_run(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

    def _setup_data(self) -> None:
        cfg = self.cfg
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
        self.total_steps = cfg.epochs * self.steps_per_epoch

    def _setup_model(self) -> None:
        """Models, the embedding cache (4 windows of prompts), the step's forward (DDP-wrapped
        under torchrun, or FSDP-sharded with --fsdp)."""
        cfg = self.cfg
        self.model_config = model_config(cfg)
        self.models = QwenRLModels(self.model_config).train()
        if not cfg.fsdp:  # FSDP moves one shard at a time (D.shard_models)
            self.models.to(self.device)
        # Each rank caches the embeddings of its own prompts (the sampler gives ranks disjoint
        # prompts); under FSDP too, since an embedding is [dim] whatever the sharding.
        capacity = max(4 * (cfg.working_set or 4 * cfg.batch_size), 2 * cfg.batch_size)
        self.cache = EmbeddingCache(
            capacity, cfg.dim, refresh_every=cfg.refresh_every, device=self.device
        )
        # StepForward holds exactly the main optimizer's parameters (not the RL head, which has
        # its own optimizer and averages its own gradients), so DDP and FSDP wrap all of it.
        self.step_forward = StepForward(self.models, self.cache)
        self.forward: nn.Module = self.step_forward
        if cfg.fsdp:
            D.shard_models(self.models, self.step_forward, self.device, bf16=cfg.amp == "bf16")
        elif self.dist.enabled:
            self.forward = nn.parallel.DistributedDataParallel(
                self.step_forward,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,  # Qwen is unused on cached steps
            )

    def _setup_optimizers(self) -> None:
        """AdamW on the main groups (Qwen, agent) with warm-up + cosine; Adam on the RL head;
        a GradScaler that is active only for fp16."""
        cfg = self.cfg
        groups = self.models.main_param_groups(agent_lr=cfg.agent_lr, qwen_lr=cfg.qwen_lr)
        self.qwen_params = next(g["params"] for g in groups if g["name"] == "qwen")
        self.main_params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        warmup, total = cfg.warmup_steps, self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, total)
        )
        self.rl_optimizer = torch.optim.Adam(self.models.rl_parameters(), lr=cfg.rl_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)

    def _setup_loss(self) -> None:
        self.criterion = EFELoss(tau=self.tau_at(0), **loss_options(self.cfg))

    def _setup_output(self, quiet: bool) -> None:
        """Console/JSONL/TensorBoard monitor, checkpointer, and the run's ``config.yaml``."""
        cfg = self.cfg
        self.monitor = Monitor(
            self.out, is_main=self.dist.is_main, quiet=quiet, tensorboard=cfg.tensorboard
        )
        self.checkpointer = Checkpointer(self.out, keep=cfg.keep_checkpoints)
        self._pending: list[StepMetrics] = []  # steps whose metrics are not read yet
        if self.dist.is_main:
            import yaml

            write_text_atomic(
                self.out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            )

    # --- helpers ---------------------------------------------------------------------------

    @property
    def flags(self) -> RedFlags:
        return self.monitor.flags

    def tau_at(self, epoch: int) -> float:
        cfg = self.cfg
        return tau_for_epoch(epoch, cfg.tau_start, cfg.tau_end, cfg.tau_epoch)

    def lr(self, group: str) -> float:
        """Current learning rate of the main optimizer's group ``"qwen"`` or ``"agent"``."""
        return next(g["lr"] for g in self.optimizer.param_groups if g["name"] == group)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )

    def batch_at(self, step: int) -> Batch:
        """The training batch of global step ``step`` (a pure function: exact resume)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        indices = self.sampler.batch(epoch * self.sampler.steps_per_epoch + i)
        return collate([self.train_set[j] for j in indices])

    def _plan(self, batch: Batch) -> tuple[CachePlan, list[str], bool]:
        """The cache plan and the prompt texts Qwen encodes this step (each key once).

        Under DDP the ranks agree on whether Qwen runs: a rank with nothing to compute while
        another has encodes its first prompt as a zero-weight anchor (flag True), so every rank
        all-reduces Qwen's gradients on the same steps.
        """
        plan = self.cache.plan(batch.keys, self.step)
        first_row: dict[int, int] = {}
        for row, key in enumerate(batch.keys.tolist()):
            first_row.setdefault(key, row)
        texts = [batch.prompts[first_row[k]] for k in plan.compute_keys.tolist()]
        if D.agree_any(bool(texts), self.dist, self.device) and not texts:
            return plan, batch.prompts[:1], True
        return plan, texts, False

    # --- one step --------------------------------------------------------------------------

    def train_step(self, batch: Batch) -> StepMetrics:
        """One optimisation step in the order of docs/training.md; returns its metrics (device
        tensors: nothing here waits for the device except the non-finite check)."""
        cfg = self.cfg
        batch = batch.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)

        # 1. cache plan → Qwen (with grad, train mode) for the keys to compute; cache for the rest
        plan, texts, anchor_only = self._plan(batch)
        tokens = self.models.encoder.tokenize(texts) if texts else {}

        # 2. refiner → RL action → agent → logits [B, 900, C] → EFE loss at the curriculum's τ
        with self._autocast():
            self.step_forward.context = (plan, self.step, anchor_only)
            logits, refined, action = self.forward(
                tokens.get("input_ids"), tokens.get("attention_mask"), batch.query, batch.hints
            )
            target = batch.target.reshape(len(batch), -1)
            loss = self.criterion(logits, target)
        stats = self.criterion.last_stats
        # The skip must be decided before any optimizer moves: the one host sync of the step.
        # Ranks decide together: a rank that skipped the backward would leave the others
        # waiting in its gradient collectives.
        if D.agree_any(not bool(torch.isfinite(loss.detach())), self.dist, self.device):
            return self._skip_nonfinite(loss, bool(texts))
        self.flags.nonfinite_streak = 0

        # 3. backward → unscale → Qwen grad norm (before clipping) → clip → step → update
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        qwen_grad = grad_norm(self.qwen_params)
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.main_params, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

        # 4. after the main step: REINFORCE on detached inputs, with the RL optimizer
        with torch.no_grad():
            reward = cell_accuracy(logits.detach().argmax(-1), target, reduction="none")  # [B]
        average = (lambda t: D.all_reduce_mean(t, self.dist)) if self.dist.enabled else None
        rl = self.models.policy.update(self.rl_optimizer, refined, action, reward, average=average)

        values = torch.stack(
            [
                loss.detach().float(),
                reward.mean(),
                qwen_grad.to(self.device),
                stats["mask_ratio"].float(),
                stats["accuracy"].float(),
                rl["rl_loss"].float(),
            ]
        )
        metrics = StepMetrics(D.all_reduce_mean(values, self.dist), qwen_ran=bool(texts))
        self._pending.append(metrics)
        if self.step % cfg.log_every == 0:  # a log step: read every step since the last one
            self.read_metrics()
        self.step += 1
        return metrics

    def read_metrics(self) -> list[dict[str, Any]]:
        """Reads the pending steps' metrics (one host sync) and feeds them to the red flags."""
        values = read_all(self._pending)
        self._pending = []
        self.monitor.observe(values)
        return values

    def _skip_nonfinite(self, loss: torch.Tensor, qwen_ran: bool) -> StepMetrics:
        self.flags.nonfinite_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.monitor.warn(
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
        nan = torch.full((len(METRIC_NAMES),), float("nan"))
        return StepMetrics(nan, qwen_ran=qwen_ran, skipped=True)

    # --- loop ------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Runs the remaining epochs; returns the last validation summary."""
        cfg = self.cfg
        summary: dict[str, Any] = {}
        self.monitor.print(
            f"Training on {self.device} ({self.dist.world_size} process(es)): "
            f"{len(self.train_set)} train samples over {self.train_set.num_prompts} prompts, "
            f"{self.val_set.num_prompts} validation prompts, {self.steps_per_epoch} steps/epoch"
        )
        t_last, s_last = time.perf_counter(), self.step
        while self.step < self.total_steps:
            epoch = self.step // self.steps_per_epoch
            if self.tau_at(epoch) != self.criterion.tau:
                self.flags.reset_loss_window()
                self.criterion.tau = self.tau_at(epoch)
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=self.step % self.steps_per_epoch,
                desc=f"Epoch {epoch}",
                disable=self.monitor.quiet,
                file=sys.stderr,
                dynamic_ncols=True,
            )
            while self.step < (epoch + 1) * self.steps_per_epoch:
                step = self.step
                metrics = self.train_step(self.batch_at(step))
                bar.update(1)
                if step % cfg.log_every == 0 and not metrics.skipped:
                    now = time.perf_counter()
                    speed = (self.step - s_last) / max(now - t_last, 1e-9)
                    t_last, s_last = now, self.step
                    record = self._train_record(step, epoch, metrics.read())
                    self.monitor.log({**record, "steps_per_s": speed})
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
            bar.close()
            self.read_metrics()
            if self.step >= self.total_steps or (epoch + 1) % cfg.val_every == 0:
                summary = self.validate(epoch)
            if not cfg.save_every or self.step % cfg.save_every:
                self.save_checkpoint()
        return summary

    def _train_record(self, step: int, epoch: int, values: dict[str, Any]) -> dict[str, Any]:
        return {
            "kind": "train",
            "step": step,
            "epoch": epoch,
            **{k: values[k] for k in ("loss", "reward", "qwen_grad", "mask_ratio", "accuracy")},
            "tau": self.criterion.tau,
            "lr": self.lr("agent"),
            "qwen_lr": self.lr("qwen"),
            "cache_hit_rate": self.cache.stats.hit_rate,
        }

    def validate(self, epoch: int) -> dict[str, Any]:
        """Scores the validation set (sharded over the ranks); logs and returns the summary."""
        totals, shown = self.validation_totals()
        return log_validation(
            self.monitor,
            self.out,
            totals,
            shown,
            step=self.step,
            epoch=epoch,
            tau=self.criterion.tau,
            vote_transforms=self.cfg.vote_transforms,
            ttt_steps=self.cfg.ttt_steps,
            is_main=self.dist.is_main,
        )

    def validation_totals(self) -> tuple[ValTotals, list[dict]]:
        """The validation totals summed over the ranks and this rank's shown samples; logs
        and writes nothing (:meth:`validate` does)."""
        cfg = self.cfg
        rounds = 0
        if cfg.fsdp:
            # Each call of a sharded module is a collective: every rank runs as many batches as
            # the largest share needs. The steering vectors belong to the root, which gathers
            # them only in its own forward: gather them for validation.
            most = -(-len(self.val_set) // self.dist.world_size)
            rounds = -(-most // cfg.val_batch_size)
            self.forward.unshard()  # type: ignore[operator]
        try:
            totals, shown = validation_totals(
                self.models,
                self.criterion,
                self.val_set,
                self.dist,
                batch_size=cfg.val_batch_size,
                device=self.device,
                autocast=self._autocast,
                min_batches=rounds,
                vote_transforms=cfg.vote_transforms,
                ttt=ttt_config(cfg),
                aug_seed=cfg.seed,
                progress=not self.monitor.quiet,
            )
        finally:
            if cfg.fsdp:
                self.forward.reshard()  # type: ignore[operator]
        return totals, shown

    def close(self) -> None:
        self.monitor.close()
        D.shutdown(self.dist)
