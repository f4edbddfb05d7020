"""A whole TRL training step: ``SFTTrainer`` on its own fused LM head against the same trainer
after ``qwenrl.integrations.trl.use_qwenrl``.

    pytest bench/test_trl_step_bench.py --benchmark-only --bench-full

The head benchmark (``test_trl_bench.py``) times the loss alone; this one times what a user
waits for: the model's forward and backward, the head, the optimiser. The model is a 2-layer
Qwen3 built from its config (width 512, vocabulary 32,000, float32, CPU), trained on sequences
of 480 to 511 tokens, 4 a micro-batch, 2 micro-batches a step (about 4,000 tokens a step): a
small body, so that the head's share of the step is the one of a small LLM's fine-tuning.

Every row is cross-entropy (``use_qwenrl``'s default options) and logs the same losses (the
integration tests check that). Inside TRL the head runs with ``reduction='none'`` (TRL's losses
need a differentiable log-prob per token), so its backward always runs the chunks again, in
either weight-gradient mode; the modes differ only in where the weight gradient goes when
``.grad`` exists (the second micro-batch of each step): added into it in place
(``use_qwenrl``: the default, which for ``'none'`` is in place) or built as a new [V, D]
tensor that autograd then adds (``use_qwenrl_forward_grad``: ``use_qwenrl(trainer,
weight_grad_in_place=False)``).

Time: ``trainer.train()`` over 3 optimiser steps, pytest-benchmark's median of 2 rounds after a
warm-up round (each round starts from the same model: ``train()`` re-creates the optimiser);
``step_s`` is the median optimiser step from a callback. Extra peak memory: the same run in a
fresh process, the second ``train()`` above the RSS before it.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import pytest
from peak_memory import HAS_CLEAR_REFS, ROOT, in_fresh_process, measure_step

CASES = {"qwen3_L2_D512_V32000_seq512": (512, 32000, 512)}  # (width, vocabulary, max length)
METHODS = ["trl_head", "use_qwenrl", "use_qwenrl_forward_grad"]
STEPS, BATCH, ACCUMULATE = 3, 4, 2


def sft_trainer(case: str, method: str, out: str):
    from tiny_lm import RUN, counting_sequences, tiny_qwen3, word_tokenizer
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    width, vocab, length = CASES[case]
    model = tiny_qwen3(vocab, width, max_position_embeddings=length, pad_token_id=0, eos_token_id=1)
    config = SFTConfig(
        output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATE,
        max_steps=STEPS, max_length=length, learning_rate=1e-4, **RUN,
    )  # fmt: skip
    data = counting_sequences(STEPS * BATCH * ACCUMULATE, vocab, lengths=(length - 32, length))
    trainer = SFTTrainer(
        model, args=config, train_dataset=data, processing_class=word_tokenizer(vocab)
    )
    if method.startswith("use_qwenrl"):
        from qwenrl.integrations.trl import use_qwenrl

        use_qwenrl(
            trainer, weight_grad_in_place=False if method.endswith("_forward_grad") else None
        )

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, *_args, **_kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *_args, **_kwargs):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimes()
    trainer.add_callback(timer)
    return trainer, timer.times


@pytest.mark.full
@pytest.mark.skipif(not HAS_CLEAR_REFS, reason="needs Linux /proc")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_cpu_trl_sft_step(benchmark, record, case, method):
    pytest.importorskip("trl")
    mem = in_fresh_process(__file__, case, method)
    with tempfile.TemporaryDirectory() as out:
        trainer, times = sft_trainer(case, method, out)
        benchmark.pedantic(trainer.train, rounds=2, warmup_rounds=1)
    step_s = statistics.median(times[STEPS:])  # the timed rounds' steps
    record(f"TRL SFTTrainer cpu fp32 {case}, {STEPS} steps", method, step_s=step_s,
           extra_peak_mb=mem["extra_peak_mb"], cpu_s=mem["cpu_s"])  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))  # tiny_lm (pytest's conftest does it otherwise)
    with tempfile.TemporaryDirectory() as out:
        trainer, _ = sft_trainer(sys.argv[1], sys.argv[2], out)
        print(json.dumps(measure_step(trainer.train)))
