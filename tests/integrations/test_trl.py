"""qwenrl inside TRL's trainers: ``qwenrl.integrations.trl.use_qwenrl``.

Tiny Qwen3 models built from configs, a word-level tokenizer and datasets built here, CPU,
float32 (TRL's configs default to bf16 autocast, under which both heads round differently).
Each comparison runs TRL's own trainer and the same trainer after ``use_qwenrl`` from the same
seed; in the qwenrl run TRL's chunked kernels are replaced by ones that fail, and a spy counts
qwenrl's calls.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import tiny_lm
import torch
from datasets import Dataset
from tiny_lm import RUN
from torch.profiler import ProfilerActivity, profile
from trl import (
    DistillationConfig,
    DistillationTrainer,
    GRPOConfig,
    GRPOTrainer,
    SFTConfig,
    SFTTrainer,
)
from trl.trainer import distillation_trainer as trl_distillation
from trl.trainer import utils as trl_utils
from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head

import qwenrl
from qwenrl.integrations import trl as qtrl
from qwenrl.integrations.trl import use_qwenrl
from qwenrl.loss.hf import apply_linear_efe, linear_efe_compute_loss

VOCAB = 300
CE = {"tau": 0.0, "easy_weight": 1.0}


def tokenizer(vocab: int = VOCAB):
    return tiny_lm.word_tokenizer(vocab)


def counting_sequences(n: int = 48, vocab: int = VOCAB, seed: int = 1) -> Dataset:
    return tiny_lm.counting_sequences(n, vocab, seed)


def tiny_model(vocab: int = VOCAB, hidden: int = 32, seed: int = 0, **config: Any):
    config = {"max_position_embeddings": 128, "pad_token_id": 0, "eos_token_id": 1, **config}
    return tiny_lm.tiny_qwen3(vocab, hidden, seed, **config)


def sft_trainer(tmp_path, steps: int = 12, model=None, **args: Any) -> SFTTrainer:
    config = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=steps,
        learning_rate=1e-2,
        **{**RUN, **args},
    )
    return SFTTrainer(
        model=tiny_model() if model is None else model,
        args=config,
        train_dataset=counting_sequences(),
        processing_class=tokenizer(),
    )


def logged(trainer, *keys: str) -> list[dict[str, float]]:
    return [{k: row[k] for k in keys} for row in trainer.state.log_history if "loss" in row]


def assert_logs_close(ours: list[dict], theirs: list[dict], atol: float = 1e-4) -> None:
    assert len(ours) == len(theirs) and ours
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for key in b:
            assert a[key] == pytest.approx(b[key], abs=atol), (step, key, a, b)


class _Forbidden:
    """Stands in for a TRL kernel that must not run."""

    @staticmethod
    def apply(*_args: Any, **_kwargs: Any):
        raise AssertionError("TRL's own chunked kernel ran under use_qwenrl")


@contextlib.contextmanager
def qwenrl_only(monkeypatch):
    """TRL's chunked kernels fail; yields the list of qwenrl linear_efe_loss calls (row
    counts) made by the integration."""
    calls: list[int] = []
    real = qwenrl.linear_efe_loss

    def spy(hidden, *args, **kwargs):
        calls.append(hidden.shape[0])
        return real(hidden, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(trl_utils, "_ChunkedLogProbFunction", _Forbidden)
        m.setattr(trl_distillation, "ChunkedDivergenceFunction", _Forbidden)
        m.setattr(qtrl.head, "linear_efe_loss", spy)  # the fused head
        m.setattr(qtrl.divergence, "linear_efe_loss", spy)  # the distillation divergence
        yield calls


def count_decoder_forwards(model) -> list[int]:
    count = [0]
    model.get_decoder().register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


def batch(vocab: int = VOCAB, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, 24] ids; labels with a 6-token prompt masked and 5 padded positions in row 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (3, 24), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    labels[2, -5:] = -100
    return ids, labels


# --- SFTTrainer ---------------------------------------------------------------------------


def test_sft_cross_entropy_reproduces_trl_with_one_forward_per_micro_batch(tmp_path, monkeypatch):
    keys = ("loss", "entropy", "mean_token_accuracy", "grad_norm", "num_tokens")
    theirs = sft_trainer(tmp_path)
    theirs.train()

    ours = sft_trainer(tmp_path)
    assert use_qwenrl(ours) is ours
    forwards = count_decoder_forwards(ours.model)
    with qwenrl_only(monkeypatch) as calls:
        ours.train()
    # 12 optimizer steps × 2 micro-batches: one forward each, one qwenrl pass each.
    assert forwards[0] == 24 and len(calls) == 24
    assert_logs_close(logged(ours, *keys), logged(theirs, *keys))
    accuracy = [row["mean_token_accuracy"] for row in logged(ours, "mean_token_accuracy")]
    assert max(accuracy) > 0.1  # is_top1 is exercised, not all zeros
    for (name, p), q in zip(ours.model.named_parameters(), theirs.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0, msg=name)


def test_fused_head_fields_and_gradients_equal_trls_and_run_qwenrls_kernel():
    ids, labels = batch()
    theirs = tiny_model()
    add_fused_lm_head(theirs, outputs=("log_probs", "entropy", "is_top1"))
    ours = use_qwenrl(tiny_model())
    out_t = theirs(input_ids=ids, labels=labels, fused_lm_head=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out_q = ours(input_ids=ids, labels=labels, fused_lm_head=True)
        out_q.loss.backward()
    # The dispatcher op whose CPU kernel is qwenrl's C++ extension ran, in this forward.
    assert "qwenrl::efe_forward" in {event.name for event in prof.events()}
    out_t.loss.backward()
    assert isinstance(out_q, FusedCausalLMOutput)
    assert torch.equal(out_q.label_mask, out_t.label_mask)
    for field in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(out_q, field), getattr(out_t, field), atol=1e-5, rtol=0)
    assert torch.equal(out_q.is_top1, out_t.is_top1)
    assert out_q.log_probs[~out_q.label_mask].abs().sum() == 0
    torch.testing.assert_close(out_q.loss, out_t.loss, atol=1e-6, rtol=0)
    assert out_q.log_sum_sq_probs is None and out_q.mean_logits is None
    assert_grads_close(grads(ours), grads(theirs))
    # Without fused_lm_head the model's own forward runs (logits, generation).
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_efe_options_make_the_sft_loss_linear_efe_loss_of_the_hidden_states(tmp_path):
    options = {"tau": 0.0035, "easy_weight": 0.3, "entropy_weight": 0.05, "z_loss": 1e-3}
    trainer = use_qwenrl(sft_trainer(tmp_path, steps=2), **options)
    inputs = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.train()
    labels = inputs["labels"][:, 1:]
    n_items = (labels != -100).sum()
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=n_items)
    loss.backward()
    ours = grads(model)

    hidden = model.model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
    ).last_hidden_state[:, :-1]
    ref, stats = qwenrl.linear_efe_loss(
        hidden, model.lm_head.weight, labels, reduction="sum", return_stats=True, **options
    )
    assert 0.0 < stats["mask_ratio"] < 1.0  # tau splits the tokens: the options are exercised
    (ref / n_items).backward()
    torch.testing.assert_close(loss, ref.detach() / n_items, atol=1e-6, rtol=1e-6)
    assert_grads_close(ours, grads(model))
    ce = qwenrl.linear_efe_loss(hidden, model.lm_head.weight, labels, reduction="sum", **CE)
    assert abs(loss.item() - ce.item() / n_items.item()) > 0.1

    # Outside SFT's loss the output keeps the true, detached log-probabilities; loss is EFE.
    out = model(**inputs, fused_lm_head=True)
    torch.testing.assert_close(out.loss, loss.detach(), atol=1e-6, rtol=1e-6)
    true_logp = -qwenrl.linear_efe_loss(
        hidden, model.lm_head.weight, labels, reduction="none", **CE
    )
    torch.testing.assert_close(out.log_probs, true_logp.detach(), atol=1e-5, rtol=0)
    assert not out.log_probs.requires_grad

    trainer.train()  # and it trains with them
    losses = [row["loss"] for row in logged(trainer, "loss")]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)


def test_use_qwenrl_twice_replaces_the_options(tmp_path):
    trainer = sft_trainer(tmp_path, steps=1)
    use_qwenrl(trainer)
    forward = trainer.model.forward
    use_qwenrl(trainer, tau=0.5, easy_weight=0.5)
    assert trainer.model.forward is forward  # not stacked
    assert trainer.model._qwenrl_trl_head.options["tau"] == 0.5
    assert trainer._qwenrl_options["easy_weight"] == 0.5


def test_weight_grad_in_place_reaches_the_loss_and_both_modes_train_alike(tmp_path, monkeypatch):
    runs, seen, real = {}, [], qwenrl.linear_efe_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weight_grad_in_place"))
        return real(*args, **kwargs)

    for in_place in (True, False):
        trainer = use_qwenrl(sft_trainer(tmp_path, steps=2), weight_grad_in_place=in_place)
        seen.clear()

        with monkeypatch.context() as m:
            m.setattr(qtrl.head, "linear_efe_loss", spy)
            trainer.train()
        assert seen == [in_place] * 4  # 2 steps × 2 micro-batches
        runs[in_place] = dict(trainer.model.named_parameters())
    for name, p in runs[True].items():
        torch.testing.assert_close(p, runs[False][name], atol=1e-5, rtol=0, msg=name)


# --- GRPO ---------------------------------------------------------------------------------


def test_grpo_style_loss_with_row_weight_matches_trls_formula():
    """GRPO's token loss on TRL's per-token log-probs (on-policy: ratio 1, clip inactive) and
    linear_efe_loss with row_weight = advantages on the same hidden states: same gradient, the
    REINFORCE surrogate as value; and qwenrl's log-probs through the same formula."""
    ids, labels = batch()
    model = tiny_model()
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    g = torch.Generator().manual_seed(4)
    # Per-sequence advantages (GRPO's) plus a per-token part, of both signs.
    advantages = torch.randn(3, 1, generator=g) + 0.3 * torch.randn(3, 23, generator=g)

    def grpo_loss(log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ratio = torch.exp(log_probs - log_probs.detach())
        clipped = torch.clamp(ratio, 1 - 0.2, 1 + 0.2)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        return (per_token * mask).sum() / mask.sum()  # loss_type "dapo" / "bnpo"

    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    grpo_loss(out.log_probs, out.label_mask).backward()
    theirs = grads(model)
    mask = out.label_mask

    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    loss, per_token = qwenrl.linear_efe_loss(
        hidden,
        model.lm_head.weight,
        labels[:, 1:],
        row_weight=advantages * mask,
        return_per_token=True,
        **CE,
    )
    loss.backward()
    assert_grads_close(grads(model), theirs)
    surrogate = (advantages * -out.log_probs.detach() * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, surrogate, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(per_token["logprob"], out.log_probs.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_token["entropy"], out.entropy.detach(), atol=1e-5, rtol=0)

    use_qwenrl(model)  # the GRPOTrainer route: TRL's formula on qwenrl's log-probs
    out_q = model(input_ids=ids, labels=labels, fused_lm_head=True)
    grpo_loss(out_q.log_probs, out_q.label_mask).backward()
    assert_grads_close(grads(model), theirs)


# The trainers that generate completions (GRPO, on-policy distillation): 3 short steps.
GENERATING = {
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "max_completion_length": 6,
    "max_steps": 3,
    "learning_rate": 1e-2,
}


def prompts(n: int = 16) -> Dataset:
    return Dataset.from_list(
        [{"prompt": " ".join(f"t{(3 * i + j) % 60}" for j in range(4))} for i in range(n)]
    )


def reward(completions: list[str], **_: Any) -> list[float]:
    return [float(c.count("t1")) + 0.1 * len(c.split()) for c in completions]


def grpo_trainer(tmp_path, **args: Any) -> GRPOTrainer:
    model = tiny_model(vocab=64)
    # GRPO builds its reference model (beta > 0) from the policy's path.
    path = tmp_path / "policy"
    model.save_pretrained(path)
    model.config._name_or_path = str(path)
    config = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        num_generations=4,
        **{"beta": 0.04, **RUN, **GENERATING, **args},
    )
    return GRPOTrainer(
        model=model,
        args=config,
        train_dataset=prompts(),
        processing_class=tokenizer(64),
        reward_funcs=reward,
    )


def test_grpo_trainer_reproduces_trl(tmp_path, monkeypatch):
    keys = ("loss", "entropy", "kl", "reward", "grad_norm")
    theirs = grpo_trainer(tmp_path)
    theirs.train()
    ours = use_qwenrl(grpo_trainer(tmp_path))
    assert qtrl.trl_fused_head_settings(ours.ref_model.forward) is None  # taken over too
    with qwenrl_only(monkeypatch) as calls:
        ours.train()
    assert calls  # the policy's and the reference model's log-probs
    assert_logs_close(logged(ours, *keys), logged(theirs, *keys))
    assert any(row["kl"] > 0 for row in logged(ours, "kl"))


def test_grpo_refuses_what_it_cannot_compute(tmp_path):
    trainer = grpo_trainer(tmp_path, beta=0.0)
    with pytest.raises(ValueError, match="only the default cross-entropy mode"):
        use_qwenrl(trainer, tau=0.3, easy_weight=0.5)
    with pytest.raises(NotImplementedError, match="entropy bonus"):
        use_qwenrl(grpo_trainer(tmp_path, beta=0.0, entropy_coef=0.01))


# --- DistillationTrainer ------------------------------------------------------------------


def distillation_trainer(tmp_path, **args: Any) -> DistillationTrainer:
    config = DistillationConfig(
        output_dir=str(tmp_path / "distil"),
        **{"beta": 0.0, "temperature": 0.7, **RUN, **GENERATING, **args},
    )
    return DistillationTrainer(
        model=tiny_model(vocab=64),
        teacher_model=tiny_model(vocab=64, hidden=48, seed=5),  # another width
        args=config,
        train_dataset=prompts(),
        processing_class=tokenizer(64),
    )


def test_distillation_trainer_reproduces_trl(tmp_path, monkeypatch):
    theirs = distillation_trainer(tmp_path)
    theirs.train()
    ours = use_qwenrl(distillation_trainer(tmp_path))
    with qwenrl_only(monkeypatch) as calls:
        ours.train()
    assert len(calls) == 3 * 2  # one divergence per micro-batch
    assert_logs_close(logged(ours, "loss", "entropy"), logged(theirs, "loss", "entropy"))
    # The dispatcher left in TRL's module runs TRL's own divergence for other trainers.
    again = distillation_trainer(tmp_path)
    again.train()
    assert_logs_close(logged(again, "loss", "entropy"), logged(theirs, "loss", "entropy"), 0)


def test_divergence_loss_equals_trls_with_biases_scales_and_temperature():
    g = torch.Generator().manual_seed(0)
    n, d_s, d_t, v = 24, 16, 24, 97
    h_s = torch.randn(2, n // 2, d_s, generator=g, requires_grad=True)
    h_t = torch.randn(2, n // 2, d_t, generator=g)
    w_s = (0.3 * torch.randn(v, d_s, generator=g)).requires_grad_()
    b_s = (0.1 * torch.randn(v, generator=g)).requires_grad_()
    w_t, b_t = 0.3 * torch.randn(v, d_t, generator=g), 0.1 * torch.randn(v, generator=g)
    mask = torch.ones(2, n // 2, dtype=torch.long)
    mask[1, -4:] = 0
    common = {
        "student_lm_head_bias": b_s,
        "teacher_lm_head_bias": b_t,
        "student_logit_scale": 1.3,
        "teacher_logit_scale": 0.8,
        "temperature": 0.7,
    }
    for num_items in (None, torch.tensor(30)):
        args = (h_s, h_t, w_s, w_t, mask, 0.0, num_items)
        dispatch = trl_distillation._chunked_divergence_loss
        trl_function = getattr(dispatch, "_trl_function", dispatch)
        theirs = trl_function(*args, **common)
        theirs[0].backward()
        expected = [x.grad.clone() for x in (h_s, w_s, b_s)]
        for x in (h_s, w_s, b_s):
            x.grad = None
        ours = qtrl.divergence_loss(*args, **common)
        ours[0].backward()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b.to(a.dtype), atol=1e-5, rtol=1e-5)
        for x, e in zip((h_s, w_s, b_s), expected):
            torch.testing.assert_close(x.grad, e, atol=1e-5, rtol=1e-4)
            x.grad = None
    with pytest.raises(NotImplementedError, match="beta=0.5"):
        qtrl.divergence_loss(h_s, h_t, w_s, w_t, mask, 0.5)


def test_distillation_refuses_a_jsd(tmp_path):
    with pytest.raises(NotImplementedError, match="forward KL"):
        use_qwenrl(distillation_trainer(tmp_path, beta=0.5))


# --- options and refusals -----------------------------------------------------------------


def test_options_are_checked_when_use_qwenrl_is_called(tmp_path):
    model = tiny_model(vocab=50)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['row_weight', 'taw'\]"):
        use_qwenrl(model, taw=0.3, row_weight=None)
    with pytest.raises(ValueError, match="label_smoothing"):
        use_qwenrl(model, label_smoothing=2.0)
    with pytest.raises(ValueError, match="chunk_size"):
        use_qwenrl(model, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        use_qwenrl(model, backend="cuda")
    with pytest.raises(TypeError, match="weight_grad_in_place must be True, False or None"):
        use_qwenrl(model, weight_grad_in_place="no")
    with pytest.raises(TypeError, match="not a supported TRL trainer"):
        use_qwenrl(object())


def test_refusals_name_what_is_not_computed(tmp_path):
    capped = tiny_model(vocab=50, final_logit_softcapping=30.0)
    forward = capped.forward
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        use_qwenrl(capped)
    assert capped.forward == forward and not hasattr(capped, "_qwenrl_patched_by")  # untouched
    add_fused_lm_head(capped)
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        use_qwenrl(capped)  # the same through TRL's head
    kto_like = tiny_model(vocab=50)
    add_fused_lm_head(kto_like, outputs=("log_probs", "mean_logits"))
    with pytest.raises(NotImplementedError, match="mean_logits"):
        use_qwenrl(kto_like)
    with pytest.raises(ValueError, match="label smoother"):
        use_qwenrl(sft_trainer(tmp_path, steps=1, label_smoothing_factor=0.1))
    with pytest.raises(ValueError, match="dft"):
        use_qwenrl(sft_trainer(tmp_path, steps=1, loss_type="dft"), tau=0.3, easy_weight=0.5)
    use_qwenrl(sft_trainer(tmp_path, steps=1, loss_type="dft"))  # a CE objective: fine


def test_an_all_masked_micro_batch_is_a_connected_zero():
    model = use_qwenrl(tiny_model(vocab=50))
    ids = torch.randint(2, 50, (2, 8))
    out = model(input_ids=ids, labels=torch.full_like(ids, -100), fused_lm_head=True)
    assert out.loss.item() == 0.0 and out.log_probs.abs().sum() == 0
    out.loss.backward()  # no error: connected to the model
    assert model.lm_head.weight.grad is not None


# --- apply_linear_efe must not be silently routed around (qwenrl/loss/hf.py) ---------------


def test_apply_linear_efe_then_a_trl_trainer_raises_at_the_first_step(tmp_path):
    model = apply_linear_efe(tiny_model(), **CE)
    ids, _ = batch()
    model.model(input_ids=ids).last_hidden_state.sum().backward()  # the patch in place: fine
    trainer = sft_trainer(tmp_path, steps=1, model=model)
    with pytest.raises(RuntimeError, match=r"apply_linear_efe.*add_fused_lm_head.*use_qwenrl"):
        trainer.train()


def test_apply_linear_efe_after_the_trainer_refuses_the_fused_call(tmp_path):
    trainer = sft_trainer(tmp_path, steps=1)
    apply_linear_efe(trainer.model, **CE)
    with pytest.raises(RuntimeError, match=r"fused_lm_head=True.*use_qwenrl\(trainer"):
        trainer.train()


def test_use_qwenrl_model_then_a_trl_trainer_raises(tmp_path):
    model = use_qwenrl(tiny_model())
    trainer = sft_trainer(tmp_path, steps=1, model=model)
    with pytest.raises(RuntimeError, match=r"use_qwenrl\(model\).*use_qwenrl\(trainer"):
        trainer.train()


def test_apply_linear_efe_with_use_qwenrl_on_the_trainer_trains(tmp_path):
    theirs = sft_trainer(tmp_path, steps=2)
    theirs.train()
    trainer = sft_trainer(tmp_path, steps=2, model=apply_linear_efe(tiny_model(), **CE))
    use_qwenrl(trainer)
    trainer.train()
    assert_logs_close(logged(trainer, "loss"), logged(theirs, "loss"))
    # Eval and no-grad calls through TRL's path are not training steps: the guard lets them be.
    model = apply_linear_efe(tiny_model(vocab=50), **CE)
    add_fused_lm_head(model)
    ids, labels = batch(vocab=50)
    with torch.no_grad():
        model.train()(input_ids=ids, labels=labels, fused_lm_head=True)
    model.eval()(input_ids=ids, labels=labels, fused_lm_head=True)


def test_linear_efe_compute_loss_still_works_as_sfts_compute_loss_func(tmp_path):
    """SFT with a compute_loss_func: the loss comes from the patched (non-fused) forward, and
    TRL's fused head only computes metrics under no_grad, which the guard allows."""
    model = tiny_model()
    config = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        **RUN,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=counting_sequences(),
        processing_class=tokenizer(),
        compute_loss_func=linear_efe_compute_loss(model, **CE),
    )
    trainer.train()
    assert len(logged(trainer, "loss")) == 2
