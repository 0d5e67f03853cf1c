"""Interoperability with other formats: Hugging Face checkpoint folders (later: GGUF)."""

from lmstack.interop.hf import from_pretrained, save_pretrained
from lmstack.interop.hf_config import config_from_hf, config_to_hf

__all__ = ["config_from_hf", "config_to_hf", "from_pretrained", "save_pretrained"]
