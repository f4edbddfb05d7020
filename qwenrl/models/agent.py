"""The grid agent: a small transformer over the query canvas, conditioned on the prompt.

The canvas is cut into ``patch × patch`` patches (each a token: the patch's cell embeddings
concatenated and projected), so the encoder sees ``(30 / patch)²`` tokens; the head predicts
``patch²`` cells per token and the logits are unfolded back to [B, 900, C] in row-major cell
order. ``patch = 2`` (225 tokens) is the default because self-attention over all 900 cells is
about 4× slower per step on a 2-core CPU.

Conditioning: the prompt embedding is added to every token and also prepended as a token of
its own, which all cells can attend to.

Demonstration hints (:class:`qwenrl.data.hints.DemoHints`, optional):

* the output shape the demonstrations imply puts every cell in one of three states: unknown,
  inside the implied output, outside it. Without it the agent learns the training tasks'
  output sizes from absolute positions, and on the (larger) evaluation grids predicts OUTSIDE
  over cells a copy would get right. Where none is implied, the cells inside a guessed shape
  (:func:`qwenrl.data.hints.output_shape_guess`) have a fourth state, and those beyond it stay
  unknown.
* the colour votes (what similar demonstration cells became) and their level enter the cell
  embedding, and also the logits directly through ``vote_gain`` (one learned weight per level,
  starting at 0: the agent learns how far to trust the rule).

The rule (``hints.rule``, :mod:`qwenrl.data.rules`): where the demonstrations agree on a
per-cell rule, its colour enters the cell embedding and the logits through ``rule_gain``, one
learned weight. Unlike the votes' gains it does not start at 0 but at ``rule_trust`` logits,
above the copy vote: a rule the demonstrations all obey is rarely wrong (12 of the 13
evaluation test queries that have one), and learned from 0 in a 5-minute run its gain stayed
below the copy vote, so the agent kept copying where the rule said otherwise.

Copy skip: most ARC outputs share the input's size and most of its cells, so each cell's query
token and state add a learned vote to the logits (``copy_logits``, a [4 × 12, C] table)
initialised to: colour c → c, except outside the implied output → OUTSIDE; PAD → OUTSIDE,
except inside the implied or guessed output (the output is larger than the input) → no vote. The
transformer then learns the deviations from that prior instead of rediscovering the copy and
the output's size from scratch.
"""

from __future__ import annotations

import torch
from torch import nn

from qwenrl.data.grids import CANVAS, NUM_CLASSES, NUM_COLOURS, OUTSIDE, PAD
from qwenrl.data.hints import NO_RULE, DemoHints

# Cell states relative to the output shape: none known, inside / beyond an implied shape,
# inside a guessed one (beyond a guessed shape is UNKNOWN: a guess does not rule a cell out).
UNKNOWN, INSIDE, BEYOND, GUESSED = 0, 1, 2, 3
NUM_STATES = 4
NUM_VOTE_LEVELS = 3  # none, same colour, same 3×3 neighbourhood (qwenrl.data.hints)


def cell_states(
    shape_hint: torch.Tensor, batch: int, device: torch.device, guessed: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, 2] output shapes ((0, 0) = none), implied or, where ``guessed`` [B] (bool; ``None``:
    none is), guessed → cell states [B, 30, 30] (int64)."""
    if shape_hint.shape != (batch, 2):
        raise ValueError(f"shape_hint must be [{batch}, 2], got {list(shape_hint.shape)}")
    if guessed is not None and guessed.shape != (batch,):
        raise ValueError(f"guessed must be [{batch}], got {list(guessed.shape)}")
    idx = torch.arange(CANVAS, device=device)
    h, w = shape_hint[:, 0, None, None], shape_hint[:, 1, None, None]
    inside = (idx[None, :, None] < h) & (idx[None, None, :] < w)
    known = (h > 0) & (w > 0)
    state = torch.where(inside, INSIDE, BEYOND)
    if guessed is not None:
        state = torch.where(guessed[:, None, None], torch.where(inside, GUESSED, UNKNOWN), state)
    return torch.where(known, state, UNKNOWN)


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
    """Query canvas [B, 30, 30] + prompt [B, dim] (+ implied output shape [B, 2]) → logits
    [B, 900, num_classes].

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
        vote_scale: logits per unit of ``vote_gain``, the learned trust in the colour votes.
        use_hints: ``False`` ignores the hints passed in (every sample as without hints): the
            ablation of the demonstration hints.
        use_rule: ``False`` ignores the hints' rule alone (every cell as without one): its
            ablation.
        use_guess: ``False`` ignores a guessed output shape (those samples as without a shape,
            every cell unknown): its ablation.
        rule_trust: the rule's initial logit bonus (``vote_scale · rule_gain`` at the start).
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
        vote_scale: float = 25.0,
        use_hints: bool = True,
        use_rule: bool = True,
        rule_trust: float = 7.5,
        use_guess: bool = True,
    ) -> None:
        super().__init__()
        if CANVAS % patch:
            raise ValueError(f"patch={patch} must divide the canvas side {CANVAS}")
        if num_classes < NUM_COLOURS:
            raise ValueError(f"num_classes={num_classes} must cover the {NUM_COLOURS} colours")
        self.patch = patch
        self.prompt_dropout = prompt_dropout
        self.use_hints = use_hints
        self.use_rule = use_rule
        self.use_guess = use_guess
        self.side = CANVAS // patch
        self.num_classes = num_classes
        self.cell_emb = nn.Embedding(NUM_CLASSES, dim)  # canvas tokens: colours, OUTSIDE, PAD
        self.state_emb = nn.Embedding(NUM_STATES, dim)
        self.level_emb = nn.Embedding(NUM_VOTE_LEVELS, dim)
        self.vote_proj = nn.Linear(NUM_COLOURS, dim, bias=False)
        # Trust in the colour votes, per level, applied as vote_scale · vote_gain: Adam moves
        # a parameter by about lr per step whatever its gradient, so the scale sets how many
        # logits per step the trust can gain against the copy vote.
        self.vote_gain = nn.Parameter(torch.zeros(NUM_VOTE_LEVELS))
        self.vote_scale = vote_scale
        self.rule_emb = nn.Embedding(NUM_COLOURS + 1, dim)  # the rule's colour + 1; 0: none
        # Its trust; shape [1], not a scalar, for FSDP2, which shards no 0-d parameter.
        self.rule_gain = nn.Parameter(torch.full((1,), rule_trust / vote_scale))
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
        # Row state * NUM_CLASSES + token: the prior vote of a cell (module docstring).
        self.copy_logits = nn.Embedding(NUM_STATES * NUM_CLASSES, num_classes)
        with torch.no_grad():
            self.copy_logits.weight.zero_()
            for state in range(NUM_STATES):
                for token in range(NUM_CLASSES):
                    out = token if token < NUM_COLOURS else OUTSIDE
                    if state == BEYOND:
                        out = OUTSIDE
                    elif state in (INSIDE, GUESSED) and token == PAD:
                        continue
                    if out < num_classes:
                        self.copy_logits.weight[state * NUM_CLASSES + token, out] = copy_gain

    def forward(
        self, query: torch.Tensor, prompt: torch.Tensor, hints: DemoHints | None = None
    ) -> torch.Tensor:
        """Query tokens [B, 30, 30] (int64), prompt [B, dim] and the demonstration hints
        (batched; ``None`` = :meth:`DemoHints.empty`, no hints for any sample) → logits [B, 900, C]."""
        s, b = self.side, query.shape[0]
        if hints is None or not self.use_hints:
            hints = DemoHints.empty(b, query.device)
        elif hints.votes.shape != (b, CANVAS, CANVAS, NUM_COLOURS):
            raise ValueError(
                f"hints.votes must be [{b}, {CANVAS}, {CANVAS}, {NUM_COLOURS}], "
                f"got {list(hints.votes.shape)}"
            )
        shape = hints.shape
        if not self.use_guess:  # a guessed shape becomes no shape: every cell unknown
            shape = shape.masked_fill(hints.guessed[:, None], 0)
        state = cell_states(shape, b, query.device, hints.guessed)
        rule = hints.rule if self.use_rule else torch.full_like(hints.rule, NO_RULE)
        cells = (
            self.cell_emb(query)
            + self.state_emb(state)
            + self.level_emb(hints.level)
            + self.vote_proj(hints.votes.to(self.vote_proj.weight.dtype))
            + self.rule_emb(rule + 1)
        )
        x = self.patch_proj(patchify(cells, self.patch))  # (B, S², D)
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
        logits = logits + self.copy_logits((state * NUM_CLASSES + query).reshape(b, -1)).to(
            logits.dtype
        )
        trust = (self.vote_scale * self.vote_gain[hints.level]).reshape(b, -1, 1)
        votes = hints.votes.reshape(b, -1, NUM_COLOURS).to(logits.dtype)
        ruled = nn.functional.one_hot((rule + 1).reshape(b, -1), NUM_COLOURS + 1)[..., 1:]
        colours = (
            logits[..., :NUM_COLOURS]
            + trust.to(logits.dtype) * votes
            + (self.vote_scale * self.rule_gain).to(logits.dtype) * ruled.to(logits.dtype)
        )
        return torch.cat([colours, logits[..., NUM_COLOURS:]], dim=-1)
