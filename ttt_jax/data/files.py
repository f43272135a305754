"""User data: text files, JSON lines, or pre-tokenized `.npy` token streams."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np

from ttt_jax.data.config import DataConfig
from ttt_jax.data.stream import concat_documents, in_validation
from ttt_jax.data.tokenizer import load_tokenizer

SUFFIX = {"text": ".txt", "jsonl": ".jsonl", "npy": ".npy"}


def data_files(config: DataConfig) -> list[pathlib.Path]:
    """The file itself, or every file with the source's suffix under the directory, sorted."""
    path = pathlib.Path(config.path)
    files = [path] if path.is_file() else sorted(path.rglob(f"*{SUFFIX[config.source]}"))
    if not files:
        raise ValueError(f"no *{SUFFIX[config.source]} files under DataConfig.path={config.path!r}")
    return files


def _fingerprint(files: list[pathlib.Path], extra: str) -> str:
    listing = "\n".join(f"{f}:{f.stat().st_size}" for f in files)
    return hashlib.sha1(f"{extra}|{listing}".encode()).hexdigest()


def text_documents(config: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray, str, int]:
    """`(tokens, doc_starts, fingerprint, vocab_size)` of a text or jsonl source's split."""
    encode, vocab = load_tokenizer(config.tokenizer)
    files = data_files(config)
    docs = []
    for f in files:
        if config.source == "text":
            if in_validation(str(f), config.val_percent) == (split == "val"):
                docs.append(encode(f.read_text("utf-8", errors="replace")))
            continue
        for n, line in enumerate(f.read_text("utf-8", errors="replace").splitlines()):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[config.text_key]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{f}:{n + 1}: not a JSON object with a {config.text_key!r} field ({err})"
                ) from None
            if in_validation(text, config.val_percent) == (split == "val"):
                docs.append(encode(text))
    tokens, starts = concat_documents(docs)
    fp = _fingerprint(files, f"{config.source}:{split}:{config.tokenizer}:{config.val_percent}")
    return tokens, starts, fp, vocab


def npy_tokens(config: DataConfig, split: str) -> tuple[np.ndarray, str]:
    """`(tokens, fingerprint)`: the memory-mapped stream(s), the split's share of each file."""
    files = data_files(config)
    parts = []
    for f in files:
        arr = np.load(f, mmap_mode="r")
        if arr.ndim != 1 or arr.dtype not in (np.uint16, np.uint32, np.int32):
            raise ValueError(
                f"{f}: need a 1-D uint16/uint32 token array, got {arr.dtype} {arr.shape}"
            )
        cut = int(len(arr) * (1 - config.val_percent / 100))
        parts.append(arr[:cut] if split == "train" else arr[cut:])
    # One file stays a memmap (nothing read until a window is asked for); several are joined.
    tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return tokens, _fingerprint(files, f"npy:{split}:{config.val_percent}:{config.eos_id}")
