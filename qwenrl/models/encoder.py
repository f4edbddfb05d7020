"""The Qwen prompt encoder: prompt text → Qwen last hidden states → masked mean → Linear.

Two ways to get the Qwen model:

* default: a tiny randomly initialised ``Qwen3Model`` built from :class:`TinyQwenConfig` with a
  character-level *grid tokenizer* (digits, newline, space, ``I``/``O``), offline in
  milliseconds;
* ``qwen_path``: any local Qwen checkpoint directory (``config.json`` + weights + tokenizer),
  loaded with ``local_files_only=True, trust_remote_code=False``.

Tokenizer loading avoids a transformers 5.x trap: ``AutoTokenizer`` on a directory whose
``config.json`` says ``qwen2`` returns ``Qwen2Tokenizer`` even for a custom ``tokenizer.json``,
and that class silently drops the spaces and newlines of grid text. A directory whose
``tokenizer_config.json`` names the generic fast class (what :meth:`save_pretrained` writes)
is therefore loaded with ``PreTrainedTokenizerFast``, and every loaded tokenizer must give a
probe grid text back exactly (encode → decode) or loading fails.

Prompts longer than ``max_length`` tokens are truncated on the right (the last demonstration
pairs are cut). 1024 tokens keeps ~70% of whole ARC-AGI-1 training prompts intact (a token
per character; median 655) and costs a few tens of ms per prompt for the tiny model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3Model,
)

GRID_SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
GRID_CHARS = tuple("0123456789") + ("\n", " ", "I", "O")
# Exercises every character of the prompt format; used to check a tokenizer's round trip.
ROUND_TRIP_PROBE = "I\n0123\n4567\nO\n89 0\n"
_GENERIC_TOKENIZER_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}


@dataclass
class TinyQwenConfig:
    """Size of the default randomly initialised Qwen3 (about 75k parameters)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128


def build_grid_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer of the prompt format: one token per character.

    Unknown characters map to ``<unk>``; decoding concatenates tokens, so the round trip of
    grid text is exact.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(GRID_SPECIALS + GRID_CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character is its own pre-token (including newline and space).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
    )


def build_tiny_qwen(
    tokenizer: PreTrainedTokenizerBase, config: TinyQwenConfig, max_length: int
) -> Qwen3Model:
    """A randomly initialised Qwen3 (deterministic under ``torch.manual_seed``)."""
    head_dim = config.hidden_size // config.num_heads
    cfg = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        use_cache=False,
    )
    return Qwen3Model(cfg)


def check_round_trip(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Raise ``ValueError`` unless encode → decode gives grid text back exactly."""
    ids = tokenizer(ROUND_TRIP_PROBE, add_special_tokens=False)["input_ids"]
    back = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if back != ROUND_TRIP_PROBE:
        raise ValueError(
            f"tokenizer from {where} ({type(tokenizer).__name__}) does not round-trip grid "
            f"text: {ROUND_TRIP_PROBE!r} came back as {back!r}"
        )


def load_qwen_checkpoint(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local Qwen model (fp32) and its tokenizer; clear errors name ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Qwen checkpoint directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"not a Hugging Face checkpoint (no config.json): {path}")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type", "")
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed config.json in Qwen checkpoint {path}: {e}") from e
    if not str(model_type).startswith("qwen"):
        raise ValueError(f"{path} holds a {model_type!r} model, expected a Qwen model")

    tok_config_file = path / "tokenizer_config.json"
    tok_class = ""
    if tok_config_file.is_file():
        tok_class = json.loads(tok_config_file.read_text()).get("tokenizer_class") or ""
    try:
        if tok_class in _GENERIC_TOKENIZER_CLASSES:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                path, local_files_only=True, trust_remote_code=False
            )
        model = AutoModel.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not load the Qwen checkpoint at {path}: {e}") from e
    check_round_trip(tokenizer, str(path))
    if tokenizer.pad_token is None:
        # Qwen tokenizers may lack a pad token; any token works since padding is masked out.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model, tokenizer


def length_buckets(sorted_lengths: list[int], pad_slack: float) -> list[list[int]]:
    """Group positions of ascending ``sorted_lengths`` into consecutive buckets whose padded
    size (count × longest) is at most ``(1 + pad_slack)`` × their real token count.

    One padded batch of random ARC prompts wastes about half its tokens on padding; on a
    2-core CPU the buckets make the tiny Qwen's forward+backward ~2.3× faster, while prompts of
    similar length (and accelerators) still get batched.
    """
    buckets: list[list[int]] = []
    total = 0
    for i, n in enumerate(sorted_lengths):
        if buckets and (len(buckets[-1]) + 1) * n <= (1.0 + pad_slack) * (total + n):
            buckets[-1].append(i)
            total += n
        else:
            buckets.append([i])
            total = n
    return buckets


class QwenPromptEncoder(nn.Module):
    """Encode prompt texts into embeddings [U, dim] with gradients into Qwen.

    Args:
        dim: output width (the agent's width).
        qwen_path: local Qwen checkpoint directory; ``None`` builds the tiny default.
        tiny: size of the default model (ignored with ``qwen_path``).
        max_length: truncation length in tokens (module docstring).
        pad_slack: bucketing tolerance of :meth:`encode` (see :func:`length_buckets`).
    """

    def __init__(
        self,
        dim: int,
        *,
        qwen_path: str | Path | None = None,
        tiny: TinyQwenConfig | None = None,
        max_length: int = 1024,
        pad_slack: float = 0.25,
    ) -> None:
        super().__init__()
        if qwen_path is None:
            self.tokenizer = build_grid_tokenizer()
            self.qwen = build_tiny_qwen(self.tokenizer, tiny or TinyQwenConfig(), max_length)
        else:
            self.qwen, self.tokenizer = load_qwen_checkpoint(qwen_path)
        # Right truncation keeps the first demonstration pairs.
        self.tokenizer.truncation_side = "right"
        self.max_length = max_length
        self.pad_slack = pad_slack
        self.hidden_size = int(self.qwen.config.hidden_size)
        self.proj = nn.Linear(self.hidden_size, dim)

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` [U, T ≤ max_length] on the encoder's device.

        Truncated to ``max_length`` and padded on the right: HF derives position ids from the
        sequence index, not the mask, so only right padding keeps every prompt's positions at
        0..len-1 (and lets :meth:`forward` trim the padding of a bucket).
        """
        seqs = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, add_special_tokens=False
        )["input_ids"]
        for text, seq in zip(texts, seqs):
            if not seq:
                raise ValueError(f"prompt text {text!r} gives no tokens")
        longest = max((len(seq) for seq in seqs), default=0)
        ids = torch.full((len(seqs), longest), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Right-padded token ids [U, T] and mask [U, T] → prompt embeddings [U, dim].

        Rows are run through Qwen in buckets of similar length (:func:`length_buckets`), each
        trimmed to its longest row; one call of this module either way, so a DDP wrapper sees
        a single forward.
        """
        lengths = attention_mask.sum(1).tolist()  # host sync: bucketing needs the lengths
        if len(lengths) == 0:
            return self.proj.weight.new_zeros(0, self.proj.out_features)
        if min(lengths) == 0:
            raise ValueError("a prompt has no tokens (all-zero attention_mask row)")
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        pooled = []
        for bucket in length_buckets([lengths[i] for i in order], self.pad_slack):
            rows = torch.tensor([order[j] for j in bucket], device=input_ids.device)
            width = lengths[order[bucket[-1]]]
            ids, mask = input_ids[rows, :width], attention_mask[rows, :width]
            hidden = self.qwen(
                input_ids=ids, attention_mask=mask, use_cache=False
            ).last_hidden_state  # (n, width, H)
            m = mask.unsqueeze(-1).to(hidden.dtype)  # (n, width, 1)
            pooled.append((hidden * m).sum(1) / m.sum(1))  # masked mean, (n, H)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return self.proj(torch.cat(pooled)[inverse.to(input_ids.device)])  # input order

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Prompt texts (U of them) → embeddings [U, dim].

        Runs with gradients whenever autograd is enabled: whether Qwen trains is the caller's
        choice (``torch.no_grad()`` around the call, or a frozen optimizer), never this method's.
        """
        if len(texts) == 0:
            return self.proj.weight.new_zeros(0, self.proj.out_features)
        return self(**self.tokenize(texts))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write Qwen and its tokenizer as a checkpoint loadable with ``qwen_path=directory``.

        The projection is not part of it: it belongs to the training checkpoint (state_dict).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.qwen.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
