"""``python -m qwenrl.evaluate``: the same command as ``python -m qwenrl.eval.evaluate``.

Kept for the commands in docs, recipes and scripts; the code is :mod:`qwenrl.eval.evaluate`.
"""

from __future__ import annotations

import sys

from qwenrl.eval.evaluate import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
