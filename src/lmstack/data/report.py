"""The human-readable report of a prepared dataset: counts per stage, the mix, token totals.

It is rendered from the manifest alone, so `report.txt` and the manifest can never disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.atomic import atomic_write_text

REPORT_NAME = "report.txt"


def _n(value: int) -> str:
    return f"{value:,}"


def format_report(manifest: dict[str, Any]) -> str:
    c, mix, splits, tok = manifest["counts"], manifest["mix"], manifest["splits"], manifest["tokenizer"]
    sources = sorted({i["source"] for i in manifest["inputs"]})
    removed = c["quality_removed"]
    lines = [
        f"lmstack dataset  version {manifest['version'][:16]}  (format {manifest['format_version']})",
        "",
        f"inputs          {_n(c['files'])} files from {len(sources)} sources "
        f"({_n(sum(i['bytes'] for i in manifest['inputs']))} bytes)",
        f"extract         {_n(c['documents_extracted'])} documents "
        f"({c['binary_files_skipped']} binary and {c['empty_files']} empty files skipped)",
        f"quality         -{_n(sum(removed.values()))}  ("
        + ", ".join(f"{k} {_n(v)}" for k, v in removed.items())
        + f")  -> {_n(c['after_quality'])}",
        f"dedup           -{_n(c['exact_duplicates_removed'])} exact, -{_n(c['near_duplicates_removed'])} near"
        f"  -> {_n(c['after_dedup'])}",
        f"decontaminate   -{_n(c['contaminated_removed'])}  ({_n(c['eval_ngrams'])} eval n-grams from "
        f"{len(manifest['eval_sets'])} files)  -> {_n(c['after_decontamination'])}",
        f"split           val {_n(c['val_documents'])} documents, train {_n(c['train_documents_before_mix'])}",
        f"mix             train {_n(c['train_documents'])} documents (repeats counted)",
        "",
        "mix of the train split (share of text bytes)",
        f"  {'source':<24}{'requested':>10}{'achieved':>10}{'docs before':>13}{'after':>8}",
    ]
    for source in sorted(mix["achieved"]):
        requested = mix["requested"].get(source)
        req = f"{100 * requested:.1f}%" if requested is not None else "natural"
        lines.append(
            f"  {source:<24}{req:>10}{100 * mix['achieved'][source]:>9.1f}%"
            f"{_n(mix['documents_before'][source]):>13}{_n(mix['documents_after'][source]):>8}"
        )
    lines += ["", f"tokens          vocab {_n(tok['vocab_size'])}, EOS id {tok['eos_id']}, "
              f"tokenizer {'trained here' if tok['trained_here'] else 'given'}"]  # fmt: skip
    for name, entry in splits.items():
        per_token = entry["text_bytes"] / entry["tokens"] if entry["tokens"] else 0.0
        lines.append(
            f"  {name:<6}{_n(entry['tokens']):>14} tokens ({entry['dtype']})  {_n(entry['text_bytes']):>13} "
            f"text bytes  {per_token:.2f} bytes/token  {_n(entry['documents'])} documents"
        )
    return "\n".join(lines) + "\n"


def write_report(folder: Path, manifest: dict[str, Any]) -> str:
    text = format_report(manifest)
    atomic_write_text(folder / REPORT_NAME, text)
    return text
