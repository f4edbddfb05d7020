"""The Hugging Face drop-in: a tiny random Qwen3ForCausalLM trained with linear_efe_loss.

In cross-entropy mode (tau=0, easy_weight=1) the patched model must train like the model's
own loss, step for step, while its peak memory (RSS of a fresh process) is lower.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_lm
import torch

HERE = Path(__file__).resolve().parent  # the child process imports this module by name
ROOT = HERE.parents[1]
CE = {"tau": 0.0, "easy_weight": 1.0}
VOCAB, HIDDEN, BATCH, SEQ = 32000, 64, 4, 128


def tiny_qwen3(vocab: int = VOCAB, hidden: int = HIDDEN, seed: int = 0, tie: bool = False):
    return tiny_lm.tiny_qwen3(vocab, hidden, seed, tie_word_embeddings=tie)


def batches(n_steps: int, vocab: int = VOCAB, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
        labels = ids.clone()
        labels[:, : SEQ // 8] = -100  # a prompt that is not scored
        yield ids, labels


def peak_rss_reset() -> int:
    """Resets the process's peak RSS to its current RSS (Linux) and returns it in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def train(mode: str, steps: int) -> dict:
    """Trains the tiny model ``steps`` steps; returns the losses and the extra peak RSS of
    steps 2.. over the state after step 1 (parameters, gradients, Adam moments allocated)."""
    from qwenrl.loss.hf import apply_linear_efe

    torch.set_num_threads(1)
    model = tiny_qwen3()
    if mode == "fused":
        apply_linear_efe(model, **CE)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, base = [], 0
    for step, (ids, labels) in enumerate(batches(steps)):
        if step == 1:
            base = peak_rss_reset()
        out = model(input_ids=ids, labels=labels)
        assert (out.logits is None) == (mode == "fused")
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        losses.append(out.loss.item())
    return {"losses": losses, "extra_peak": _status("VmHWM") - base}


def run_child(mode: str, steps: int) -> dict:
    # This file, tests/ (its shared helpers) and the checkout, as pytest's pythonpath has them.
    paths = [str(ROOT), str(HERE), str(HERE.parent)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    env["OMP_NUM_THREADS"] = "1"
    code = f"import json, test_hf; print(json.dumps(test_hf.train({mode!r}, {steps})))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_qwen3_trains_like_cross_entropy_with_less_memory():
    plain = run_child("plain", 25)
    fused = run_child("fused", 25)
    torch.testing.assert_close(
        torch.tensor(fused["losses"]), torch.tensor(plain["losses"]), rtol=1e-3, atol=0
    )
    assert plain["losses"][-1] < plain["losses"][0]  # it did train
    # [4, 128, 32000] float32 logits are 66 MB; their gradient and softmax as much again.
    assert fused["extra_peak"] < 0.5 * plain["extra_peak"], (fused, plain)


def test_patched_forward_loss_equals_the_models_own():
    from qwenrl.loss.hf import apply_linear_efe

    model = tiny_qwen3(vocab=500)
    ids, labels = next(batches(1, vocab=500))
    own = model(input_ids=ids, labels=labels)
    own.loss.backward()
    own_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    apply_linear_efe(model, label_smoothing=0.0, **CE)
    out = model(input_ids=ids, labels=labels, num_items_in_batch=None)
    assert out.logits is None
    out.loss.backward()
    torch.testing.assert_close(out.loss, own.loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, own_grads[name], rtol=1e-4, atol=1e-6)
    # num_items_in_batch (gradient accumulation): the sum over tokens divided by it
    own_sum = model._linear_efe_original_forward(
        input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(1000)
    ).loss
    ours_sum = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(1000)).loss
    torch.testing.assert_close(ours_sum, own_sum, rtol=1e-5, atol=1e-6)
    stats = model.linear_efe_stats
    assert stats["n_valid"].item() == (labels[:, 1:] != -100).sum().item()
    # eval mode and calls without labels: the model's own forward, logits included
    model.eval()
    assert model(input_ids=ids, labels=labels).logits.shape == (BATCH, SEQ, 500)
    model.train()
    assert model(input_ids=ids).logits.shape == (BATCH, SEQ, 500)


@pytest.mark.parametrize("in_place", [True, None, False])
def test_gradient_accumulation_with_tied_embeddings(monkeypatch, in_place):
    """Micro-batches accumulated into .grad, with the head tied to the input embedding: after
    the first, the head's gradient is added in place during the backward (True) or built in
    the forward (the default for the mean loss, and False), and the embedding's own gradient
    is added to the same .grad by autograd. Equal to the model's own loss in every mode."""
    from qwenrl.loss import grad_engine
    from qwenrl.loss.hf import apply_linear_efe

    def accumulated(patch: bool):
        model = tiny_qwen3(vocab=400, tie=True)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        if patch:
            apply_linear_efe(model, weight_grad_in_place=in_place, **CE)
        for ids, labels in batches(3, vocab=400):
            model(input_ids=ids, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    real = grad_engine.writable_grad
    monkeypatch.setattr(grad_engine, "writable_grad", lambda w: calls.append(real(w)) or real(w))
    ours = accumulated(True)
    assert any(g is not None for g in calls) == (in_place is True)  # the in-place path ran
    own = accumulated(False)
    for name, g in own.items():
        torch.testing.assert_close(ours[name], g, rtol=1e-4, atol=1e-6)


def test_unknown_option_and_model_without_head():
    from qwenrl.loss.hf import apply_linear_efe

    with pytest.raises(TypeError, match="eassy_weight"):
        apply_linear_efe(tiny_qwen3(vocab=50), eassy_weight=1.0)
    with pytest.raises(TypeError, match="LM head"):
        apply_linear_efe(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_compute_loss_func(tmp_path, accumulation):
    """transformers.Trainer with compute_loss_func: the same losses as its default loss, with
    gradient accumulation too (the Trainer then passes num_items_in_batch to both)."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from qwenrl.loss.hf import linear_efe_compute_loss

    data = [
        {"input_ids": ids[0], "labels": labels[0]}
        for ids, labels in batches(6 * accumulation, vocab=300)
    ]

    def losses(use_fused: bool) -> list[float]:
        model = tiny_qwen3(vocab=300)
        seen: list[float] = []
        kwargs = {}
        if use_fused:
            fn = linear_efe_compute_loss(model, **CE)

            def compute_loss(outputs, labels, num_items_in_batch=None):
                assert outputs.logits is None
                loss = fn(outputs, labels, num_items_in_batch=num_items_in_batch)
                seen.append(loss.item())
                return loss

            kwargs["compute_loss_func"] = compute_loss
        else:
            model.register_forward_hook(lambda m, i, out: seen.append(out.loss.item()))
        args = TrainingArguments(
            output_dir=str(tmp_path / str(use_fused)),
            max_steps=3,  # 3 optimizer steps of `accumulation` micro-batches
            per_device_train_batch_size=2,
            gradient_accumulation_steps=accumulation,
            learning_rate=1e-3,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
        )
        Trainer(model=model, args=args, train_dataset=data, **kwargs).train()
        return seen

    plain, fused = losses(False), losses(True)
    assert len(fused) == len(plain) == 3 * accumulation  # one loss per micro-batch
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=1e-4, atol=0)


def test_compute_loss_func_follows_a_resized_lm_head():
    """After resize_token_embeddings the loss trains the new head and accepts the new ids."""
    from qwenrl.loss.hf import linear_efe_compute_loss

    model = tiny_qwen3(vocab=300)
    model.train()
    fn = linear_efe_compute_loss(model, **CE)
    model.resize_token_embeddings(310)
    head = model.get_output_embeddings()
    ids = torch.randint(0, 310, (2, 16), generator=torch.Generator().manual_seed(3))
    ids[0, -1] = 305  # a new token id: outside the old head's 300 classes
    outputs = model(input_ids=ids)
    loss = fn(outputs, ids.clone())
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    logits = model.get_decoder()(input_ids=ids).last_hidden_state @ head.weight.T
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 310).float(), ids[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-4, atol=1e-5)


def test_patched_forward_return_dict_false_puts_the_loss_first():
    """return_dict=False: the model's own tuple with the loss first and no logits."""
    from qwenrl.loss.hf import apply_linear_efe

    model = tiny_qwen3(vocab=300)
    ids, labels = next(batches(1, vocab=300))
    own = model(input_ids=ids, labels=labels, return_dict=False)
    assert own[1].shape == (BATCH, SEQ, 300)  # (loss, logits, ...)
    apply_linear_efe(model, **CE)
    ours = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(ours, tuple) and len(ours) == len(own) - 1
    torch.testing.assert_close(ours[0], own[0], rtol=1e-5, atol=1e-6)
    assert all(not (torch.is_tensor(x) and x.shape[-1:] == (300,)) for x in ours)


@pytest.mark.parametrize("patch", ["apply_linear_efe", "linear_efe_compute_loss"])
def test_non_default_ignore_index(patch):
    """ignore_index=-1: those labels are not scored, and the shifted last position (padded
    with the same ignore_index) is not either."""
    import qwenrl.loss.hf as hf

    model = tiny_qwen3(vocab=300)
    ids, labels = next(batches(1, vocab=300))
    labels[labels == -100] = -1
    labels[:, -5:] = -1
    logits = model(input_ids=ids).logits
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1), ignore_index=-1
    )
    if patch == "apply_linear_efe":
        hf.apply_linear_efe(model, ignore_index=-1, **CE)
        loss = model(input_ids=ids, labels=labels).loss
    else:
        fn = hf.linear_efe_compute_loss(model, ignore_index=-1, **CE)
        loss = fn(model(input_ids=ids), labels)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert model.linear_efe_stats["n_valid"].item() == (labels[:, 1:] != -1).sum().item()


def test_compute_loss_func_patch_keeps_logits_in_eval_mode():
    """The compute_loss_func patch skips the logits only for a training call without labels:
    eval mode (and generation) gets the model's own logits."""
    from qwenrl.loss.hf import linear_efe_compute_loss

    model = tiny_qwen3(vocab=300)
    ids, labels = next(batches(1, vocab=300))
    model.eval()
    with torch.no_grad():
        own = model(input_ids=ids).logits
    linear_efe_compute_loss(model, **CE)
    with torch.no_grad():
        out = model(input_ids=ids)
        assert out.logits is not None and "last_hidden_state" not in out
        torch.testing.assert_close(out.logits, own)
        assert model(input_ids=ids, labels=labels).loss is not None  # the model's own loss
    model.train()
    out = model(input_ids=ids)
    assert out.logits is None and out["last_hidden_state"].shape == (BATCH, SEQ, HIDDEN)


def test_parts_finds_the_decoder_by_attribute_and_names_what_is_missing():
    from torch import nn

    from qwenrl.loss.hf import _parts, causal_lm_loss

    qwen = tiny_qwen3(vocab=50)

    class NoGetDecoder(nn.Module):  # a causal LM that only has the `model` attribute
        def __init__(self):
            super().__init__()
            self.model, self.lm_head = qwen.model, qwen.lm_head

        def get_output_embeddings(self):
            return self.lm_head

    decoder, head = _parts(NoGetDecoder())
    assert decoder is qwen.model and head is qwen.lm_head
    qwen.get_decoder = lambda: None  # a linear head but no decoder
    with pytest.raises(TypeError, match="Qwen3ForCausalLM has no decoder"):
        _parts(qwen)
    with pytest.raises(ValueError, match="^causal_lm_loss needs labels or shift_labels$"):
        causal_lm_loss(torch.zeros(1, 2, HIDDEN), head, None)


def test_the_head_runs_on_no_positions_and_its_bias_counts():
    """The patched training forward computes no logits (the head sees [B, 0, D]), and an LM
    head with a bias trains as the materialised logits with that bias do."""
    from qwenrl.loss.hf import apply_linear_efe

    model = tiny_qwen3(vocab=300)
    torch.manual_seed(5)
    head = torch.nn.Linear(HIDDEN, 300, bias=True)
    torch.nn.init.normal_(head.bias, std=2.0)
    model.lm_head = head
    ids, labels = next(batches(1, vocab=300))
    hidden = model.model(input_ids=ids).last_hidden_state
    want = torch.nn.functional.cross_entropy(
        (hidden @ head.weight.T + head.bias)[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1)
    )
    seen = []
    head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    apply_linear_efe(model, **CE)
    loss = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert seen == [(BATCH, 0, HIDDEN)]


def test_patching_again_replaces_the_options_instead_of_stacking():
    from qwenrl.loss.hf import apply_linear_efe

    ids, labels = next(batches(1, vocab=300))
    once = tiny_qwen3(vocab=300)
    apply_linear_efe(once, label_smoothing=0.2, entropy_weight=0.1, **CE)
    twice = tiny_qwen3(vocab=300)
    apply_linear_efe(twice, **CE)
    apply_linear_efe(twice, label_smoothing=0.2, entropy_weight=0.1, **CE)
    torch.testing.assert_close(
        twice(input_ids=ids, labels=labels).loss, once(input_ids=ids, labels=labels).loss
    )
    # The model's own forward underneath, not a stack of patches (one more layer per call).
    assert getattr(twice._linear_efe_original_forward, "__func__", None) is type(twice).forward


def test_compute_loss_func_patch_twice_tuples_and_missing_hidden_state():
    """Patching again wraps the model's own forward (no stack); a tuple output (return_dict=
    False) and outputs without the hidden state are named, not silently mis-read."""
    from qwenrl.loss.hf import _replace, linear_efe_compute_loss

    model = tiny_qwen3(vocab=300)
    ids, labels = next(batches(1, vocab=300))
    linear_efe_compute_loss(model, **CE)
    compute = linear_efe_compute_loss(model, **CE)
    assert getattr(model._linear_efe_original_forward, "__func__", None) is type(model).forward
    model.train()
    loss = compute(model(input_ids=ids), labels)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="called with return_dict=False"):
        model(input_ids=ids, return_dict=False)
    with pytest.raises(ValueError, match="^linear_efe_compute_loss: the outputs carry no last_"):
        compute({"logits": None}, labels)
    logits, past = torch.zeros(1), torch.ones(1)
    assert _replace((logits, past), logits=None) == (past,)  # the logits (first) dropped
    assert _replace((logits, past), loss=logits)[1] is past


def test_the_decoder_guard_is_installed_once_and_refuses_a_bypass():
    """Patching twice leaves one guard on the decoder. Once something replaces the patched
    forward, a training step that runs the decoder alone raises and names the patcher, also
    on a model that never ran a qwenrl forward."""
    from qwenrl.loss.hf import _parts, apply_linear_efe

    model = tiny_qwen3(vocab=300)
    decoder, _ = _parts(model)
    hooks = len(decoder._forward_pre_hooks)
    apply_linear_efe(model, **CE)
    guard = model._qwenrl_decoder_guard
    apply_linear_efe(model, **CE)
    assert model._qwenrl_decoder_guard is guard
    assert len(decoder._forward_pre_hooks) == hooks + 1
    ids, _ = next(batches(1, vocab=300))
    model.train()
    model.forward = lambda **kwargs: decoder(**kwargs)  # not a qwenrl forward
    with pytest.raises(RuntimeError, match="^qwenrl.loss.hf.apply_linear_efe patched this "):
        model(input_ids=ids[:1, :8])


def test_the_bypass_message_names_the_replacing_forward_and_says_what_to_do():
    """The message names where the replacing forward is defined, says when it is TRL's fused
    head (a function from a ``trl`` package), and points to use_qwenrl."""
    import functools

    from qwenrl.loss.hf import _bypass_message

    model = tiny_qwen3(vocab=300)
    model._qwenrl_patched_by = "qwenrl.loss.hf.apply_linear_efe"
    namespace: dict = {}
    exec(
        compile("def forward(**kwargs):\n    pass\n", "/site/trl/trainer/utils.py", "exec"),
        namespace,
    )
    model.forward = namespace["forward"]
    by_trl = _bypass_message(model)
    assert "(forward of /site/trl/trainer/utils.py)" in by_trl
    assert ": TRL's fused LM head (trl.trainer.utils.add_fused_lm_head)" in by_trl
    assert ", so the qwenrl loss would be silently skipped. With a TRL trainer, call " in by_trl
    assert by_trl.endswith("use_qwenrl(trainer, **options) after building the trainer.")
    model.forward = lambda **kwargs: None
    assert "TRL's fused LM head" not in _bypass_message(model)  # defined here, not in trl/
    model.forward = functools.partial(lambda **kwargs: None)  # no __code__: its repr
    assert f"({model.forward!r})" in _bypass_message(model)
