"""The training configuration: frozen dataclasses, validated at construction, written to the
run directory as `config.json`. `python -m train --help` lists every field."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Literal

from train.sharding import DEFAULT_RULES
from ttt_jax.data import DataConfig
from ttt_jax.models import PRESETS, ModelConfig, preset


def _positive(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _int_in(name: str, value, lo: int, hi: int | None = None):
    """An int in `[lo, hi)` (`hi` None: unbounded)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < lo
        or (hi is not None and value >= hi)
    ):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ValueError(f"{name} must be an int {span}, got {value!r}")


def _bools(cls_name: str, obj, *fields: str):
    for f in fields:
        if not isinstance(getattr(obj, f), bool):
            raise ValueError(f"{cls_name}.{f} must be a bool, got {getattr(obj, f)!r}")


def _finite(name: str, value, lo: float = 0.0, strict: bool = False):
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < lo
        or (strict and value == lo)
    ):
        raise ValueError(
            f"{name} must be a finite number {'>' if strict else '>='} {lo}, got {value!r}"
        )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup + cosine, global-norm clipping; optionally Muon for matrices.

    Attributes:
      lr: peak learning rate (AdamW; Muon's AdamW part).
      warmup_steps: linear warmup from 0.
      min_lr_ratio: the cosine ends at `min_lr_ratio * lr`.
      weight_decay: decoupled decay (not on norms, biases, fast-weight initial values).
      b1, b2, eps: Adam moments.
      clip_norm: global gradient-norm clip.
      muon: Muon (`optax.contrib.muon`) for projection matrices.
      muon_lr: Muon's peak learning rate.
    """

    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    muon: bool = False
    muon_lr: float = 0.02

    def __post_init__(self):
        _finite("OptimConfig.lr", self.lr, strict=True)
        _finite("OptimConfig.muon_lr", self.muon_lr, strict=True)
        _finite("OptimConfig.weight_decay", self.weight_decay)
        _finite("OptimConfig.clip_norm", self.clip_norm, strict=True)
        _finite("OptimConfig.eps", self.eps, strict=True)
        _int_in("OptimConfig.warmup_steps", self.warmup_steps, 0)
        _bools("OptimConfig", self, "muon")
        v = self.min_lr_ratio
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {v!r}")
        for f in ("b1", "b2"):  # 1 would divide by zero in Adam's bias correction
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1:
                raise ValueError(f"OptimConfig.{f} must be in [0, 1), got {v!r}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh `(data, fsdp, tensor)`; one axis may be -1 (fills the devices).

    Attributes:
      data, fsdp, tensor: axis sizes.
      rules: logical parameter axis -> mesh axis (None: replicated).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple[tuple[str, str | None], ...] = DEFAULT_RULES

    def __post_init__(self):
        for f in ("data", "fsdp", "tensor"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
                raise ValueError(f"MeshConfig.{f} must be a positive int or -1, got {v!r}")
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            raise ValueError(
                f"MeshConfig: at most one axis may be -1, got data={self.data} fsdp={self.fsdp} "
                f"tensor={self.tensor}"
            )
        for name, axis in self.rules:
            if axis not in (None, "data", "fsdp", "tensor"):
                raise ValueError(f"MeshConfig.rules maps {name!r} to unknown mesh axis {axis!r}")

    @property
    def sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in `<run_dir>/checkpoints` (async, atomic).

    Attributes:
      every: save every this many steps (and at the end, and on SIGTERM/SIGINT).
      keep_last: keep the newest N.
      keep_every: also keep every checkpoint whose step is a multiple of K (None: no).
      async_save: write in the background while training continues.
    """

    every: int = 100
    keep_last: int = 2
    keep_every: int | None = None
    async_save: bool = True

    def __post_init__(self):
        _positive("CheckpointConfig.every", self.every)
        _positive("CheckpointConfig.keep_last", self.keep_last)
        _positive("CheckpointConfig.keep_every", self.keep_every, allow_none=True)
        _bools("CheckpointConfig", self, "async_save")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """What the user sees and what is recorded.

    Attributes:
      every: write metrics (JSONL, TensorBoard) every N steps.
      eval_every: evaluate every N steps (and at the end).
      eval_batches: batches per evaluation.
      tensorboard: also write TensorBoard events (needs tensorboardX).
      progress: show the tqdm progress bar.
    """

    every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        for f in ("every", "eval_every", "eval_batches"):
            _positive(f"LogConfig.{f}", getattr(self, f))
        _bools("LogConfig", self, "tensorboard", "progress")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host setup (`jax.distributed.initialize`). Unset fields come from the usual
    environment variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or from
    the cluster's (SLURM, Open MPI) through JAX's auto-detection when `auto` is set.

    Attributes:
      coordinator: `host:port` of process 0.
      num_processes: number of processes.
      process_id: this process's id.
      auto: let JAX detect the cluster (SLURM, Open MPI, TPU pods).
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    def __post_init__(self):
        _positive("DistributedConfig.num_processes", self.num_processes, allow_none=True)
        if self.process_id is not None:
            _int_in("DistributedConfig.process_id", self.process_id, 0, self.num_processes)
        _bools("DistributedConfig", self, "auto")
        c = self.coordinator
        if c is not None:
            host, _, port = c.rpartition(":") if isinstance(c, str) else ("", "", "")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"DistributedConfig.coordinator must be host:port (port 1-65535), got {c!r}"
                )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. `python -m train` trains the `tiny` preset on the stdlib corpus.

    Attributes:
      preset: model preset name (`ttt_jax.models.presets`); `--model.*` overrides its fields.
      model: the model (default: the preset's).
      data: the data.
      seq: sequence length, or `auto` (the memory planner picks the largest that fits).
      batch_size: global batch in sequences (all devices, all micro-batches).
      grad_accum: micro-batches per step (gradients summed before one update).
      steps: total optimizer steps.
      seed: parameter init and data order.
      run_dir: checkpoints, metrics and config (default `runs/<preset>`, or
        `runs/finetune-<name>` with `init_from`); a run found there is resumed.
      fresh: delete an existing run in run_dir instead of resuming it.
      stop_after: stop (with a checkpoint) after this step, as a preemption would.
      nonfinite: `stop` at a non-finite loss (exit 3), or `skip` the update and count it.
      memory_budget_gb: device memory for `--seq auto` (default: the device's).
      peak_flops: peak FLOP/s per device for MFU (default: a table of known accelerators).
      init_from: start from a pretrained model (`train.init_from`): a Hugging Face checkpoint
        directory or a ttt-jax run directory. The model is the checkpoint's (`--model.*` sets
        what keeps its weights: precision, remat, options, `--model.retrofit.*`), text data is
        read with its tokenizer, and a resumed run restores its own checkpoint instead.
      only_new_params: train only the parameters the retrofit adds (`--model.retrofit.*`); the
        pretrained ones are frozen (no update, no gradient, no optimizer state).
      optim, mesh, checkpoint, log, dist: see their classes.
    """

    preset: str = "tiny"
    model: ModelConfig = PRESETS["tiny"]
    data: DataConfig = DataConfig()
    seq: int | Literal["auto"] = 128
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 200
    seed: int = 0
    run_dir: str | None = None
    fresh: bool = False
    stop_after: int | None = None
    nonfinite: Literal["stop", "skip"] = "stop"
    memory_budget_gb: float | None = None
    peak_flops: float | None = None
    init_from: str | None = None
    only_new_params: bool = False
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    dist: DistributedConfig = DistributedConfig()

    def __post_init__(self):
        preset(self.preset)  # raises listing the valid names
        if self.seq != "auto":
            _positive("TrainConfig.seq", self.seq)
        _positive("TrainConfig.batch_size", self.batch_size)
        _positive("TrainConfig.grad_accum", self.grad_accum)
        _positive("TrainConfig.steps", self.steps)
        _positive("TrainConfig.stop_after", self.stop_after, allow_none=True)
        _int_in("TrainConfig.seed", self.seed, 0, 2**32)
        _bools("TrainConfig", self, "fresh", "only_new_params")
        self._check_init_from()
        if self.run_dir is not None and (not isinstance(self.run_dir, str) or not self.run_dir):
            raise ValueError(f"TrainConfig.run_dir must be a non-empty path, got {self.run_dir!r}")
        if self.memory_budget_gb is not None:
            _finite("TrainConfig.memory_budget_gb", self.memory_budget_gb, strict=True)
        if self.peak_flops is not None:
            _finite("TrainConfig.peak_flops", self.peak_flops, strict=True)
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"TrainConfig.batch_size={self.batch_size} is not divisible by "
                f"grad_accum={self.grad_accum} (remainder {self.batch_size % self.grad_accum})"
            )
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"TrainConfig.nonfinite={self.nonfinite!r} is not 'stop' or 'skip'")
        if self.data.source == "mqar" and self.data.mqar_vocab > self.model.vocab_size:
            raise ValueError(
                f"DataConfig.mqar_vocab={self.data.mqar_vocab} exceeds "
                f"ModelConfig.vocab_size={self.model.vocab_size}"
            )
        eos = self.data.eos_id
        if eos is not None and eos >= self.model.vocab_size:
            raise ValueError(
                f"DataConfig.eos_id={eos} is outside the model's vocab: "
                f"ModelConfig.vocab_size={self.model.vocab_size}"
            )
        if self.data.source == "stdlib" and self.model.vocab_size < 256:
            raise ValueError(
                f"the stdlib corpus is bytes (256 ids); ModelConfig.vocab_size="
                f"{self.model.vocab_size} is too small"
            )

    def _check_init_from(self):
        # The checkpoint itself is checked by `train.init_from.check` when a run starts (the
        # config of a finished run stays readable after the checkpoint moves).
        path = self.init_from
        if path is not None and (not isinstance(path, str) or not path):
            raise ValueError(f"TrainConfig.init_from must be a non-empty path, got {path!r}")
        if self.only_new_params:
            if path is None:
                raise ValueError(
                    "TrainConfig.only_new_params needs init_from (the pretrained model whose "
                    "parameters stay frozen)"
                )
            if not self.model.retrofit.active:
                raise ValueError(
                    "TrainConfig.only_new_params: the model has no retrofit, so no new parameters "
                    "to train (set --model.retrofit.inplace-layers, npt-layers or branch-layers)"
                )

    @property
    def resolved_run_dir(self) -> str:
        if self.run_dir is not None:
            return self.run_dir
        if self.init_from is not None:
            name = os.path.basename(os.path.normpath(self.init_from)) or "model"
            return f"runs/finetune-{name}"
        return f"runs/{self.preset}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str)
