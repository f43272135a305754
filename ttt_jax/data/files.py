"""User data: text files, JSON lines, or pre-tokenized `.npy` token streams.

Splits: a directory of text files is split by file (a hash of its path under the folder, so the
split survives moving the folder; `in_validation`); a jsonl source by document (a hash of each
document's text); a single text file and every npy file by position (the last `val_percent` of
its tokens, cut at a token, are the validation split), since a hash would put the whole file on
one side.

Text is decoded as UTF-8 strictly: an undecodable byte is an error naming the file and its byte
offset, unless `errors="replace"`, which replaces such bytes by U+FFFD and reports how many.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import pathlib

import numpy as np

from ttt_jax.data.config import DataConfig
from ttt_jax.data.stream import concat_documents, in_validation
from ttt_jax.data.tokenizer import load_tokenizer

SUFFIX = {"text": ".txt", "jsonl": ".jsonl", "npy": ".npy"}
NPY_DTYPES = (np.uint16, np.uint32, np.int32)

log = logging.getLogger("ttt_jax.data")


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


class _Replacements:
    """A codecs error handler that replaces undecodable bytes by U+FFFD and counts them."""

    name = "ttt_jax.data.count_replace"

    def __init__(self):
        self.count = 0
        codecs.register_error(self.name, self)

    def __call__(self, err: UnicodeDecodeError):
        self.count += err.end - err.start
        return "\ufffd", err.end


_REPLACED = _Replacements()


def read_text(f: pathlib.Path, errors: str) -> str:
    """The file's text (UTF-8); ValueError naming the file and byte offset of a bad byte."""
    raw = f.read_bytes()
    if errors == "replace":
        return raw.decode("utf-8", errors=_REPLACED.name)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{f}: byte offset {err.start} is not UTF-8 ({err.reason}, byte "
            f"0x{raw[err.start]:02x}); convert the file, or pass --data.errors replace to "
            "replace undecodable bytes by U+FFFD (counted)"
        ) from None


def _jsonl_documents(f: pathlib.Path, config: DataConfig) -> list[str]:
    docs = []
    for n, line in enumerate(read_text(f, config.errors).splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record[config.text_key]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as err:
            raise ValueError(
                f"{f}:{n + 1}: not a JSON object with a {config.text_key!r} field ({err})"
            ) from None
        if not isinstance(text, str):
            raise ValueError(
                f"{f}:{n + 1}: field {config.text_key!r} is a {type(text).__name__}, not a "
                "string (the field is chosen by --data.text-key)"
            )
        docs.append(text)
    return docs


def text_documents(config: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray, str, int]:
    """`(tokens, doc_starts, fingerprint, vocab_size)` of a text or jsonl source's split."""
    encode, vocab = load_tokenizer(config.tokenizer)
    files = data_files(config)
    before = _REPLACED.count
    docs: list[np.ndarray] = []
    single_text = config.source == "text" and len(files) == 1
    for f in files:
        if single_text:
            tokens = encode(read_text(f, config.errors))
            cut = _position_cut(len(tokens), config.val_percent)
            docs.append(tokens[:cut] if split == "train" else tokens[cut:])
        elif config.source == "text":
            # By the path under the folder (like the stdlib corpus): the split of a file does
            # not change when the folder is moved or mounted elsewhere.
            key = f.relative_to(config.path).as_posix()
            if in_validation(key, config.val_percent) == (split == "val"):
                docs.append(encode(read_text(f, config.errors)))
        else:
            for text in _jsonl_documents(f, config):
                if in_validation(text, config.val_percent) == (split == "val"):
                    docs.append(encode(text))
    replaced = _REPLACED.count - before
    if replaced and split == "train":
        log.warning(
            "%d undecodable bytes under %s were replaced by U+FFFD (--data.errors replace)",
            replaced,
            config.path,
        )
    tokens, starts = concat_documents(docs)
    fp = _fingerprint(files, f"{config.source}:{split}:{config.tokenizer}:{config.val_percent}")
    return tokens, starts, fp, vocab


def _position_cut(n: int, val_percent: float) -> int:
    """Tokens `[0, cut)` train, `[cut, n)` validation."""
    return int(n * (1 - val_percent / 100))


def check_token_range(f: pathlib.Path, arr: np.ndarray, vocab_size: int | None) -> None:
    """Every id of `arr` in `[0, vocab_size)` (ValueError naming the file and a position)."""
    if vocab_size is None or len(arr) == 0:
        return
    hi = int(arr.max())
    if hi >= vocab_size:
        at = int(np.argmax(arr >= vocab_size))
        raise ValueError(
            f"{f}: token id {hi} (first out-of-range id {int(arr[at])} at position {at}) is "
            f"outside the model's vocab [0, {vocab_size}): pass --model.vocab-size {hi + 1} "
            "or fix the data"
        )
    if np.issubdtype(arr.dtype, np.signedinteger):
        lo = int(arr.min())
        if lo < 0:
            at = int(np.argmax(arr < 0))
            raise ValueError(f"{f}: negative token id {lo} at position {at}")


def npy_tokens(
    config: DataConfig, split: str, vocab_size: int | None = None
) -> tuple[np.ndarray, str]:
    """`(tokens, fingerprint)`: the memory-mapped stream(s), the split's share of each file.

    With `vocab_size`, every token id (and `eos_id`) is checked to lie in `[0, vocab_size)`.
    """
    files = data_files(config)
    parts = []
    for f in files:
        arr = np.load(f, mmap_mode="r")
        if arr.ndim != 1 or arr.dtype not in NPY_DTYPES:
            raise ValueError(
                f"{f}: need a 1-D uint16/uint32 token array, got {arr.dtype} {arr.shape}"
            )
        if split == "train":  # one pass over each file, not one per split
            check_token_range(f, arr, vocab_size)
        cut = _position_cut(len(arr), config.val_percent)
        parts.append(arr[:cut] if split == "train" else arr[cut:])
    # One file stays a memmap (nothing read until a window is asked for); several are joined.
    tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return tokens, _fingerprint(files, f"npy:{split}:{config.val_percent}:{config.eos_id}")
