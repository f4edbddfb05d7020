"""Evaluation: validation scores, test-time training, voting and ``python -m qwenrl.eval.evaluate``."""
