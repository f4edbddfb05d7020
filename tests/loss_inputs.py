"""Random inputs shared by the loss tests of every backend."""

from __future__ import annotations

import zlib

import torch


def seed_of(*params) -> int:
    """A seed per parameter set: fresh across cases, stable across runs."""
    return zlib.crc32(repr(params).encode())


def make_inputs(n, c, kind, seed, *, ignore_frac=0.2, dtype=torch.float32, scale=3.0):
    """Random logits [n, c] and a target of the given kind: 'class', 'soft' or 'log'."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g) * scale).to(dtype)
    if kind == "class":
        t = torch.randint(0, c, (n,), generator=g)
        t[torch.rand(n, generator=g) < ignore_frac] = -100
    else:
        p = torch.softmax(torch.randn(n, c, generator=g) * 2, -1)
        t = p.log() if kind == "log" else p
    return z, t
