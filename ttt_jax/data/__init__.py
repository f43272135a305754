"""Offline training data: the embedded stdlib byte corpus, synthetic MQAR, user files; packed
documents with segment ids; deterministic, resumable batches."""

# isort: skip_file
# (The banners group the index by topic; isort would sort the imports across them.)

# --- what to train on
from ttt_jax.data.config import SOURCES, DataConfig
from ttt_jax.data.dataset import Dataset, make_dataset
from ttt_jax.data.mqar import MQAR

# --- packed token streams and resumable batches
from ttt_jax.data.stream import TokenStream
from ttt_jax.data.batches import Batches

__all__ = [
    # what to train on
    "SOURCES",
    "DataConfig",
    "Dataset",
    "make_dataset",
    "MQAR",
    # packed token streams and resumable batches
    "TokenStream",
    "Batches",
]
