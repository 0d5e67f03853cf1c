"""lmstack: the whole large-language-model stack in one readable PyTorch package.

The public API is re-exported here lazily (PEP 562) so `import lmstack` stays cheap and each area
loads only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "lmstack.config",
    "build_model": "lmstack.model",
    "from_pretrained": "lmstack.interop.hf",
    "save_pretrained": "lmstack.interop.hf",
    "Tokenizer": "lmstack.tokenizer",
    "TrainConfig": "lmstack.train",
    "train": "lmstack.train",
    "generate": "lmstack.infer",
    "generate_text": "lmstack.infer",
    "InputError": "lmstack.errors",
    "RunError": "lmstack.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmstack' has no attribute {name!r}")
