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
