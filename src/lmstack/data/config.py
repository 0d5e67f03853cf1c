"""`DataConfig`: every knob of the data pipeline, with defaults, in one frozen dataclass.

A YAML or JSON file maps onto it with nested sections for the two stages that have many knobs:

```yaml
jsonl_field: text
quality: {min_chars: 64, max_symbol_ratio: 0.4}
dedup: {shingle_size: 5, num_perm: 128, bands: 32, threshold: 0.8}
decontamination_ngram: 13
weights: {books: 0.7, wiki: 0.3}
val_fraction: 0.05
```

The whole config is recorded in the dataset manifest, so changing any knob changes the dataset version.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.data.dedup import DedupConfig
from lmstack.data.quality import QualityConfig
from lmstack.errors import InputError
from lmstack.textfile import read_settings_file


@dataclass(frozen=True)
class DataConfig:
    jsonl_field: str = "text"  # field of each JSONL record holding the text; dots reach nested fields
    max_document_chars: int = 20_000  # longer documents are cut at paragraph breaks
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontamination_ngram: int = 13  # words; a training doc sharing one such n-gram with an eval set goes
    weights: tuple[tuple[str, float], ...] = ()  # (source, weight) pairs; empty = natural proportions
    max_repeats: int = 1  # how many times mixing may repeat a source to reach its share
    val_fraction: float = 0.05  # share of curated documents held out for validation (at least one)
    seed: int = 0  # drives the validation split, mixing samples and shard order
    tokenizer_pattern: str = "gpt4"  # pre-tokenisation pattern when the pipeline trains the tokenizer
    tokenizer_max_chars: int = 3_000_000  # text the tokenizer is trained on (a sample of the train split)

    def __post_init__(self) -> None:
        if isinstance(self.weights, dict):  # accept a mapping, store sorted pairs (hashable, ordered)
            object.__setattr__(self, "weights", tuple(sorted(self.weights.items())))
        else:
            object.__setattr__(self, "weights", tuple(sorted((str(k), float(v)) for k, v in self.weights)))
        self.validate()

    def validate(self) -> None:
        q, d = self.quality, self.dedup
        problems = []
        if not self.jsonl_field:
            problems.append("jsonl_field must be a field name")
        if self.max_document_chars < 100:
            problems.append(f"max_document_chars must be ≥ 100, got {self.max_document_chars}")
        if q.min_chars < 0:
            problems.append(f"quality.min_chars must be ≥ 0, got {q.min_chars}")
        for name in (
            "max_symbol_ratio",
            "max_digit_ratio",
            "max_duplicate_line_fraction",
            "max_non_text_ratio",
        ):
            value = getattr(q, name)
            if not 0 <= value <= 1:
                problems.append(f"quality.{name} must be between 0 and 1, got {value}")
        if d.shingle_size < 1:
            problems.append(f"dedup.shingle_size must be ≥ 1, got {d.shingle_size}")
        if d.num_perm < 1 or d.bands < 1 or d.num_perm % d.bands:
            problems.append(
                f"dedup.num_perm ({d.num_perm}) must be a positive multiple of dedup.bands ({d.bands})"
            )
        if not 0 < d.threshold <= 1:
            problems.append(f"dedup.threshold must be in (0, 1], got {d.threshold}")
        if self.decontamination_ngram < 1:
            problems.append(f"decontamination_ngram must be ≥ 1, got {self.decontamination_ngram}")
        if any(not math.isfinite(w) or w < 0 for _, w in self.weights):
            problems.append(f"weights must be finite and ≥ 0, got {dict(self.weights)}")
        if self.max_repeats < 1:
            problems.append(f"max_repeats must be ≥ 1, got {self.max_repeats}")
        if not 0 < self.val_fraction < 1:
            problems.append(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.tokenizer_max_chars < 1:
            problems.append(f"tokenizer_max_chars must be ≥ 1, got {self.tokenizer_max_chars}")
        if problems:
            raise InputError("invalid data config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["weights"] = dict(self.weights)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Build from a (possibly partial) mapping; unknown keys are an error naming the valid ones."""
        values = dict(values)
        nested = {"quality": QualityConfig, "dedup": DedupConfig}
        for key, kind in nested.items():
            if key in values:
                section = values[key] or {}
                if not isinstance(section, dict):
                    raise InputError(f"data config section {key!r} must be a mapping, got {section!r}")
                _check_keys(section, kind, f"{key}.")
                values[key] = kind(**section)
        _check_keys(values, cls, "")
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"invalid data config: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> DataConfig:
        """Read a YAML (.yaml/.yml) or JSON file."""
        values = read_settings_file(path, what="data config")
        return cls.from_dict(values.get("data", values))


def _check_keys(values: dict[str, Any], kind: type, prefix: str) -> None:
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(
            f"unknown data config keys {[prefix + k for k in unknown]} — valid keys: {sorted(known)}"
        )
