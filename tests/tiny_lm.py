"""A tiny random Qwen3 causal LM built from its config (no hub download), a word-level tokenizer
and a learnable dataset: what the Hugging Face and TRL integration tests and benchmarks train."""

from __future__ import annotations

from typing import Any

import torch


def tiny_qwen3(vocab: int, hidden: int, seed: int = 0, **config: Any):
    """A 2-layer ``Qwen3ForCausalLM`` of width ``hidden`` (4 heads of ``hidden // 4``, 2 KV
    heads, an MLP twice as wide), seeded; ``config`` overrides or adds Qwen3Config fields."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
    )
    return Qwen3ForCausalLM(Qwen3Config(**{**fields, **config}))


# TRL trainer settings shared by the tests and benchmarks: CPU, float32, no files, no progress bars.
RUN = {
    "report_to": [],
    "use_cpu": True,
    "bf16": False,
    "save_strategy": "no",
    "seed": 0,
    "disable_tqdm": True,
    "logging_steps": 1,
    "dataloader_num_workers": 0,
}


def word_tokenizer(vocab: int):
    """Words t0 … t{vocab-3} are the ids 2 … vocab-1; 0 is padding, 1 end of sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i + 2 for i in range(vocab - 2)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def counting_sequences(n: int, vocab: int, seed: int = 1, lengths: tuple[int, int] = (5, 20)):
    """A ``datasets.Dataset`` of pre-tokenized runs of consecutive ids (learnable: accuracy rises
    within a few steps), ``lengths[0]`` to ``lengths[1] - 1`` tokens, so batches carry padding."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(*lengths, (1,), generator=g))
        start = int(torch.randint(2, vocab - lengths[1], (1,), generator=g))
        rows.append({"input_ids": list(range(start, start + length))})
    return Dataset.from_list(rows)
