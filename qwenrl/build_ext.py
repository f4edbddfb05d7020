"""Builds the C++ extension ahead of its first use:  python -m qwenrl.build_ext

A plain ``pip install`` ships the C++ sources, not a compiled extension (see
:mod:`qwenrl._ext`); the first loss call would otherwise build it (a few minutes). The build
is cached per torch version, Python version and CPU in ``$QWENRL_EXT_DIR`` or
``~/.cache/qwenrl/ext``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="do not show the compiler's output")
    args = parser.parse_args(argv)
    from qwenrl import _ext

    try:
        module = _ext.build_jit(verbose=not args.quiet)
    except Exception as exc:
        print(f"qwenrl: building the C++ extension failed: {exc}", file=sys.stderr)
        return 1
    print(f"qwenrl: C++ extension ready: {module.__file__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
