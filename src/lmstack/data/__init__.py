"""Data curation: raw text to versioned token shards, and the batches training reads from them.

One module per stage, in pipeline order: `extract` (files to documents), `quality` (heuristic
filters), `dedup` (exact and MinHash/LSH), `decontaminate` (eval-set n-grams), `split` (validation
hold-out), `mix` (per-source weights), then `shards` (binary token files) and `manifest` (the dataset
version). `pipeline.prepare_dataset` runs them all; `loader` feeds training; `corpus` is the embedded
default corpus. Names are re-exported lazily so importing this package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "lmstack.data.config",
    "DatasetInfo": "lmstack.data.pipeline",
    "prepare_dataset": "lmstack.data.pipeline",
    "prepare_default_dataset": "lmstack.data.pipeline",
    "is_prepared_dataset": "lmstack.data.pipeline",
    "load_dataset_info": "lmstack.data.pipeline",
    "TokenBatches": "lmstack.data.loader",
    "eval_batches": "lmstack.data.loader",
    "default_corpus": "lmstack.data.corpus",
    "write_default_corpus": "lmstack.data.corpus",
    "Document": "lmstack.data.extract",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmstack.data' has no attribute {name!r}")
