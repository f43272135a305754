"""The embedded default corpus: bytes of the Python standard library's own sources.

No download and nothing shipped: every `*.py` file under `sysconfig.get_paths()["stdlib"]`
(site-packages and dist-packages excluded), sorted by relative path, each file one document of
raw UTF-8 bytes (vocab 256). A file belongs to the validation split when the SHA-1 of its
relative path, taken mod 10000, is below `val_percent * 100` (`stream.in_validation`), so the
split depends only on the file list, never on file order or contents. The corpus is deterministic
for a given interpreter (CPython 3.11: about 1800 files, 31 MB); its fingerprint (interpreter
version plus every path and size) is stored with checkpoints, so a run resumed under another
interpreter is flagged.
"""

from __future__ import annotations

import hashlib
import pathlib
import sys
import sysconfig

import numpy as np

from ttt_jax.data.stream import concat_documents, in_validation

EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")


def stdlib_files() -> tuple[pathlib.Path, list[str]]:
    """The stdlib root and the sorted relative (POSIX) paths of its `.py` files."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    rel = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not any(part in EXCLUDED_DIRS for part in p.relative_to(root).parts)
    )
    if not rel:
        raise RuntimeError(
            f"no .py files under the stdlib directory {root}: this interpreter ships without "
            "sources; use --data.source text/jsonl/npy or mqar"
        )
    return root, rel


def stdlib_documents(split: str, val_percent: float) -> tuple[np.ndarray, np.ndarray, str]:
    """`(tokens uint8, doc_starts, fingerprint)` of one split ("train" or "val")."""
    root, rel = stdlib_files()
    chosen = [r for r in rel if in_validation(r, val_percent) == (split == "val")]
    docs = [np.frombuffer((root / r).read_bytes(), np.uint8) for r in chosen]
    tokens, starts = concat_documents(docs)
    listing = "\n".join(f"{r}:{(root / r).stat().st_size}" for r in chosen)
    fp = hashlib.sha1(f"{sys.version_info[:3]}|{listing}".encode()).hexdigest()
    return tokens, starts, f"stdlib:{split}:{val_percent}:{fp}"
