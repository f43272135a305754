"""A packed token stream cut into fixed-length training examples.

Documents are concatenated into one stream; example i is the window `stream[i*T : i*T + T + 1]`
(inputs are its first T tokens, targets its last T). Segment ids number the documents, so a
window that spans a boundary carries it (`segment_ids`) and the target that would predict the
next document's first token from the previous document is masked out of the loss.
"""

from __future__ import annotations

import hashlib

import numpy as np


class TokenStream:
    """Examples of `seq_len` tokens from a 1-D token array.

    Args:
      tokens: 1-D integer array (a `np.memmap` is read lazily, window by window).
      seq_len: T.
      doc_starts: sorted start offsets of the documents (first 0), or None.
      eos_id: token that ends a document (belongs to it), used when doc_starts is None.
      fingerprint: a string identifying the data (checked when a run resumes).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        *,
        doc_starts: np.ndarray | None = None,
        eos_id: int | None = None,
        fingerprint: str = "",
    ):
        self.tokens = tokens
        self.seq_len = seq_len
        self.doc_starts = doc_starts
        self.eos_id = eos_id
        self.fingerprint = hashlib.sha1(f"{fingerprint}|T={seq_len}".encode()).hexdigest()[:16]
        self.num_examples = max((len(tokens) - 1) // seq_len, 0)

    def example(self, i: int) -> dict[str, np.ndarray]:
        """Example i: `tokens, targets, segment_ids: [T]` int32 and `loss_mask: [T]` float32."""
        t = self.seq_len
        start = i * t
        window = np.asarray(self.tokens[start : start + t + 1]).astype(np.int32)
        if self.doc_starts is not None:
            seg = np.searchsorted(self.doc_starts, np.arange(start, start + t + 1), "right") - 1
        elif self.eos_id is not None:
            ends = (window == self.eos_id).astype(np.int64)
            seg = np.concatenate([[0], np.cumsum(ends)[:-1]])
        else:
            seg = np.zeros(t + 1, np.int64)
        seg = (seg - seg[0]).astype(np.int32)
        return {
            "tokens": window[:-1],
            "targets": window[1:],
            "segment_ids": seg[:-1],
            "loss_mask": (seg[:-1] == seg[1:]).astype(np.float32),
        }


def concat_documents(docs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """`(tokens, doc_starts)` of documents packed end to end (empty documents dropped)."""
    docs = [d for d in docs if len(d)]
    if not docs:
        return np.zeros(0, np.uint8), np.zeros(0, np.int64)
    lengths = np.array([len(d) for d in docs], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.concatenate(docs), starts


def in_validation(key: str, val_percent: float) -> bool:
    """Deterministic train/val assignment of a document by the SHA-1 of its key."""
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return (h % 10000) < val_percent * 100
