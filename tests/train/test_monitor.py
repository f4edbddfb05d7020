"""qwenrl.train.monitor: red flags (windows, once per run, state) and the record outputs."""

from __future__ import annotations

import json

import pytest

from qwenrl.train.monitor import LOG_FORMAT, Monitor, RedFlags


def _step(loss=1.0, reward=0.5, qwen_grad=0.1, qwen_ran=True) -> dict:
    return {"loss": loss, "reward": reward, "qwen_grad": qwen_grad, "qwen_ran": qwen_ran}


def _flags(**windows) -> tuple[RedFlags, list[str]]:
    warned: list[str] = []
    return RedFlags(warned.append, **windows), warned


def test_qwen_grad_flag_counts_only_steps_where_qwen_ran():
    flags, warned = _flags(qwen_window=3)
    for m in [_step(qwen_grad=0), _step(qwen_grad=0, qwen_ran=False), _step(qwen_grad=0)]:
        flags.update(m)
    assert flags.qwen_zero_streak == 2 and not warned  # the cached step neither counts nor resets
    flags.update(_step(qwen_grad=0.2))
    assert flags.qwen_zero_streak == 0
    for _ in range(3):
        flags.update(_step(qwen_grad=0))
    assert len(warned) == 1 and "Qwen_grad has been 0 on 3" in warned[0]
    assert "not reaching Qwen" in warned[0] and "missing from the optimizer" in warned[0]
    flags.update(_step(qwen_grad=0))
    assert len(warned) == 1  # once per run


def test_reward_flag_needs_a_full_window_of_zeros():
    flags, warned = _flags(reward_window=3)
    for r in (0, 0, 0.1, 0, 0):
        flags.update(_step(reward=r))
    assert not warned
    flags.update(_step(reward=0))
    assert warned and "reward has been 0 for 3 steps" in warned[0]


@pytest.mark.parametrize(
    ("losses", "flat"),
    [
        ([4.0, 3.0, 2.0, 1.0], False),  # falling
        ([1.0, 1.0, 1.0, 1.0], True),  # flat
        ([1.0, 1.0, 1.0, 1.1], True),  # rising
        ([1.0, 1.0, 0.99, 0.99], False),  # falling by 1%: not flat
    ],
)
def test_loss_flag_compares_the_two_halves_of_its_window(losses, flat):
    flags, warned = _flags(loss_window=4)
    for loss in losses[:3]:
        flags.update(_step(loss=loss))
    assert not warned  # the window is not full yet
    flags.update(_step(loss=losses[3]))
    assert bool(warned) == flat
    assert ("loss_flat" in flags.raised) == flat
    if flat:
        assert "loss is flat or rising" in warned[0] and "check the learning rates" in warned[0]


def test_red_flag_state_round_trips():
    flags, _ = _flags(loss_window=4, qwen_window=10)
    for i in range(3):
        flags.update(_step(loss=1.0 + i, qwen_grad=0, reward=0))
    flags.nonfinite_streak = 2
    flags.raised.add("reward")
    copy, _ = _flags(loss_window=4, qwen_window=10)
    copy.load_state_dict(json.loads(json.dumps(flags.state_dict())))
    assert copy.state_dict() == flags.state_dict()
    assert list(copy.losses) == [1.0, 2.0, 3.0] and copy.nonfinite_streak == 2
    flags.reset_loss_window()
    assert not flags.losses


def test_monitor_writes_records_on_the_main_rank_only(tmp_path, capsys):
    record = {"kind": "train", "step": 5, "epoch": 0, "loss": 0.5, "reward": 0.25}
    record |= {"qwen_grad": 0.01, "mask_ratio": 0.125}
    main = Monitor(tmp_path, is_main=True, quiet=False, tensorboard=False)
    main.log(record)
    other = Monitor(tmp_path, is_main=False, quiet=False, tensorboard=False)
    other.log(record)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [record]
    assert capsys.readouterr().out.strip() == LOG_FORMAT.format(**record)
    main.observe([_step(qwen_grad=0)] * 2)
    assert main.flags.qwen_zero_streak == 2


def test_tensorboard_gets_every_number_but_step_and_epoch(tmp_path):
    calls = []

    class Writer:
        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

    monitor = Monitor(tmp_path, is_main=True, quiet=True, tensorboard=False)
    monitor._tb = Writer()  # what SummaryWriter would be
    monitor.log({"kind": "val", "step": 12, "epoch": 1, "cell_accuracy": 0.5, "exact_match": 0.0,
                 "exact": 0, "canvas_accuracy": 0.9, "mask_ratio": 0.1, "samples": 4, "note": "x"})  # fmt: skip
    assert sorted(calls) == sorted(
        [(f"val/{k}", v, 12) for k, v in [("cell_accuracy", 0.5), ("exact_match", 0.0),
         ("exact", 0), ("canvas_accuracy", 0.9), ("mask_ratio", 0.1), ("samples", 4)]]
    )  # fmt: skip
