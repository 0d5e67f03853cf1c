"""`prepare_dataset`: raw files to a versioned, tokenised dataset folder.

    extract ─► quality ─► exact dedup ─► near dedup ─► decontaminate ─► split ─► mix ─► tokenize ─► shards

The dataset folder (`out_dir`):

    train.bin, val.bin   token shards (see `shards.py`), EOS after every document
    tokenizer/           the tokenizer used (trained here on the curated training text unless given)
    manifest.json        inputs, config, outputs, counts; its digest is the dataset `version`
    report.txt           the same counts for people

The manifest is written last and any previous one is removed first, so a crash at any instant leaves a
folder that `is_prepared_dataset` rejects rather than one whose parts disagree. Every file is written
atomically. If `out_dir` already holds a dataset made from the same inputs, config and tokenizer (the
same *recipe*), it is reused as is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lmstack.atomic import replace_dir, writable_dir
from lmstack.data.config import DataConfig
from lmstack.data.decontaminate import build_eval_index, decontaminate
from lmstack.data.dedup import remove_exact_duplicates, remove_near_duplicates
from lmstack.data.extract import Document, InputFile, discover_files, extract_documents
from lmstack.data.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    digest,
    file_sha256,
    finalize,
    folder_hashes,
    read_manifest,
    write_manifest,
)
from lmstack.data.mix import MixReport, doc_order_key, mix_documents, text_bytes
from lmstack.data.quality import filter_quality
from lmstack.data.report import REPORT_NAME, format_report, write_report
from lmstack.data.shards import read_header, write_shard
from lmstack.data.split import split_train_val
from lmstack.errors import InputError

EOS_TOKEN = "<|endoftext|>"
SPLITS = ("train", "val")

__all__ = [
    "EOS_TOKEN",
    "REPORT_NAME",
    "DataConfig",
    "DatasetInfo",
    "TokenizerLike",
    "curate",
    "report_text",
    "is_prepared_dataset",
    "load_dataset_info",
    "prepare_dataset",
    "prepare_default_dataset",
]


class TokenizerLike(Protocol):
    """What the pipeline needs from a tokenizer (`lmstack.tokenizer.Tokenizer` provides it)."""

    @property
    def eos_id(self) -> int | None: ...

    @property
    def vocab_size(self) -> int: ...

    def encode_ordinary(self, text: str) -> list[int]: ...

    def save(self, directory: str | Path) -> Any: ...


@dataclass(frozen=True)
class DatasetInfo:
    """What a training run needs to know about a prepared dataset (read from its manifest)."""

    path: Path
    version: str
    vocab_size: int
    eos_id: int
    tokenizer_path: Path
    train_path: Path
    val_path: Path
    train_tokens: int  # including one EOS per document
    val_tokens: int
    train_documents: int  # = EOS tokens in the shard
    val_documents: int
    train_text_bytes: int  # UTF-8 bytes of the text behind the tokens (EOS adds none)
    val_text_bytes: int
    reused: bool = False

    @property
    def val_bytes_per_token(self) -> float:
        """Text bytes per token of the validation split (EOS included in the tokens): bits per byte =
        mean loss in nats / ln 2 / this ratio, when the loss is averaged over all val tokens."""
        return self.val_text_bytes / self.val_tokens


@dataclass
class Curated:
    train: list[Document]  # mixed, in shard order (repeats included)
    val: list[Document]  # in shard order
    counts: dict[str, Any]
    mix: MixReport

    def splits(self) -> dict[str, list[Document]]:
        return {"train": self.train, "val": self.val}


# ---------------------------------------------------------------- curation (pure: documents in, out)


def _require_some(docs: list[Document], stage: str, detail: str, fix: str) -> None:
    if not docs:
        raise InputError(f"everything was filtered out by {stage} ({detail}) — {fix}")


def curate(
    docs: list[Document], config: DataConfig, eval_docs: Iterable[Document] = (), *, log: Any = None
) -> Curated:
    """Run the curation stages on extracted documents; `counts` records each stage."""
    say = log or (lambda message: None)
    counts: dict[str, Any] = {"documents_extracted": len(docs)}

    docs, removed = filter_quality(docs, config.quality)
    counts["quality_removed"] = removed
    counts["after_quality"] = len(docs)
    say(f"quality: removed {sum(removed.values())} ({_fmt_removed(removed)}), {len(docs)} left")
    _require_some(
        docs, "the quality filters", _fmt_removed(removed), "loosen the `quality` thresholds in --config"
    )

    if config.dedup.exact:
        docs, n = remove_exact_duplicates(docs)
    else:
        n = 0
    counts["exact_duplicates_removed"] = n
    if config.dedup.near:
        docs, n = remove_near_duplicates(docs, config.dedup)
    else:
        n = 0
    counts["near_duplicates_removed"] = n
    counts["after_dedup"] = len(docs)
    say(
        f"dedup: removed {counts['exact_duplicates_removed']} exact and {n} near duplicates, {len(docs)} left"
    )

    index = build_eval_index([d.text for d in eval_docs], config.decontamination_ngram)
    docs, n = decontaminate(docs, index)
    counts["eval_ngrams"] = len(index)
    counts["contaminated_removed"] = n
    counts["after_decontamination"] = len(docs)
    if index.grams:
        say(f"decontaminate: removed {n} documents overlapping the eval sets, {len(docs)} left")
    _require_some(docs, "decontamination", f"{n} documents overlap the eval sets", "check the --eval files")

    train, val = split_train_val(docs, config.val_fraction, config.seed)
    counts["val_documents"] = len(val)
    counts["train_documents_before_mix"] = len(train)

    train, mix = mix_documents(train, dict(config.weights), max_repeats=config.max_repeats, seed=config.seed)
    _require_some(train, "mixing", "no training document left", "check the source weights")
    counts["train_documents"] = len(train)
    return Curated(shard_order(train, config.seed), val, counts, mix)


def shard_order(docs: list[Document], seed: int) -> list[Document]:
    """Interleave sources in a seeded order; repeated copies of a document get distinct ranks."""
    seen: dict[tuple[str, str], int] = {}
    keyed = []
    for doc in docs:
        copy = seen.get((doc.source, doc.origin), 0)
        seen[(doc.source, doc.origin)] = copy + 1
        keyed.append((doc_order_key(doc, seed, copy), doc))
    return [doc for _, doc in sorted(keyed, key=lambda pair: pair[0])]


def _fmt_removed(removed: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in removed.items())


# ---------------------------------------------------------------- the dataset folder


def prepare_dataset(
    inputs: list[Path | str],
    out_dir: Path | str,
    *,
    tokenizer: TokenizerLike | Path | str | None = None,
    vocab_size: int = 4096,
    config: DataConfig | None = None,
    eval_sets: Iterable[Path | str] = (),
    progress: bool = False,
    reuse: bool = True,
) -> DatasetInfo:
    """Curate `inputs` (text/JSONL/HTML files or folders), tokenise them and write the dataset folder.

    `tokenizer`: an object, or a folder `lmstack.tokenizer.Tokenizer.load` reads; None trains a BPE
    tokenizer of `vocab_size` ids (plus `<|endoftext|>`) on the curated training text.
    `eval_sets`: files whose long n-grams must not appear in the training data.
    """
    config = config or DataConfig()
    say = (lambda message: print(f"data: {message}", file=sys.stderr)) if progress else (lambda message: None)
    out = writable_dir(out_dir)
    files = discover_files(list(inputs), exclude=out.resolve())
    explicit = {Path(p).expanduser() for p in inputs if Path(p).expanduser().is_file()}
    eval_files = discover_files(list(eval_sets)) if eval_sets else []
    tok = _load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    if tok is None and vocab_size < 257:
        raise InputError(f"vocab_size must be ≥ 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    sources = {
        "inputs": _file_records(files),
        "eval_sets": _file_records(eval_files),
        "config": config.to_dict(),
    }

    with _scratch_dir(out / "tokenizer.tmp") as tok_tmp:
        if tok is not None:
            tok.save(tok_tmp)
            tok_spec: dict[str, Any] = {"given": folder_hashes(tok_tmp)}
        else:
            tok_spec = {"train": {"vocab_size": vocab_size, "pattern": config.tokenizer_pattern}}
        recipe = digest({"format_version": FORMAT_VERSION, **sources, "tokenizer": tok_spec})
        if reuse and (info := _reusable(out, recipe)) is not None:
            say(f"reusing the dataset in {out} (same inputs, config and tokenizer)")
            return info

        (out / MANIFEST_NAME).unlink(missing_ok=True)  # "not prepared" until the new manifest lands
        curated, counts = _extract_and_curate(files, eval_files, explicit, config, say)
        if tok is None:
            tok = _train_tokenizer(curated.train, vocab_size, config, progress, say)
            tok.save(tok_tmp)
        if tok.eos_id is None:
            raise InputError(
                f"the tokenizer has no {EOS_TOKEN} token — give one trained with it as a special token"
            )
        replace_dir(tok_tmp, out / "tokenizer")
    splits = {
        name: _write_split(out, name, docs, tok, progress, say) for name, docs in curated.splits().items()
    }

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "recipe": recipe,
        **sources,
        "tokenizer": {
            "path": "tokenizer",
            "trained_here": "train" in tok_spec,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "files": folder_hashes(out / "tokenizer"),
        },
        "splits": splits,
        "counts": counts,
        "mix": curated.mix.to_dict(),
    }
    write_report(out, finalize(manifest))
    manifest = write_manifest(out, manifest)
    say(f"wrote dataset {manifest['version'][:12]} to {out}")
    return load_dataset_info(out)


@contextlib.contextmanager
def _scratch_dir(path: Path) -> Iterator[Path]:
    """A folder that is gone afterwards unless it was moved into place (`replace_dir`)."""
    shutil.rmtree(path, ignore_errors=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _extract_and_curate(
    files: list[InputFile], eval_files: list[InputFile], explicit: set[Path], config: DataConfig, say: Any
) -> tuple[Curated, dict[str, Any]]:
    docs, stats = extract_documents(
        files, jsonl_field=config.jsonl_field, max_document_chars=config.max_document_chars, explicit=explicit
    )
    say(f"extract: {stats.documents} documents from {stats.files} files")
    if not docs:
        raise InputError(
            f"no text found in the inputs ({stats.files} files: {stats.empty_files} empty, "
            f"{stats.binary_files_skipped} binary) — give UTF-8 text, JSONL or HTML files"
        )
    eval_docs: list[Document] = []
    if eval_files:  # not cut into pieces: an n-gram across a cut would be missed
        eval_docs, _ = extract_documents(
            eval_files, jsonl_field=config.jsonl_field, max_document_chars=sys.maxsize
        )
    curated = curate(docs, config, eval_docs, log=say)
    counts = {
        "files": stats.files,
        "binary_files_skipped": stats.binary_files_skipped,
        "empty_files": stats.empty_files,
        **curated.counts,
    }
    return curated, counts


def _write_split(
    out: Path, name: str, docs: list[Document], tok: TokenizerLike, progress: bool, say: Any
) -> dict[str, Any]:
    say(f"tokenize: {name} split, {len(docs)} documents")
    path = out / f"{name}.bin"
    header = write_shard(
        path, _encode_all(tok, docs, progress, name), vocab_size=tok.vocab_size, eos_id=tok.eos_id
    )
    return {
        "file": path.name,
        "sha256": file_sha256(path),
        "tokens": header.n_tokens,
        "documents": len(docs),
        "text_bytes": sum(text_bytes(d) for d in docs),
        "dtype": header.dtype.name,
    }


def _file_records(files: list[InputFile]) -> list[dict[str, Any]]:
    return [
        {"source": f.source, "path": f.relpath, "sha256": file_sha256(f.path), "bytes": f.path.stat().st_size}
        for f in files
    ]


def _load_tokenizer(path: Path | str) -> TokenizerLike:
    path = Path(path)
    if not path.is_dir():
        raise InputError(
            f"tokenizer folder not found: {path} — give a folder written by `lmstack tokenizer train`"
        )
    from lmstack.tokenizer import Tokenizer

    return Tokenizer.load(path)


def _train_tokenizer(
    train: list[Document], vocab_size: int, config: DataConfig, progress: bool, say: Any
) -> TokenizerLike:
    try:
        from lmstack.tokenizer import Tokenizer
    except ImportError as exc:
        raise InputError(
            "no tokenizer trainer is installed (lmstack.tokenizer) — pass --tokenizer DIR"
        ) from exc
    texts, seen, chars = [], set(), 0
    for doc in train:  # shard order is a seeded shuffle, so a prefix is a fair sample of the mixture
        if (doc.source, doc.origin) in seen:
            continue
        seen.add((doc.source, doc.origin))
        texts.append(doc.text)
        chars += len(doc.text)
        if chars >= config.tokenizer_max_chars:
            break
    say(f"tokenizer: training a {vocab_size}-id BPE on {chars:,} characters")
    return Tokenizer.train(  # an iterator, so no document is ever mistaken for a file path
        iter(texts),
        vocab_size,
        pattern=config.tokenizer_pattern,
        special_tokens=(EOS_TOKEN,),
        progress=progress,
    )


def _encode_all(tok: TokenizerLike, docs: list[Document], progress: bool, name: str) -> Iterable[list[int]]:
    cache: dict[tuple[str, str], list[int]] = {}  # mixing may repeat a document; encode it once
    remaining: dict[tuple[str, str], int] = {}
    for doc in docs:
        remaining[(doc.source, doc.origin)] = remaining.get((doc.source, doc.origin), 0) + 1
    iterator: Iterable[Document] = docs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(docs, desc=f"tokenize {name}", unit="doc", file=sys.stderr)
    for doc in iterator:
        key = (doc.source, doc.origin)
        ids = cache.pop(key) if key in cache else tok.encode_ordinary(doc.text)
        remaining[key] -= 1
        if remaining[key]:  # keep it only while another copy is still to come
            cache[key] = ids
        yield ids


# ---------------------------------------------------------------- reading a prepared folder


def load_dataset_info(path: Path | str) -> DatasetInfo:
    """Read a prepared dataset's manifest (validated) into a `DatasetInfo`."""
    path = Path(path)
    manifest = read_manifest(path)
    splits, tok = manifest["splits"], manifest["tokenizer"]
    return DatasetInfo(
        path=path,
        version=manifest["version"],
        vocab_size=int(tok["vocab_size"]),
        eos_id=int(tok["eos_id"]),
        tokenizer_path=path / tok["path"],
        train_path=path / splits["train"]["file"],
        val_path=path / splits["val"]["file"],
        train_tokens=int(splits["train"]["tokens"]),
        val_tokens=int(splits["val"]["tokens"]),
        train_documents=int(splits["train"]["documents"]),
        val_documents=int(splits["val"]["documents"]),
        train_text_bytes=int(splits["train"]["text_bytes"]),
        val_text_bytes=int(splits["val"]["text_bytes"]),
    )


def is_prepared_dataset(path: Path | str) -> bool:
    """True for a folder holding a valid manifest and the shards and tokenizer it names."""
    path = Path(path)
    if not (path / MANIFEST_NAME).is_file():
        return False
    try:
        _check_outputs(path, read_manifest(path))
    except (InputError, KeyError, TypeError, OSError):
        return False
    return True


def _check_outputs(path: Path, manifest: dict[str, Any]) -> None:
    """Headers and sizes of the shards agree with the manifest; the tokenizer folder exists."""
    for name in SPLITS:
        entry = manifest["splits"][name]
        header = read_header(path / entry["file"])
        if header.n_tokens != entry["tokens"]:
            raise InputError(
                f"{path / entry['file']} does not match the manifest — re-run `lmstack data prepare`"
            )
    if not (path / manifest["tokenizer"]["path"]).is_dir():
        raise InputError(f"{path} has no tokenizer folder — re-run `lmstack data prepare`")


def _reusable(out: Path, recipe: str) -> DatasetInfo | None:
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(out)
        if manifest.get("recipe") != recipe:
            return None
        _check_outputs(out, manifest)
    except (InputError, KeyError, TypeError, OSError):
        return None
    return dataclasses.replace(load_dataset_info(out), reused=True)


def report_text(path: Path | str) -> str:
    """The human-readable report of a prepared dataset."""
    return format_report(read_manifest(path))


def prepare_default_dataset(out_dir: Path | str, **kwargs: Any) -> DatasetInfo:
    """`prepare_dataset` on the embedded default corpus (`lmstack.data.corpus`): its two sources are
    written as JSONL to a temporary folder, whose location never reaches the manifest."""
    import tempfile

    from lmstack.data.corpus import write_default_corpus

    with tempfile.TemporaryDirectory(prefix="lmstack-corpus-") as tmp:
        return prepare_dataset(write_default_corpus(tmp), out_dir, **kwargs)
