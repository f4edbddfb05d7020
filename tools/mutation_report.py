"""Kill rate per module after ``make mutate``, from mutmut's per-file results (mutants/*.meta).

Counts only the mutants that ran (a sampled run leaves the others unchecked). Killed: a test
failed, or the run timed out or crashed; survived: every test passed; no tests: no test reaches
the mutated function. Usage: ``python tools/mutation_report.py [mutants]``.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

# mutmut 3's exit codes (mutmut/__main__.py: status_by_exit_code)
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests"}
STATUS.update({c: "killed" for c in (24, -24, 36, 152, 255, -11, -9)})  # timeouts, crashes


def report(mutants: Path) -> list[tuple[str, Counter]]:
    rows = []
    for meta in sorted(mutants.glob("**/*.py.meta")):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        counts = Counter(STATUS.get(c, "other") for c in codes.values() if c is not None)
        if counts:
            rows.append((str(meta.relative_to(mutants))[: -len(".meta")], counts))
    return rows


def main(argv: list[str]) -> int:
    rows = report(Path(argv[0] if argv else "mutants"))
    total: Counter = Counter()
    print(f"{'module':34} {'run':>5} {'killed':>7} {'survived':>9} {'no tests':>9} {'score':>7}")
    for name, c in rows + [("total", None)]:
        if c is None:
            c = total
        else:
            total.update(c)
        run = sum(c.values())
        print(
            f"{name:34} {run:5d} {c['killed']:7d} {c['survived']:9d} {c['no tests']:9d} "
            f"{c['killed'] / max(run, 1):7.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
