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


def make_dataset(
    config: DataConfig, seq_len: int, seed: int = 0, vocab_size: int | None = None
) -> Dataset:
    """Builds both splits (reads and tokenizes text sources once; memory-maps npy).

    Args:
      config: the data.
      seq_len: T, tokens per example.
      seed: MQAR's generator seed.
      vocab_size: the model's vocab: if given, every token id of the data (an npy file's
        included, and `eos_id`) must lie in `[0, vocab_size)`.

    Raises:
      ValueError: naming the file (and position or byte offset) for bad data, the flag for a
        vocab or sequence length the data cannot serve, and the split that has no example.
    """
    if config.source == "mqar":
        splits = [
            MQAR(seq_len, config.mqar_pairs, config.mqar_vocab, seed, s) for s in ("train", "val")
        ]
        _check_vocab(config.mqar_vocab, vocab_size, "--data.mqar-vocab")
        return Dataset(*splits, vocab_size=config.mqar_vocab, metric="accuracy")
    if vocab_size is not None and config.eos_id is not None and config.eos_id >= vocab_size:
        raise ValueError(
            f"DataConfig.eos_id={config.eos_id} is outside the model's vocab [0, {vocab_size})"
        )
    streams, vocab = [], BYTE_VOCAB
    for split in ("train", "val"):
        if config.source == "stdlib":
            tokens, starts, fp = stdlib_documents(split, config.val_percent)
        elif config.source in ("text", "jsonl"):
            tokens, starts, fp, vocab = text_documents(config, split)
        else:
            (tokens, fp), starts, vocab = npy_tokens(config, split, vocab_size), None, None
        if split == "train" and vocab is not None:
            where = "tokenizer" if config.tokenizer != "bytes" else "bytes tokenizer"
            _check_vocab(vocab, vocab_size, f"the {where} of {config.path or config.source}")
        _check_split(config, split, len(tokens), seq_len)
        if not config.segments:
            starts = None
        eos = config.eos_id if config.segments else None
        fp = f"{fp}:segments={config.segments}"
        streams.append(TokenStream(tokens, seq_len, doc_starts=starts, eos_id=eos, fingerprint=fp))
    return Dataset(*streams, vocab_size=vocab, metric="loss")


def _check_vocab(data_vocab: int, vocab_size: int | None, what: str) -> None:
    if vocab_size is not None and data_vocab > vocab_size:
        raise ValueError(
            f"{what} has {data_vocab} token ids, more than the model's vocab ({vocab_size}): "
            f"pass --model.vocab-size {data_vocab}"
        )


def _check_split(config: DataConfig, split: str, n_tokens: int, seq_len: int) -> None:
    """A split must hold at least one example of `seq_len + 1` tokens; say why it does not."""
    if n_tokens >= seq_len + 1:
        return
    where = config.path or config.source
    if n_tokens == 0 and config.source in ("stdlib", "text"):
        why = (
            f"no file was assigned to it (whole files go to validation by a hash of their path, "
            f"val_percent={config.val_percent}): add files, change --data.val-percent, or give "
            "a single file (split by position)"
        )
    elif n_tokens == 0:
        why = (
            f"it is empty (val_percent={config.val_percent}): add data or change --data.val-percent"
        )
    else:
        why = f"it has {n_tokens} tokens, fewer than --seq {seq_len} + 1: shorten --seq or add data"
    raise ValueError(f"the {split} split of {where} has no complete example: {why}")
