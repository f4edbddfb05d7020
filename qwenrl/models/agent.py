"""The grid agent: a small transformer over the query canvas, conditioned on the prompt.

The canvas is cut into ``patch × patch`` patches (each a token: the patch's cell embeddings
concatenated and projected), so the encoder sees ``(30 / patch)²`` tokens; the head predicts
``patch²`` cells per token and the logits are unfolded back to [B, 900, C] in row-major cell
order. ``patch = 2`` (225 tokens) is the default because self-attention over all 900 cells is
about 4× slower per step on a 2-core CPU.

Conditioning: the prompt embedding is added to every token and also prepended as a token of
its own, which all cells can attend to.

Copy skip: most ARC outputs share the input's size and most of its cells, so each cell's own
query token adds a learned vote to the logits (``copy_logits``, a [12, C] table initialised to
"colour c → c, PAD → OUTSIDE"). The transformer then learns the deviations from a copy of the
input instead of rediscovering the copy (and the output's size) from scratch.
"""

from __future__ import annotations

import torch
from torch import nn

from qwenrl.data.grids import CANVAS, NUM_CLASSES, NUM_COLOURS, OUTSIDE


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Canvas features [B, 30, 30, F] → patch tokens [B, S², patch²·F] (S = 30 / patch)."""
    b, f, s = x.shape[0], x.shape[-1], CANVAS // patch
    x = x.reshape(b, s, patch, s, patch, f).permute(0, 1, 3, 2, 4, 5)  # (B, S, S, p, p, F)
    return x.reshape(b, s * s, patch * patch * f)


def unpatchify(y: torch.Tensor, patch: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, S², patch²·F] → per-cell [B, 900, F], row-major."""
    b, s = y.shape[0], CANVAS // patch
    f = y.shape[-1] // (patch * patch)
    y = y.reshape(b, s, s, patch, patch, f).permute(0, 1, 3, 2, 4, 5)  # (B, S, p, S, p, F)
    return y.reshape(b, CANVAS * CANVAS, f)


class GridAgent(nn.Module):
    """Query canvas [B, 30, 30] + prompt [B, dim] → logits [B, 900, num_classes].

    Args:
        dim: width (must equal the prompt embedding's width).
        layers, heads: transformer depth and attention heads (``dim % heads == 0``).
        ffn_mult: feed-forward width = ``ffn_mult * dim``.
        patch: cells per patch side; must divide 30 (1, 2, 3, 5, ...).
        dropout: dropout inside the transformer layers.
        num_classes: output classes per cell (colours + OUTSIDE + PAD).
        copy_gain: initial logit bonus of copying the input cell (module docstring).
        prompt_dropout: in training, the share of samples whose prompt conditioning is zeroed,
            so the agent also learns what holds without the prompt (unseen tasks' prompts are
            out of distribution).
    """

    def __init__(
        self,
        dim: int = 128,
        layers: int = 3,
        heads: int = 4,
        ffn_mult: int = 4,
        patch: int = 2,
        dropout: float = 0.0,
        num_classes: int = NUM_CLASSES,
        copy_gain: float = 5.0,
        prompt_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if CANVAS % patch:
            raise ValueError(f"patch={patch} must divide the canvas side {CANVAS}")
        self.patch = patch
        self.prompt_dropout = prompt_dropout
        self.side = CANVAS // patch
        self.num_classes = num_classes
        self.cell_emb = nn.Embedding(NUM_CLASSES, dim)  # canvas tokens: colours, OUTSIDE, PAD
        self.patch_proj = nn.Linear(patch * patch * dim, dim)
        self.row_emb = nn.Parameter(torch.randn(self.side, dim) * 0.02)
        self.col_emb = nn.Parameter(torch.randn(self.side, dim) * 0.02)
        self.prompt_proj = nn.Linear(dim, dim)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            ffn_mult * dim,
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # Nested tensors only help with padding masks, which the canvas never needs.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch * patch * num_classes)
        self.copy_logits = nn.Embedding(NUM_CLASSES, num_classes)
        with torch.no_grad():
            self.copy_logits.weight.zero_()
            for token in range(NUM_CLASSES):
                out = token if token < NUM_COLOURS else OUTSIDE  # PAD and OUTSIDE → OUTSIDE
                if out < num_classes:
                    self.copy_logits.weight[token, out] = copy_gain

    def forward(self, query: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """Query tokens [B, 30, 30] (int64) and prompt [B, dim] → logits [B, 900, C]."""
        s = self.side
        x = self.patch_proj(patchify(self.cell_emb(query), self.patch))  # (B, S², D)
        d = x.shape[-1]
        pos = (self.row_emb[:, None, :] + self.col_emb[None, :, :]).reshape(s * s, d)
        cond = self.prompt_proj(prompt.to(x.dtype))  # (B, D)
        if self.training and self.prompt_dropout > 0:
            keep = torch.rand(cond.shape[0], 1, device=cond.device) >= self.prompt_dropout
            cond = cond * keep.to(cond.dtype)
        x = x + pos + cond[:, None, :]
        x = torch.cat([cond[:, None, :], x], dim=1)  # (B, 1 + S², D)
        x = self.norm(self.encoder(x)[:, 1:])  # (B, S², D)
        logits = unpatchify(self.head(x), self.patch)  # (B, 900, C)
        return logits + self.copy_logits(query.reshape(query.shape[0], -1)).to(logits.dtype)
