"""Reading and writing the tensors of a checkpoint directory, one tensor at a time.

A directory holds `model.safetensors`, or shards listed by `model.safetensors.index.json`
(`{"weight_map": {tensor name: file}}`). Tensors are read with the `safetensors` package's
numpy loader (imported here, lazily: the core library does not need it); bf16 tensors, which
numpy has no dtype for, come back as `ml_dtypes.bfloat16` (the loader does that itself in
recent versions; older ones refuse, and the raw bytes are then read through the file's header).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct

import ml_dtypes
import numpy as np

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

_RAW_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
}


def _safetensors():
    try:
        import safetensors
    except ImportError as err:
        raise ValueError(
            "reading Hugging Face checkpoints needs the `safetensors` package: "
            'pip install -e ".[hf]"'
        ) from err
    return safetensors


def _raw(file: str, name: str) -> np.ndarray:
    """A tensor read through the safetensors header (8-byte length, JSON, then the data)."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(n))[name]
        start, end = info["data_offsets"]
        if info["dtype"] not in _RAW_DTYPES:
            raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
        f.seek(8 + n + start)
        data = f.read(end - start)
    return np.frombuffer(data, _RAW_DTYPES[info["dtype"]]).reshape(info["shape"])


class CheckpointReader:
    """The tensors of a checkpoint directory by name (a context manager; files stay open).

    Attributes:
      names: every tensor name in the checkpoint.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise ValueError(f"checkpoint path {self.path!r} is not a directory")
        index = os.path.join(self.path, INDEX)
        single = os.path.join(self.path, SINGLE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{index} has no readable weight_map ({err})") from None
            self._files = {n: os.path.join(self.path, f) for n, f in weight_map.items()}
        elif os.path.exists(single):
            self._files = None
        else:
            found = sorted(os.listdir(self.path))
            raise ValueError(
                f"{self.path} holds neither {SINGLE} nor {INDEX} (found: {', '.join(found)}); "
                "only safetensors checkpoints are read"
            )
        self._stack = contextlib.ExitStack()
        self._open: dict[str, object] = {}
        if self._files is None:
            handle = self._handle(single)
            self._files = dict.fromkeys(handle.keys(), single)
        missing = sorted({f for f in self._files.values() if not os.path.exists(f)})
        if missing:
            raise ValueError(f"{index}: shard files are missing: {', '.join(missing)}")
        self.names = sorted(self._files)

    def _handle(self, file: str):
        if file not in self._open:
            st = _safetensors()
            self._open[file] = self._stack.enter_context(st.safe_open(file, framework="numpy"))
        return self._open[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._files[name]).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a numpy array (bf16 as `ml_dtypes.bfloat16`)."""
        if name not in self._files:
            raise ValueError(f"{self.path}: the checkpoint has no tensor {name!r}")
        file = self._files[name]
        handle = self._handle(file)
        try:
            return handle.get_tensor(name)
        except (TypeError, ValueError):
            if handle.get_slice(name).get_dtype() not in _RAW_DTYPES:
                raise
            return _raw(file, name)

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_tensors(path: str, tensors, *, max_shard_bytes: int | None = None) -> list[str]:
    """Writes `(name, numpy array)` pairs (an iterable, consumed once) as `model.safetensors`,
    or as shards of at most `max_shard_bytes` (a tensor larger than that gets a shard of its
    own) with `model.safetensors.index.json`. Host memory holds one shard at a time.

    Returns the file names written.
    """
    from safetensors.numpy import save_file

    _safetensors()
    os.makedirs(path, exist_ok=True)
    shards: list[list[str]] = []
    weight_map: dict[str, str] = {}
    pending: dict[str, np.ndarray] = {}
    size = total = 0
    tmp_names: list[str] = []

    def flush():
        nonlocal pending, size
        if not pending:
            return
        name = f"shard-{len(tmp_names):05d}.tmp"
        save_file(pending, os.path.join(path, name), metadata={"format": "pt"})
        tmp_names.append(name)
        shards.append(list(pending))
        pending, size = {}, 0

    for name, array in tensors:
        array = np.ascontiguousarray(array)
        if max_shard_bytes is not None and pending and size + array.nbytes > max_shard_bytes:
            flush()
        pending[name] = array
        size += array.nbytes
        total += array.nbytes
    flush()
    if len(tmp_names) == 1 and max_shard_bytes is None:
        os.replace(os.path.join(path, tmp_names[0]), os.path.join(path, SINGLE))
        return [SINGLE]
    files = []
    for i, (tmp, names) in enumerate(zip(tmp_names, shards, strict=True)):
        final = f"model-{i + 1:05d}-of-{len(tmp_names):05d}.safetensors"
        os.replace(os.path.join(path, tmp), os.path.join(path, final))
        files.append(final)
        weight_map.update(dict.fromkeys(names, final))
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files
