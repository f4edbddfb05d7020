"""The Triton EFE kernels compile for real GPUs (sm_80/sm_90/sm_100) without one.

``bench/gpu_compile.py`` lowers each variant to PTX and a cubin with Triton's bundled ptxas and
reads ptxas's resource report. Under the suite's ``TRITON_INTERPRET=1`` it compiles in a child
process (the interpreter's kernels cannot be lowered), which these tests also exercise.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
import triton

pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bytes_model  # noqa: E402
import gpu_compile  # noqa: E402

from qwenrl.kernels import efe  # noqa: E402
from qwenrl.loss.options import EFEOptions  # noqa: E402

# Register allocation (and so spills) is a property of the compiler: these checks hold for the
# Triton of requirements.lock. An older Triton (pyproject.toml's floor, `make test-floors`)
# still compiles every kernel but allocates differently (3.7 spills the training call).
locked_triton = pytest.mark.skipif(
    tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9),
    reason=f"spill checks are for the locked Triton 3.9, not {triton.__version__}",
)


def _pairs(combo: tuple[str, ...]) -> set[tuple]:
    values = [(name, name in combo) for name in gpu_compile.flag_names()]
    return set(itertools.combinations(values, 2))


@locked_triton
def test_sm90_compiles_one_variant_per_layout_and_dtype():
    """The training call (class targets, 'mean', gradient) at C = 12 (tile) and 151936
    (online), each logits dtype, on sm_90: registers, no spill, smem within the limit, and the
    block config the runtime launcher uses."""
    todo = [
        v
        for v in gpu_compile.variants(archs=[90])
        if v.flags == gpu_compile.TRAINING_FLAGS and v.c in (12, 151936)
    ]
    assert {(v.layout, v.dtype) for v in todo} == set(
        itertools.product(gpu_compile.LAYOUTS, gpu_compile.DTYPES)
    )
    for row in gpu_compile.compile_variants(todo):
        v = row.variant
        assert row.error is None, row.error
        assert row.registers > 0
        assert row.spill_bytes == 0 and row.stack_bytes == 0
        assert 0 <= row.smem_bytes <= gpu_compile.SMEM_LIMIT[90]
        assert gpu_compile.problems(row) == []
        cfg = efe.launch_config(v.n, v.c)
        assert (v.layout == "online", v.block_n, v.block_c, v.num_warps) == (
            cfg.online,
            cfg.block_n,
            cfg.block_c,
            cfg.num_warps,
        )


def test_the_launcher_launches_what_launch_config_returns(monkeypatch):
    """_launch takes its layout, grid, blocks and num_warps from launch_config, the function
    gpu_compile.py compiles from (so the compiled configs are the launched ones)."""
    seen = []
    real = efe.launch_config
    monkeypatch.setattr(
        efe, "launch_config", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1]
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    z = torch.randn(41, 12, device=device)
    t = torch.randint(0, 12, (41,), device=device)
    options = EFEOptions().kernel_kwargs()
    for name in ("validate", "per_token"):  # the launcher's caller handles these
        del options[name]
    efe.efe_forward_triton(z, t, None, torch.empty_like(z), **options)
    assert seen == [real(41, 12, online=False)]
    assert not seen[0].online and seen[0].block_n == 64


def test_variant_list_covers_layouts_dtypes_shapes_archs_and_flag_pairs():
    reachable = gpu_compile.reachable_flags()
    assert len(reachable) == 416
    for combo in reachable:  # what efe_forward_triton can produce, and nothing else
        assert "LOG_TARGET" not in combo or "SOFT" in combo
        if "MEAN_BY_NVALID" in combo:
            assert "WRITE_GRAD" in combo and "SOFT" not in combo and "WRITE_LOSS" not in combo

    archs, _ = gpu_compile.supported_archs()
    assert {80, 90} <= set(archs)
    todo = gpu_compile.variants(archs=archs)
    assert {v.layout for v in todo} == set(gpu_compile.LAYOUTS)
    assert {v.dtype for v in todo} == {"float32", "bfloat16", "float16"}
    assert {12, 32000, 151936} <= {v.c for v in todo}
    assert {v.arch for v in todo} == set(archs)
    assert len({v.flags for v in todo}) < len(reachable)  # pairwise, not the full product

    # Per layout × dtype × block config × arch, every reachable flag-value pair is compiled.
    wanted = set().union(*map(_pairs, reachable))
    groups: dict[tuple, set] = {}
    for v in todo:
        key = (v.arch, v.layout, v.dtype, v.block_n, v.block_c, v.num_warps)
        groups.setdefault(key, set()).update(_pairs(v.flags))
    assert len(groups) == len(archs) * 3 * 3  # tile at C = 12, tile at 8192, online
    assert all(got == wanted for got in groups.values())


def test_bytes_model_counts_the_online_kernels_second_read():
    model = {(t.n, t.c, t.kernel): t for t in bytes_model.rows()}
    tile = model[(28800, 12, "tile")]
    assert tile.fraction > 0.99
    for shape in ((8192, 128256), (16384, 131072), (28800, 12)):
        online = model[(*shape, "online")]
        logits = online.n * online.c * {"bfloat16": 2, "float32": 4}[online.dtype]
        assert online.kernel_bytes - online.min_bytes >= logits  # z read twice
        assert online.fraction < 0.8


@pytest.mark.slow
@locked_triton
def test_every_variant_compiles_for_every_supported_arch():
    """The pairwise variant set on every arch (about 2 minutes on 2 CPU cores)."""
    rows, _ = gpu_compile.compile_all()
    failing = {}
    for row in rows:
        if problems := gpu_compile.problems(row):
            v = row.variant
            failing.setdefault((v.arch, v.layout, v.dtype, v.flags), []).extend(problems)
    assert failing == {}
