"""Offline training data: the embedded stdlib byte corpus, synthetic MQAR, user files; packed
documents with segment ids; deterministic, resumable batches."""

from ttt_jax.data.batches import Batches
from ttt_jax.data.config import SOURCES, DataConfig
from ttt_jax.data.dataset import Dataset, make_dataset
from ttt_jax.data.mqar import MQAR
from ttt_jax.data.stream import TokenStream

__all__ = ["SOURCES", "Batches", "DataConfig", "Dataset", "MQAR", "TokenStream", "make_dataset"]
