"""Fine-tuning data: JSONL records -> conversations -> (ids, labels) examples -> padded or packed batches.

Records, one JSON object a line:

    {"prompt": "...", "response": "..."}                      one user turn, one assistant turn
    {"messages": [{"role": "user", "content": "..."}, ...]}   a conversation
    {"prompt": ..., "chosen": ..., "rejected": ...}           a preference pair (DPO); prompt, chosen
                                                              and rejected are strings or message lists

Every conversation is rendered by `Tokenizer.render_chat`, whose assistant mask says which tokens the
model is trained on: labels are the ids there and -100 (ignored by the cross-entropy) elsewhere, so the
model learns to answer, not to predict the user's words.

An example longer than the sequence length is dropped, or cut keeping its end (`left`) or its start
(`right`); what happened to how many is counted in `ExampleStats`, never silent. One that is left with
no assistant token is dropped and counted too.

Packing concatenates consecutive examples into rows of at most `seq_len` tokens with positions
restarting at 0 at each example, and `segments` numbering the examples of a row. The row runs through
the model as one sequence; the segments are its document mask (`model.masks.attention_mask`): a token
attends only to earlier tokens of its own example, so the packed loss is exactly the unpacked one, with
no compute spent on padding (Krell et al. 2021, "Efficient sequence packing without
cross-contamination").
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmstack.errors import InputError
from lmstack.textfile import read_text_file

IGNORE = -100  # label of a token the loss skips (torch's cross-entropy ignore_index)
TRUNCATE = ("drop", "left", "right")


@dataclass(frozen=True)
class Record:
    """One JSONL line: a conversation (SFT) or a prompt with a chosen and a rejected reply (DPO)."""

    line: int
    messages: tuple[dict[str, str], ...] = ()
    chosen: tuple[dict[str, str], ...] = ()
    rejected: tuple[dict[str, str], ...] = ()


def _messages(value: Any, role: str, where: str, name: str) -> tuple[dict[str, str], ...]:
    """A string as one `role` message, or a message list checked field by field."""
    if isinstance(value, str):
        if not value.strip():
            raise InputError(f"{where}: {name!r} is empty — give it some text, or remove the line")
        return ({"role": role, "content": value},)
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: {name!r} must be a string or a non-empty list of messages")
    out = []
    for k, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise InputError(
                f"{where}: {name}[{k}] must be an object with string 'role' and 'content' — fix that message"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _require(obj: dict, keys: tuple[str, ...], where: str, fix: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)} — {fix}")


def parse_record(obj: Any, kind: str, path: str | Path = "<record>", line: int = 0) -> Record:
    """One record of `kind` "sft" or "dpo"; errors name it as PATH:LINE."""
    where = f"{path}:{line}"
    if not isinstance(obj, dict):
        raise InputError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    if kind == "dpo":
        _require(
            obj,
            ("prompt", "chosen", "rejected"),
            where,
            'a preference record needs {"prompt", "chosen", "rejected"}',
        )
        prompt = _messages(obj["prompt"], "user", where, "prompt")
        chosen = _messages(obj["chosen"], "assistant", where, "chosen")
        rejected = _messages(obj["rejected"], "assistant", where, "rejected")
        if chosen == rejected:
            raise InputError(f"{where}: 'chosen' and 'rejected' are the same — a pair must differ")
        return Record(line, prompt, chosen, rejected)
    if "messages" in obj:
        messages = _messages(obj["messages"], "user", where, "messages")
        answers = [m for m in messages if m["role"] == "assistant"]
        if not answers or not any(m["content"].strip() for m in answers):
            raise InputError(
                f"{where}: the conversation has no non-empty assistant message — nothing to learn"
            )
        return Record(line, messages)
    _require(
        obj,
        ("prompt", "response"),
        where,
        'give {"prompt", "response"} or {"messages": [{"role", "content"}, ...]}',
    )
    prompt = _messages(obj["prompt"], "user", where, "prompt")
    response = _messages(obj["response"], "assistant", where, "response")
    return Record(line, prompt + response)


def read_records(path: str | Path, kind: str = "sft") -> list[Record]:
    """Every record of a JSONL file; the first bad line raises, naming its line number and the fix."""
    path = Path(path).expanduser()
    text = read_text_file(path, what="JSONL data file")
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg}) — one JSON object per line") from None
        records.append(parse_record(obj, kind, path, number))
    if not records:
        raise InputError(f"{path} holds no records — give one JSON object per line")
    return records


# ---- examples ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]
    labels: tuple[int, ...]  # ids where the assistant wrote them, IGNORE elsewhere (not yet shifted)
    line: int = 0


@dataclass
class ExampleStats:
    """What happened to the records on their way to examples (reported, never silent)."""

    records: int = 0
    kept: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    dropped_no_target: int = 0  # no assistant token left after truncation
    lines_dropped: list[int] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.kept} of {self.records} examples kept"]
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped as too long")
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.dropped_no_target:
            parts.append(f"{self.dropped_no_target} dropped with no assistant token left")
        if self.lines_dropped:
            shown = ", ".join(map(str, self.lines_dropped[:10])) + (
                ", ..." if len(self.lines_dropped) > 10 else ""
            )
            parts.append(f"dropped lines {shown}")
        return ", ".join(parts)


def labels_from_mask(ids: Sequence[int], mask: Sequence[bool]) -> tuple[int, ...]:
    return tuple(i if m else IGNORE for i, m in zip(ids, mask))


def fit_length(
    ids: Sequence[int], labels: Sequence[int], max_len: int, truncate: str
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(ids, labels) within `max_len` tokens: as they are, cut (`left` keeps the end, `right` the start),
    or None when too long and `truncate` is `drop`."""
    if len(ids) <= max_len:
        return tuple(ids), tuple(labels)
    if truncate == "drop":
        return None
    cut = slice(len(ids) - max_len, None) if truncate == "left" else slice(0, max_len)
    return tuple(ids[cut]), tuple(labels[cut])


def sft_examples(
    tokenizer: Any, records: Iterable[Record], max_len: int, truncate: str = "drop"
) -> tuple[list[Example], ExampleStats]:
    """Render each record's conversation and cut it to `max_len` tokens by `truncate`."""
    if truncate not in TRUNCATE:
        raise InputError(f"unknown truncate policy {truncate!r} — use one of {', '.join(TRUNCATE)}")
    stats, out = ExampleStats(), []
    for record in records:
        stats.records += 1
        ids, mask = tokenizer.render_chat(list(record.messages))
        fitted = fit_length(ids, labels_from_mask(ids, mask), max_len, truncate)
        if fitted is None:
            stats.dropped_too_long += 1
            stats.lines_dropped.append(record.line)
            continue
        if len(fitted[0]) < len(ids):
            stats.truncated += 1
        if all(label == IGNORE for label in fitted[1][1:]):  # the first label is never predicted
            stats.dropped_no_target += 1
            stats.lines_dropped.append(record.line)
            continue
        stats.kept += 1
        out.append(Example(*fitted, line=record.line))
    return out, stats


# ---- batches -----------------------------------------------------------------------------------------


def pad_batch(examples: Sequence[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch: ids, labels (IGNORE on padding), positions 0..len-1, attention mask (B, T)."""
    T = max(len(e.ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids[b, :n] = torch.tensor(e.ids)
        labels[b, :n] = torch.tensor(e.labels)
        mask[b, :n] = True
    positions = torch.arange(T).expand(B, T).clone()
    return {"ids": ids, "labels": labels, "positions": positions, "mask": mask}


def pack_rows(examples: Sequence[Example], seq_len: int) -> list[list[Example]]:
    """Greedy packing in order: consecutive examples share a row while they fit in `seq_len` tokens."""
    rows: list[list[Example]] = []
    used = seq_len + 1
    for e in examples:
        if used + len(e.ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += len(e.ids)
    return rows


def packed_batch(rows: Sequence[Sequence[Example]], seq_len: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Packed rows (B, seq_len): ids, labels, positions restarting at each example, `segments` (the
    example's index in its row, -1 on padding) and the padding mask."""
    B = len(rows)
    ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, seq_len), dtype=torch.long)
    segments = torch.full((B, seq_len), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for s, e in enumerate(row):
            n = len(e.ids)
            ids[b, start : start + n] = torch.tensor(e.ids)
            labels[b, start : start + n] = torch.tensor(e.labels)
            labels[b, start] = IGNORE  # never predicted alone: not from the previous example's end either
            positions[b, start : start + n] = torch.arange(n)
            segments[b, start : start + n] = s
            start += n
    return {"ids": ids, "labels": labels, "positions": positions, "segments": segments, "mask": segments >= 0}
