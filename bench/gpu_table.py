"""The one table of ``make gpu-check``: the card, each step's status and every benchmark row.

    python bench/gpu_table.py OUT

reads what ``bench/gpu_check.sh`` left in OUT (``device.txt``, ``steps.tsv``, ``*_bench.json``
from pytest-benchmark) and writes ``OUT/table.md`` (also printed). Missing or unreadable
pieces become a line saying so, never an exception: the table is written even when a step
failed, since that is when it is needed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# extra_info fields shown as columns, in this order, when a group's rows have them
COLUMNS = {
    "gb_per_s": ("GB/s", "{:.0f}"),
    "frac_of_copy_bw": ("of copy bw", "{:.2f}"),
    "extra_peak_mb": ("extra peak MiB", "{:.0f}"),
}


def _impl(bench: dict) -> str:
    """The row's name as ``record`` gave it (bench/conftest.py), else the test id."""
    return bench["extra_info"].get("impl") or bench["name"]


def bench_sections(path: Path) -> list[str]:
    try:
        benchmarks = json.loads(path.read_text())["benchmarks"]
    except (OSError, KeyError, ValueError) as exc:
        return [f"{path.name}: no results ({type(exc).__name__})", ""]
    groups: dict[str, list[dict]] = {}
    for b in benchmarks:
        groups.setdefault(b["group"] or b["name"], []).append(b)
    lines = []
    for group, rows in groups.items():
        extra = [k for k in COLUMNS if all(k in r["extra_info"] for r in rows)]
        head = ["impl", "ms", *(COLUMNS[k][0] for k in extra), "vs baseline"]
        lines += [f"### {group}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for r in rows:
            x = r["extra_info"]
            ms = x.get("cuda_ms", r["stats"]["median"] * 1e3)
            cells = [_impl(r), f"{ms:.3f}", *(COLUMNS[k][1].format(x[k]) for k in extra)]
            ratio = x.get("speedup_vs_baseline")
            cells.append("?" if ratio is None else f"{ratio:.2f}x vs {x.get('baseline', '?')}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def table(out: Path) -> str:
    try:
        device = (out / "device.txt").read_text().strip()
    except OSError:
        device = "an unknown device (device.txt missing)"
    lines = [
        f"# make gpu-check on {device}",
        "",
        "| step | exit status | seconds |",
        "|---|---|---|",
    ]
    try:
        steps = (out / "steps.tsv").read_text().splitlines()
    except OSError:
        steps = []
    for line in steps:
        name, rc, seconds = (line.split("\t") + ["?", "?"])[:3]
        rc = {"0": "0 (passed)", "124": "124 (over its time limit)"}.get(rc, rc)
        lines.append(f"| {name} | {rc} | {seconds} |")
    lines.append("")
    for path in sorted(out.glob("*_bench.json")):
        lines += [f"## {path.stem}", "", *bench_sections(path)]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = Path(argv[0])
    text = table(out)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
