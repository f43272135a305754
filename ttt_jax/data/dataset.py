"""`make_dataset`: the train and validation streams of a `DataConfig` at a sequence length."""

from __future__ import annotations

import dataclasses

from ttt_jax.data.config import DataConfig
from ttt_jax.data.files import npy_tokens, text_documents
from ttt_jax.data.mqar import MQAR
from ttt_jax.data.stdlib_corpus import stdlib_documents
from ttt_jax.data.stream import TokenStream
from ttt_jax.data.tokenizer import BYTE_VOCAB


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and validation example sources (`.example(i)`, `.num_examples`, `.fingerprint`).

    Attributes:
      vocab_size: the smallest vocab that holds every token id of the data (None: unknown, for
        npy streams; the trainer then checks each batch against the model's vocab).
      metric: the headline eval metric, "loss" or "accuracy" (MQAR).
    """

    train: object
    val: object
    vocab_size: int | None
    metric: str


def make_dataset(config: DataConfig, seq_len: int, seed: int = 0) -> Dataset:
    """Builds both splits (reads and tokenizes text sources once; memory-maps npy)."""
    if config.source == "mqar":
        splits = [
            MQAR(seq_len, config.mqar_pairs, config.mqar_vocab, seed, s) for s in ("train", "val")
        ]
        return Dataset(*splits, vocab_size=config.mqar_vocab, metric="accuracy")
    streams, vocab = [], BYTE_VOCAB
    for split in ("train", "val"):
        if config.source == "stdlib":
            tokens, starts, fp = stdlib_documents(split, config.val_percent)
        elif config.source in ("text", "jsonl"):
            tokens, starts, fp, vocab = text_documents(config, split)
        else:
            (tokens, fp), starts, vocab = npy_tokens(config, split), None, None
        if not config.segments:
            starts = None
        eos = config.eos_id if config.segments else None
        fp = f"{fp}:segments={config.segments}"
        streams.append(TokenStream(tokens, seq_len, doc_starts=starts, eos_id=eos, fingerprint=fp))
    return Dataset(*streams, vocab_size=vocab, metric="loss")
