"""Integrations of qwenrl's losses with training libraries.

* :mod:`qwenrl.integrations.trl`: TRL's trainers (``SFTTrainer``, ``GRPOTrainer``,
  ``DistillationTrainer``) compute their per-token outputs and losses with qwenrl's kernels:
  ``use_qwenrl(trainer, **options)``. Needs the ``trl`` extra (``pip install qwenrl[trl]``).

The plain Hugging Face patches (a causal LM's own loss, ``transformers.Trainer``) are in
:mod:`qwenrl.loss.hf`.
"""
