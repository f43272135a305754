"""Tokenizers for text data: UTF-8 bytes, or a `tokenizers` JSON file if one is given."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

BYTE_VOCAB = 256


def load_tokenizer(spec: str) -> tuple[Callable[[str], np.ndarray], int]:
    """`(encode, vocab_size)` for `bytes` or the path of a `tokenizer.json`.

    `encode(text)` returns a 1-D uint32 array of token ids (uint8 values for bytes).
    """
    if spec == "bytes":
        return (lambda text: np.frombuffer(text.encode("utf-8"), np.uint8)), BYTE_VOCAB
    try:
        from tokenizers import Tokenizer
    except ImportError as err:
        raise ValueError(
            f"tokenizer={spec!r} needs the `tokenizers` package (pip install tokenizers), or use "
            "tokenizer='bytes'"
        ) from err
    tok = Tokenizer.from_file(spec)
    return (lambda text: np.asarray(tok.encode(text).ids, np.uint32)), tok.get_vocab_size()


class TextTokenizer:
    """Text <-> token ids, both ways (what `python -m train.generate` needs; `load_tokenizer`
    gives the encoder alone, for training data).

    Attributes:
      spec: `bytes` or the path of a `tokenizer.json`.
      vocab_size: ids lie in `[0, vocab_size)`.
    """

    def __init__(self, spec: str):
        self.spec = spec
        self._encode, self.vocab_size = load_tokenizer(spec)
        self._tok = None
        if spec != "bytes":
            from tokenizers import Tokenizer  # load_tokenizer has checked it imports

            self._tok = Tokenizer.from_file(spec)

    def encode(self, text: str) -> np.ndarray:
        """`[N]` token ids of `text`."""
        return np.asarray(self._encode(text), np.int64)

    def decode(self, ids) -> str:
        """The text of `ids` (bytes: an incomplete UTF-8 sequence becomes U+FFFD)."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self._tok is None:
            return bytes(i for i in ids if 0 <= i < BYTE_VOCAB).decode("utf-8", errors="replace")
        return self._tok.decode(ids)


def make_tokenizer(spec: str) -> TextTokenizer:
    """The `TextTokenizer` of a data config's `tokenizer` field (`bytes` or a `tokenizer.json`)."""
    return TextTokenizer(spec)
