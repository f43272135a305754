"""What to train on: the embedded stdlib corpus, synthetic MQAR, or the user's files."""

from __future__ import annotations

import dataclasses
import math
import os

SOURCES = ("stdlib", "mqar", "text", "jsonl", "npy")
ERRORS = ("strict", "replace")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data source and its settings.

    Attributes:
      source: `stdlib` (bytes of the Python standard library's sources, no download), `mqar`
        (synthetic multi-query associative recall, accuracy is the metric), `text` (.txt files,
        one document per file), `jsonl` (one document per line, field `text_key`), or `npy`
        (a pre-tokenized 1-D uint16/uint32 `.npy` token stream, memory-mapped).
      path: a file or a directory (every `*.txt` / `*.jsonl` / `*.npy` under it, sorted) for
        text, jsonl and npy.
      text_key: the jsonl field holding the text (a string in every record).
      tokenizer: `bytes` (UTF-8 bytes, vocab 256) or the path of a `tokenizer.json` (needs the
        `tokenizers` package) for text and jsonl.
      errors: how text and jsonl files are decoded: `strict` (an undecodable byte is an error
        naming the file and its byte offset) or `replace` (such bytes become U+FFFD, and how
        many were replaced is logged).
      eos_id: npy only: the token that ends a document (segment boundaries); None: one stream.
        Must be in the model's vocab.
      val_percent: share held out for evaluation: whole files chosen by a hash of the path
        (stdlib, a directory of text files), documents chosen by a hash of their text (jsonl),
        or the last share of the tokens of each file (a single text file, npy).
      segments: mark document boundaries in packed rows with segment ids: attention and
        In-Place TTT then keep documents apart and the target across a boundary is not scored.
        False packs documents as one plain stream (GPT-style); the model then gets no segment
        ids, which lets attention use cuDNN flash attention on a GPU (a segment mask is a dense
        `[B, T, T]` input it cannot take).
      mqar_pairs: key-value pairs per MQAR sequence.
      mqar_vocab: MQAR keys and values are drawn from `[1, mqar_vocab)` (keys the lower half,
        values the upper half); must not exceed the model's vocab.
    """

    source: str = "stdlib"
    path: str | None = None
    text_key: str = "text"
    tokenizer: str = "bytes"
    errors: str = "strict"
    eos_id: int | None = None
    val_percent: float = 2.0
    segments: bool = True
    mqar_pairs: int = 8
    mqar_vocab: int = 64

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(
                f"DataConfig.source={self.source!r} is not one of {', '.join(SOURCES)}"
            )
        needs_path = self.source in ("text", "jsonl", "npy")
        if needs_path and not self.path:
            raise ValueError(f"DataConfig.source={self.source!r} needs DataConfig.path")
        if needs_path and not os.path.exists(self.path):
            raise ValueError(f"DataConfig.path={self.path!r} does not exist")
        if not needs_path and self.path:
            raise ValueError(f"DataConfig.path is only used by text/jsonl/npy, not {self.source!r}")
        if self.tokenizer != "bytes" and not os.path.isfile(self.tokenizer):
            raise ValueError(
                f"DataConfig.tokenizer={self.tokenizer!r} is neither 'bytes' nor an existing "
                "tokenizer.json file"
            )
        if self.errors not in ERRORS:
            raise ValueError(f"DataConfig.errors={self.errors!r} is not one of {', '.join(ERRORS)}")
        if not isinstance(self.text_key, str) or not self.text_key:
            raise ValueError(
                f"DataConfig.text_key must be a non-empty string, got {self.text_key!r}"
            )
        if self.eos_id is not None:
            if isinstance(self.eos_id, bool) or not isinstance(self.eos_id, int) or self.eos_id < 0:
                raise ValueError(
                    f"DataConfig.eos_id must be None or an int >= 0, got {self.eos_id!r}"
                )
            if self.source != "npy":
                raise ValueError(
                    f"DataConfig.eos_id is only used by npy (text and jsonl documents are "
                    f"delimited already), not {self.source!r}"
                )
        if not isinstance(self.segments, bool):
            raise ValueError(f"DataConfig.segments must be a bool, got {self.segments!r}")
        v = self.val_percent
        if not isinstance(v, int | float) or not math.isfinite(v) or not 0 < v < 100:
            raise ValueError(f"DataConfig.val_percent must be in (0, 100), got {v!r}")
        for f in ("mqar_pairs", "mqar_vocab"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"DataConfig.{f} must be an int, got {v!r}")
        if self.mqar_pairs < 1 or self.mqar_vocab < 4 or self.mqar_vocab // 2 - 1 < self.mqar_pairs:
            raise ValueError(
                f"DataConfig.mqar_pairs={self.mqar_pairs} needs at least that many distinct keys "
                f"in [1, mqar_vocab/2) (mqar_vocab={self.mqar_vocab})"
            )

    @property
    def uses_segments(self) -> bool:
        """Whether batches carry document boundaries the model must see (MQAR rows are one
        document each)."""
        return self.segments and self.source != "mqar"
