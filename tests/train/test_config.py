"""qwenrl.train.config: one dataclass is the CLI, the checks, the saved config; --config FILE."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from qwenrl.models import ModelConfig
from qwenrl.train.config import (
    FIELDS,
    ConfigError,
    TrainConfig,
    build_parser,
    check_config,
    config_from_dict,
    load_config_file,
    loss_options,
    model_config,
    parse_args,
)

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def _exit_message(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_every_field_has_help_and_a_flag():
    for name, f in FIELDS.items():
        assert f.metadata.get("help"), name
    cfg = parse_args([])
    assert cfg == TrainConfig()  # no flags: the embedded defaults


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_then_flags_override(tmp_path, suffix):
    values = {"epochs": 7, "agent_lr": 1e-5, "amp": "bf16", "tensorboard": True, "qwen": None}
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        import yaml

        path.write_text(yaml.safe_dump(values))
    cfg = parse_args(["--config", str(path)])
    assert (cfg.epochs, cfg.agent_lr, cfg.amp, cfg.tensorboard) == (7, 1e-5, "bf16", True)
    assert cfg.batch_size == TrainConfig().batch_size  # keys absent from the file: defaults
    cfg = parse_args(["--config", str(path), "--epochs", "2", "--no-tensorboard"])
    assert (cfg.epochs, cfg.tensorboard, cfg.agent_lr) == (2, False, 1e-5)


def test_file_values_are_typed_like_the_fields(tmp_path):
    path = tmp_path / "c.yml"  # .yml is YAML too
    path.write_text("grad_clip: 2\nqwen: null\ndata: null\n")
    cfg = parse_args(["--config", str(path)])
    assert cfg.grad_clip == 2.0 and isinstance(cfg.grad_clip, float)  # ints widen to floats
    with pytest.raises(ConfigError, match="'qwen' must be str or null, got 3"):
        config_from_dict({"qwen": 3})
    with pytest.raises(ConfigError, match="^config: 'epochs' must be int, got True \\(bool\\)"):
        config_from_dict({"epochs": True})  # a bool is not an int here
    with pytest.raises(ConfigError, match="'epochs' must be int, got '3' \\(str\\)"):
        config_from_dict({"epochs": "3"})  # only float fields accept numbers written as text
    with pytest.raises(ConfigError, match="^config: expected a mapping of option names"):
        config_from_dict([("epochs", 3)])
    with pytest.raises(ConfigError, match="^run.json: unknown option\\(s\\) 'a', 'b'$"):
        config_from_dict({"b": 1, "a": 2}, where="run.json")


def test_json_config_is_parsed_as_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("epochs: 2\n")  # YAML, not JSON
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_config_file(path)


def test_yaml_scientific_notation_without_a_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("qwen_lr: 1e-5\nepochs: 2\n")  # YAML 1.1 reads 1e-5 as a string
    cfg = parse_args(["--config", str(path)])
    assert cfg.qwen_lr == 1e-5 and isinstance(cfg.qwen_lr, float)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("epochz: 3\n", "unknown option(s) 'epochz'"),
        ("epochs: three\n", "'epochs' must be int"),
        ("epochs: 2.5\n", "'epochs' must be int"),
        ("tensorboard: 1\n", "'tensorboard' must be bool"),
        ("- epochs\n", "expected a mapping"),
        ("epochs: [1\n", "cannot be parsed"),
        ("amp: fp8\n", "--amp must be one of bf16, fp16, off"),
        ("easy_weight: 1.5\n", "--easy_weight must be <= 1"),
        ("batch_size: 0\n", "--batch_size must be >= 1"),
    ],
)
def test_bad_config_file_names_the_key(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    err = _exit_message(["--config", str(path)], capsys)
    assert message in err, err


def test_config_file_errors_name_the_file(tmp_path, capsys):
    err = _exit_message(["--config", str(tmp_path / "missing.yaml")], capsys)
    assert "missing.yaml" in err and "no such file" in err
    (tmp_path / "c.toml").write_text("epochs = 1\n")
    err = _exit_message(["--config", str(tmp_path / "c.toml")], capsys)
    assert ".yaml, .yml or .json" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--log_every", "0"], "--log_every must be >= 1"),
        (["--max_batches", "-1"], "--max_batches must be >= 0"),
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
        (["--keep_checkpoints", "0"], "--keep_checkpoints must be >= 1"),
    ],
)
def test_bad_flag_values_are_named(capsys, argv, message):
    assert message in _exit_message(argv, capsys)


def test_check_config_accepts_the_defaults_and_bounds():
    check_config(TrainConfig())
    check_config(TrainConfig(refresh_every=-1, easy_weight=1.0, max_batches=0))
    with pytest.raises(ConfigError, match="refresh_every"):
        check_config(TrainConfig(refresh_every=-2))


def test_the_recipes_are_there():
    assert {"cpu_default.yaml", "qwen3_gpu.yaml"} <= {r.name for r in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_are_valid_configs(recipe):
    values = load_config_file(recipe)
    cfg = config_from_dict(values, where=str(recipe))
    assert dataclasses.asdict(cfg) | values == dataclasses.asdict(cfg)


def test_cpu_default_recipe_is_the_embedded_default():
    (cpu,) = [r for r in RECIPES if r.name == "cpu_default.yaml"]
    assert config_from_dict(load_config_file(cpu)) == TrainConfig()


def test_model_config_is_built_from_the_fields():
    cfg = TrainConfig(dim=48, agent_layers=2, dropout=0.1, prompt_dropout=0.2, reward_scale=3.0)
    cfg.qwen, cfg.qwen_max_length = "/models/q", 256
    cfg.num_actions, cfg.refiner_depth, cfg.demo_hints, cfg.rule_hint = 1, 0, False, False
    cfg.shape_guess = False
    mc = model_config(cfg)
    assert (mc.dim, mc.agent_layers, mc.dropout, mc.prompt_dropout) == (48, 2, 0.1, 0.2)
    assert (mc.reward_scale, mc.qwen_path, mc.max_length) == (3.0, "/models/q", 256)
    assert (mc.num_actions, mc.refiner_depth, mc.hints, mc.rule_hint) == (1, 0, False, False)
    assert mc.shape_guess is False and model_config(TrainConfig()).shape_guess is True
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert {f.metadata["model"] for f in FIELDS.values() if "model" in f.metadata} <= model_fields


def test_loss_options_are_the_loss_fields():
    cfg = TrainConfig(easy_weight=0.9, entropy_weight=0.1, loss_backend="reference")
    assert loss_options(cfg) == {"easy_weight": 0.9, "entropy_weight": 0.1, "backend": "reference"}


def test_help_comes_from_the_fields():
    text = " ".join(build_parser().format_help().split())  # argparse wraps lines
    assert text.startswith("usage: python -m qwenrl.train")
    assert "Options come from the defaults, then --config FILE, then the flags." in text
    assert "--config FILE" in text and "{auto,triton,cpu,reference}" in text
    for name, f in FIELDS.items():
        assert " ".join(f.metadata["help"].split()) in text, name


def test_resume_flag_alone_means_auto_and_choices_are_enforced(capsys):
    assert parse_args(["--resume"]).resume == "auto"
    assert parse_args(["--resume", "runs/x/checkpoint-00000010"]).resume.endswith("10")
    assert "invalid choice: 'fp8'" in _exit_message(["--amp", "fp8"], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only messages")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_device_without_cuda_is_named(capsys, device):
    assert f"--device {device} was asked for but CUDA is not available" in _exit_message(
        ["--device", device], capsys
    )


def test_fp16_and_triton_on_the_cpu_are_named(capsys, monkeypatch):
    assert "fp16 needs a CUDA device" in _exit_message(["--amp", "fp16"], capsys)
    assert "use --amp bf16" in _exit_message(["--amp", "fp16"], capsys)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert parse_args(["--loss_backend", "triton"]).loss_backend == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    message = "--loss_backend triton on the CPU needs TRITON_INTERPRET=1"
    assert message in _exit_message(["--loss_backend", "triton"], capsys)
