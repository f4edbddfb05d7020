"""Compile every Triton EFE kernel variant for real GPUs, ahead of time, on a CPU-only machine.

    python bench/gpu_compile.py          # pairwise flag coverage (default; ~2 min on 2 cores)
    python bench/gpu_compile.py --full   # every reachable flag combination (about 2.5 hours, estimated)
    make gpu-compile

A variant is layout (tile or online) × logits dtype × constexpr flags × block config × arch,
each as the runtime launcher would produce it:

* **Block config**: ``qwenrl.kernels.efe.launch_config`` — the function ``_launch`` calls —
  for the [N, C] shapes in ``SHAPES``: C = 12 (ARC), 8192 (``MAX_TILE_C``: the widest tile,
  16 warps), 32000 and 151936 (LLM vocabularies, online layout).
* **Flags**: the outputs of ``efe.kernel_flags`` over every option set ``EFEOptions`` accepts
  (416 distinct combinations of the 10 flags, row weights, z-loss and per-token outputs
  included). All of them per layout × dtype × config × arch would take hours here, so by
  default a *pairwise* subset is compiled: every pair of values of any two flags that some
  reachable combination has appears in at least one compiled combination, and the training
  call (class targets, ``'mean'``, gradient) is always in. ``--full`` compiles all 416.
* **Pointers** as ``efe_forward_triton`` passes them: int64 class targets, soft targets in the
  logits' dtype, the gradient in ``grad_dtype`` (float32 for float16 logits), float32
  stand-ins for unused pointers. Specialisation (i32/i64, divisibility by 16) and compile
  options come from Triton's own binder, as at a real launch.
* **Arch**: sm_80 and sm_90 always; sm_100 where the bundled ptxas knows it.

Registers and spills are ptxas's ``-v`` report of the very compile (Triton prints it under
``TRITON_DUMP_PTXAS_LOG``); shared memory is Triton's dynamic allocation plus any static smem.
Exit status 1 on a compile error, a spill, more than 255 registers, more registers than the
register file holds for the block, or shared memory over the arch's limit.

Under ``TRITON_INTERPRET=1`` (the test suite without CUDA) the kernel and Triton's own @jit
helpers (e.g. the combine functions behind ``tl.max``) are interpreter objects that cannot be
lowered, so the compile runs in a child process with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings

import bytes_model
import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from qwenrl.kernels import efe
from qwenrl.loss.dispatch import grad_dtype
from qwenrl.loss.options import REDUCTIONS, EFEOptions

ARCHS = (80, 90, 100)  # 100 only where the bundled ptxas supports it
REQUIRED_ARCHS = (80, 90)
DTYPES = ("float32", "bfloat16", "float16")
# (N, C): the block config comes from launch_config(N, C); N matters for the tile layout only
# below 128 rows, and for Triton's specialisation on N % 16.
SHAPES = ((28800, 12), (28800, 8192), (8192, 32000), (8192, 151936))
LAYOUTS = ("tile", "online")  # the kernel's two layouts (its constexpr ONLINE)
MAX_REGISTERS = 255
REGISTER_FILE = 65536  # 32-bit registers per SM (sm_80 ... sm_100): a block must fit in it
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}  # dynamic smem per block
# The training call, always compiled: class targets, reduction 'mean', gradient written.
TRAINING_FLAGS = ("WRITE_GRAD", "MEAN_BY_NVALID")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One specialisation of the kernel, as the launcher would compile it."""

    arch: int  # compute capability: 80, 90, 100
    layout: str  # a name in LAYOUTS
    dtype: str  # logits dtype, a name in DTYPES
    flags: tuple[str, ...]  # the constexpr flags that are True, in the kernel's order
    block_n: int | None  # None for the online layout
    block_c: int
    num_warps: int
    n: int
    c: int


@dataclasses.dataclass(frozen=True)
class Row:
    """A compiled variant: ptxas's resource report (error set when it did not compile)."""

    variant: Variant
    registers: int = 0
    spill_bytes: int = 0  # spill stores + spill loads
    stack_bytes: int = 0
    smem_bytes: int = 0
    seconds: float = 0.0  # 0 when an identical specialisation was already compiled
    error: str | None = None


# --- what the launcher can produce -------------------------------------------------------------


def flag_names() -> tuple[str, ...]:
    """The kernels' constexpr flags, in ``kernel_flags``'s order."""
    return tuple(_flags_of(EFEOptions()))


def _flags_of(
    o: EFEOptions, has_mask: bool = False, has_grad: bool = True, has_row_weight: bool = False
) -> dict[str, bool]:
    return efe.kernel_flags(
        soft=o.soft,
        log_target=o.log_target,
        label_smoothing=o.label_smoothing,
        reduction=o.reduction,
        has_mask=has_mask,
        has_grad=has_grad,
        has_row_weight=has_row_weight,
        z_loss=o.z_loss,
        per_token=o.per_token,
    )


def reachable_flags() -> list[tuple[str, ...]]:
    """Every flag combination ``efe_forward_triton`` can launch with (the True flags of each).

    The inputs are every option set EFEOptions accepts (it rejects log_target without soft
    targets), with and without a hard mask, a gradient buffer and row weights.
    """
    seen: dict[tuple[str, ...], None] = {}
    bools = (False, True)
    option_values = {
        "soft": bools,
        "log_target": bools,
        "label_smoothing": (0.0, 0.1),
        "z_loss": (0.0, 1e-4),
        "per_token": bools,
        "reduction": REDUCTIONS,
    }
    for values in itertools.product(*option_values.values()):
        try:
            o = EFEOptions(**dict(zip(option_values, values)))
        except ValueError:
            continue
        for has_mask, has_grad, has_rw in itertools.product(bools, repeat=3):
            flags = _flags_of(o, has_mask, has_grad, has_rw)
            seen[tuple(k for k, v in flags.items() if v)] = None
    return list(seen)


def pairwise(combos: list[tuple[str, ...]], first: tuple[str, ...]) -> list[tuple[str, ...]]:
    """A subset of ``combos`` (``first`` included) in which every (flag a = x, flag b = y) pair
    that occurs in ``combos`` occurs at least once; greedy, deterministic."""
    names = flag_names()

    def pairs(combo: tuple[str, ...]) -> set[tuple]:
        values = [(name, name in combo) for name in names]
        return set(itertools.combinations(values, 2))

    todo = set().union(*(pairs(c) for c in combos))
    chosen = [first]
    todo -= pairs(first)
    while todo:
        best = max(combos, key=lambda c: len(pairs(c) & todo))  # first best on ties
        chosen.append(best)
        todo -= pairs(best)
    return chosen


def supported_archs() -> tuple[list[int], list[str]]:
    """The archs to compile for, and one line per arch skipped because the toolchain lacks it."""
    from triton.backends.nvidia.compiler import get_ptxas  # the ptxas Triton itself would run

    archs, notes = [], []
    for arch in ARCHS:
        ptxas = get_ptxas(arch).path
        run = subprocess.run([ptxas, "--list-arch"], capture_output=True, text=True)
        known = run.returncode == 0 and str(arch) in run.stdout.split()
        if known or (arch in REQUIRED_ARCHS and run.returncode != 0):
            archs.append(arch)  # an older ptxas without --list-arch: the compile will tell
        else:
            notes.append(f"sm_{arch}: skipped, the bundled ptxas ({ptxas}) does not support it")
    return archs, notes


def variants(*, full: bool = False, archs: list[int] | None = None) -> list[Variant]:
    """Every variant to compile: layout × dtype × flags × block config × arch."""
    combos = reachable_flags()
    if not full:
        combos = pairwise(combos, first=TRAINING_FLAGS)
    out = []
    for arch, (n, c), dtype, flags in itertools.product(
        archs or REQUIRED_ARCHS, SHAPES, DTYPES, combos
    ):
        cfg = efe.launch_config(n, c)
        out.append(
            Variant(
                arch,
                "online" if cfg.online else "tile",
                dtype,
                flags,
                cfg.block_n,
                cfg.block_c,
                cfg.num_warps,
                n,
                c,
            )
        )
    return out


# --- compiling ---------------------------------------------------------------------------------


def _interpreted() -> bool:
    """True when Triton was imported under TRITON_INTERPRET=1 (nothing can be lowered here)."""
    return not (
        isinstance(efe._efe_kernel, JITFunction)
        and isinstance(triton.language.standard.cdiv, JITFunction)
    )


def _launch_args(v: Variant) -> tuple[tuple, dict]:
    """Arguments in ``_launch``'s order. Only the pointers' dtypes and 16-byte alignment and
    the ints' values (N, C, ignore_index) reach the specialisation, so 1-element tensors do."""
    flags = {name: name in v.flags for name in flag_names()}
    dtype = getattr(torch, v.dtype)
    z = torch.empty(1, dtype=dtype)
    part = torch.empty(1)  # float32, as the partial sums
    target = torch.empty(1, dtype=dtype if flags["SOFT"] else torch.int64)
    mask = torch.empty(1, dtype=torch.uint8) if flags["HAS_MASK"] else part
    grad = torch.empty(1, dtype=grad_dtype(dtype)) if flags["WRITE_GRAD"] else z
    loss = torch.empty(1) if flags["WRITE_LOSS"] else part
    nvalid = torch.empty((), dtype=torch.int64) if flags["MEAN_BY_NVALID"] else part
    # The options' trailing arguments: None (a constexpr) when off, as the launcher passes them.
    options = dict(
        rw_ptr=torch.empty(1) if flags["HAS_ROW_WEIGHT"] else None,
        tok_ptr=torch.empty(1) if flags["WRITE_PER_TOKEN"] else None,
        z_loss=1e-4 if flags["HAS_Z_LOSS"] else 0.0,
    )
    # ignore_index, tau, easy_weight, beta, eps, plogp_class, grad_scale
    scalars = (-100, 0.6, 0.5, 0.1, 0.1, -0.5, 1.0)
    meta = {"ONLINE": v.layout == "online", "BLOCK_N": v.block_n or 1, "BLOCK_C": v.block_c}
    args = (z, target, mask, grad, loss, part, nvalid, v.n, v.c, *scalars)
    return args, {**flags, **meta, **options, "num_warps": v.num_warps}


def _ptxas_report(log: str) -> dict[str, int]:
    """Registers, spills, stack and static smem from ptxas -v's output."""

    def grab(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    if not re.search(r"Used \d+ registers", log):
        raise RuntimeError(f"no ptxas report in the compile's output:\n{log}")
    return dict(
        registers=grab(r"Used (\d+) registers"),
        spill_bytes=grab(r"(\d+) bytes spill stores") + grab(r"(\d+) bytes spill loads"),
        stack_bytes=grab(r"(\d+) bytes stack frame"),
        static_smem=grab(r"(\d+) bytes smem"),
    )


def _compile(v: Variant, cache_dir: str, done: dict) -> Row:
    """Compiles one variant through Triton's own launch path (binder → specialisation →
    ``triton.compile``), minus the GPU. ``done`` maps a compile key to its Row."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", v.arch, 32)
    backend = make_backend(target)
    kernel = efe._efe_kernel
    args, kwargs = _launch_args(v)
    # Triton-internal API (pinned triton 3.9): exactly what JITFunction.run does before compiling.
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    key = repr((v.arch, signature, constexprs, attrs, options))
    if key in done:  # e.g. C = 32000 and 151936: the same launch, the same specialisation
        return dataclasses.replace(done[key], variant=v, seconds=0.0)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with knobs.compilation.scope(), knobs.nvidia.scope(), knobs.cache.scope():
            knobs.cache.dir = cache_dir  # throwaway: a cache hit would skip ptxas and its report
            knobs.compilation.always_compile = True
            knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's output to stdout
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(
                    ASTSource(kernel, signature, constexprs, attrs),
                    target=target,
                    options=options.__dict__,
                )
        report = _ptxas_report(log.getvalue())
    except Exception as exc:  # reported per variant; the exit status says it failed
        return Row(v, seconds=time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")
    smem = compiled.metadata.shared + report.pop("static_smem")
    row = Row(v, **report, smem_bytes=smem, seconds=time.perf_counter() - start)
    done[key] = row
    return row


def _compile_here(todo: list[Variant]) -> list[Row]:
    done: dict[str, Row] = {}
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="gpu-compile-") as cache:
        # Triton 3.9 warns that TRITON_DEFAULT_FP_FUSION is unset; the runtime sees the same.
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
        return [_compile(v, cache, done) for v in todo]


def compile_variants(todo: list[Variant]) -> list[Row]:
    """Compiles ``todo``, in this process or, under the interpreter, in a child process."""
    if not _interpreted():
        return _compile_here(todo)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker"],
        input=json.dumps([dataclasses.asdict(v) for v in todo]),
        capture_output=True,
        text=True,
        env=env,
    )
    if child.returncode != 0:
        raise RuntimeError(f"the compile worker failed:\n{child.stderr[-4000:]}")
    return [_row_from_json(r) for r in json.loads(child.stdout)]


def compile_all(*, full: bool = False) -> tuple[list[Row], list[str]]:
    """Compiles every variant for every supported arch → (rows, notes on skipped archs)."""
    archs, notes = supported_archs()
    return compile_variants(variants(full=full, archs=archs)), notes


def _variant_from_json(d: dict) -> Variant:
    return Variant(**{**d, "flags": tuple(d["flags"])})


def _row_from_json(d: dict) -> Row:
    return Row(**{**d, "variant": _variant_from_json(d["variant"])})


# --- checking and reporting --------------------------------------------------------------------


def problems(row: Row) -> list[str]:
    """Why ``row`` could not run on its arch (empty when it can)."""
    if row.error:
        return [f"compile error: {row.error.splitlines()[0]}"]
    v, out = row.variant, []
    if row.spill_bytes:
        out.append(f"spills ({row.spill_bytes} B spill stores + loads per thread)")
    elif row.stack_bytes:  # local memory without spills: a local array, just as slow
        out.append(f"{row.stack_bytes} B stack frame (local memory)")
    if row.registers > MAX_REGISTERS:
        out.append(f"{row.registers} registers > {MAX_REGISTERS}")
    # Registers are allocated per warp in units of 256 (8 per thread).
    if -(-row.registers // 8) * 8 * 32 * v.num_warps > REGISTER_FILE:
        out.append(f"{row.registers} registers × {32 * v.num_warps} threads > {REGISTER_FILE}")
    if row.smem_bytes > SMEM_LIMIT[v.arch]:
        out.append(f"{row.smem_bytes} B shared memory > {SMEM_LIMIT[v.arch]}")
    return out


def _block(v: Variant) -> str:
    return f"{v.block_n or 1}×{v.block_c}, {v.num_warps} warps"


def format_rows(rows: list[Row]) -> str:
    """One line per variant: layout, arch, dtype, block, flags, registers, spills, smem."""
    head = f"{'layout':<19}{'arch':<7}{'dtype':<10}{'C':>7}  {'block':<20}{'regs':>5}{'spill':>6}{'smem':>7}  flags"
    lines = [head, "-" * len(head)]
    for r in rows:
        v = r.variant
        status = "  ".join(problems(r))
        lines.append(
            f"{v.layout:<19}sm_{v.arch:<4}{v.dtype:<10}{v.c:>7}  {_block(v):<20}"
            f"{r.registers:>5}{r.spill_bytes:>6}{r.smem_bytes:>7}  {'+'.join(v.flags) or '-'}"
            + (f"  FAIL: {status}" if status else "")
        )
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    """Max registers, spills and smem per layout × arch, as a markdown table."""
    lines = [
        "| layout | arch | variants | max registers | variants that spill (max bytes) "
        "| max smem (B) | smem limit (B) |",
        "|---|---|---|---|---|---|---|",
    ]
    by_group: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        by_group.setdefault((r.variant.layout, r.variant.arch), []).append(r)
    for (layout, arch), group in sorted(by_group.items()):
        ok = [r for r in group if not r.error]
        errors = f" ({len(group) - len(ok)} failed to compile)" if len(ok) < len(group) else ""
        spills = [r.spill_bytes for r in ok if r.spill_bytes]
        regs = max((r.registers for r in ok), default=0)
        smem = max((r.smem_bytes for r in ok), default=0)
        lines.append(
            f"| {layout} | sm_{arch} | {len(group)}{errors} | {regs} | "
            f"{len(spills)} ({max(spills, default=0)}) | {smem} | {SMEM_LIMIT[arch]} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every reachable flag combination")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # a child of compile_variants: variants on stdin, rows on stdout
        todo = [_variant_from_json(d) for d in json.load(sys.stdin)]
        print(json.dumps([dataclasses.asdict(r) for r in _compile_here(todo)]))
        return 0

    start = time.perf_counter()
    rows, notes = compile_all(full=args.full)
    elapsed = time.perf_counter() - start
    for note in notes:
        print(note)
    print(format_rows(rows))
    print()
    print(summary(rows))
    print()
    print(bytes_model.table(bytes_model.rows()))
    failed = [r for r in rows if problems(r)]
    if failed:
        print("\nFAILED:\n" + format_rows(failed))
    compiles = sum(1 for r in rows if r.seconds > 0)
    print(
        f"\n{len(rows)} variants ({compiles} distinct compiles, "
        f"{'all' if args.full else 'pairwise'} flag combinations) in {elapsed:.0f} s; "
        f"{len(failed)} failed"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
