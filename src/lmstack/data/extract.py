"""Stage 1 — text extraction: files and folders to `Document`s.

Each input argument (a file or a folder) is one *source*, named after it (`books/` -> `books`,
`wiki.jsonl` -> `wiki`); sources are what the mixing stage weighs. Formats are chosen by extension:

- `.jsonl` / `.json`: one document per record, taken from a chosen field (dots reach nested fields);
- `.html` / `.htm` / `.xhtml`: visible text through the standard library's real HTML parser;
- anything else: UTF-8 plain text (a byte-order mark is dropped, undecodable bytes become U+FFFD
  so the quality stage can judge them).

A trailing `.gz` is decompressed first. Files holding NUL bytes are binary: inside a folder they are
skipped and counted, given by name they are an error. Long documents are cut at paragraph breaks
(`split_long_text`) so that a single large file still yields many documents for the validation split.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from lmstack.errors import InputError
from lmstack.textfile import looks_binary

JSON_SUFFIXES = {".jsonl", ".json"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}


@dataclass(frozen=True)
class Document:
    """One unit of text. `origin` is a machine-independent label: `<source>/<relative path>[:record]`."""

    text: str
    source: str
    origin: str


@dataclass(frozen=True)
class InputFile:
    """A file found under an input argument; `relpath` is relative to that argument (never absolute)."""

    path: Path
    source: str
    relpath: str


# ---------------------------------------------------------------- discovering files


def source_name(path: Path) -> str:
    """`data/wiki.jsonl.gz` -> `wiki`, `corpus/books/` -> `books`, `.` -> the folder's own name."""
    if path.name in {"", ".", ".."}:
        path = path.resolve()
    name = path.name if path.is_dir() else path.name.split(".")[0] or path.name
    return name or "input"


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.resolve().is_relative_to(folder)


def discover_files(inputs: list[str | Path], exclude: Path | None = None) -> list[InputFile]:
    """Expand the inputs into files, sorted by (source, relative path) so argument order never matters.

    Hidden files and folders are skipped, and so is anything under `exclude` (the output folder, so
    `prepare data/ --out data/prepared` never reads its own previous output back in)."""
    if not inputs:
        raise InputError("no input files given — pass text, JSONL or HTML files or folders")
    found: list[InputFile] = []
    used_names: dict[str, int] = {}
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise InputError(f"input not found: {raw} — check the path")
        base = source_name(path)
        used_names[base] = used_names.get(base, 0) + 1
        source = base if used_names[base] == 1 else f"{base}-{used_names[base]}"
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and not _inside(p, exclude)
            )
            if not files:
                raise InputError(f"input folder {raw} holds no files — give a folder with text files")
            found += [InputFile(p, source, p.relative_to(path).as_posix()) for p in files]
        else:
            found.append(InputFile(path, source, path.name))
    return sorted(found, key=lambda f: (f.source, f.relpath))


# ---------------------------------------------------------------- reading formats


def read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise InputError(f"{path.name}: not a valid gzip file ({exc}) — re-compress or unzip it") from exc
    return data


def decode_text(data: bytes) -> str:
    return data.decode("utf-8-sig", errors="replace")


def format_of(relpath: str) -> str:
    name = relpath[:-3] if relpath.endswith(".gz") else relpath
    suffix = Path(name).suffix.lower()
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in HTML_SUFFIXES:
        return "html"
    return "text"


def _field(record: object, field: str) -> object:
    for key in field.split("."):
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def json_records(text: str, name: str) -> list[object]:
    """A JSON Lines file, or a `.json` file holding one array of records."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name}: invalid JSON ({exc.msg} at line {exc.lineno}) — fix the file") from exc
        return list(records)
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"{name}:{lineno}: invalid JSON line ({exc.msg}) — each line must be one JSON object"
                ) from exc
    return records


def json_texts(text: str, field: str, name: str) -> list[tuple[int, str]]:
    """(record index, text) for every record whose `field` is a string; a bare string record is its text.

    Records without the field are skipped (the caller counts them); a file where no record has it is
    an error, since that is almost always the wrong field name."""
    records = json_records(text, name)
    out = []
    for index, record in enumerate(records):
        value = record if isinstance(record, str) else _field(record, field)
        if isinstance(value, str):
            out.append((index, value))
    if records and not out:
        keys = sorted(records[0]) if isinstance(records[0], dict) else []
        raise InputError(
            f"{name}: no record has a text field {field!r} (fields of the first record: {keys}) "
            "— choose the field with --jsonl-field"
        )
    return out


# Inside <pre>, newlines and spaces are content; they travel as these stand-ins while the layout
# whitespace around them is tidied, then are restored.
PRE_NEWLINE, PRE_SPACE = "\x00", "\x01"


class _TextExtractor(HTMLParser):
    """Collect visible text: skip scripts, styles and the head; paragraph-like elements become
    paragraphs (blank line between), line-like ones (`br`, `li`, table rows) end a line; `<pre>`
    keeps its whitespace."""

    SKIP = {"script", "style", "noscript", "template", "head", "svg", "iframe", "object"}
    LINE = {"br", "li", "tr", "dt", "dd", "option"}
    PARAGRAPH = {
        "p", "div", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "table", "section", "article",
        "header", "footer", "nav", "aside", "main", "blockquote", "pre", "hr", "dl", "figure",
        "figcaption", "title", "form", "fieldset", "address", "body",
    }  # fmt: skip

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0

    def _boundary(self, tag: str, start: bool = True) -> None:
        if tag in self.PARAGRAPH:
            self.parts.append("\n\n")
        elif tag in self.LINE and start:  # a line starts at <li>; its end needs no second break
            self.parts.append("\n")
        elif tag in ("td", "th") and start:
            self.parts.append(" ")

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self.skip_depth += 1
            return
        self._boundary(tag)
        if tag == "pre":
            self.pre_depth += 1

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self._boundary(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
            return
        if tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
        self._boundary(tag, start=False)

    def handle_data(self, data: str) -> None:
        if self.skip_depth:
            return
        data = data.replace(PRE_NEWLINE, "").replace(PRE_SPACE, "")
        if self.pre_depth:
            self.parts.append(data.strip("\n").replace("\n", PRE_NEWLINE).replace(" ", PRE_SPACE))
        else:  # outside <pre>, HTML whitespace is layout, not content: any run of it is one space
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """Visible text of an HTML page: paragraphs separated by one blank line, spaces squeezed."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    out: list[str] = []
    for line in "".join(parser.parts).split("\n"):
        line = re.sub(" +", " ", line).strip(" ")
        if line or (out and out[-1]):  # at most one blank line in a row
            out.append(line)
    return "\n".join(out).strip().replace(PRE_NEWLINE, "\n").replace(PRE_SPACE, " ")


# ---------------------------------------------------------------- splitting long documents


def split_long_text(text: str, max_chars: int) -> list[str]:
    """Cut `text` into pieces of at most `max_chars`, preferring paragraph, then line, boundaries."""
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    current = ""
    for unit in _units(text, max_chars):
        if current and len(current) + len(unit) > max_chars:
            pieces.append(current)
            current = ""
        current += unit
    if current:
        pieces.append(current)
    return [p.strip("\n") for p in pieces if p.strip()]


def _units(text: str, max_chars: int) -> Iterator[str]:
    for paragraph in text.split("\n\n"):
        paragraph += "\n\n"
        if len(paragraph) <= max_chars:
            yield paragraph
            continue
        for line in paragraph.splitlines(keepends=True):
            for start in range(0, len(line), max_chars):
                yield line[start : start + max_chars]


# ---------------------------------------------------------------- the stage


@dataclass
class ExtractStats:
    files: int = 0
    binary_files_skipped: int = 0
    empty_files: int = 0
    documents: int = 0
    text_bytes: int = 0


def extract_text(data: bytes, file: InputFile, jsonl_field: str = "text") -> list[Document]:
    """Documents held in one file's (decompressed, non-binary) bytes."""
    text = decode_text(data)
    label = f"{file.source}/{file.relpath}"
    kind = format_of(file.relpath)
    if kind == "json":
        return [Document(t, file.source, f"{label}:{i}") for i, t in json_texts(text, jsonl_field, label)]
    if kind == "html":
        text = html_to_text(text)
    return [Document(text, file.source, label)]


def extract_documents(
    files: list[InputFile],
    *,
    jsonl_field: str = "text",
    max_document_chars: int = 20_000,
    explicit: set[Path] | frozenset[Path] = frozenset(),
) -> tuple[list[Document], ExtractStats]:
    """Read every file into documents. Binary files in `explicit` (named on the command line) are an
    error; binary files found inside folders are skipped and counted."""
    stats = ExtractStats()
    docs: list[Document] = []
    for file in files:
        data = read_bytes(file.path)
        stats.files += 1
        if looks_binary(data):
            if file.path in explicit:
                raise InputError(
                    f"{file.source}/{file.relpath} looks binary (it holds NUL bytes) "
                    "— give UTF-8 text, JSONL or HTML"
                )
            stats.binary_files_skipped += 1
            continue
        if not data.strip():
            stats.empty_files += 1
            continue
        for doc in extract_text(data, file, jsonl_field):
            for i, piece in enumerate(split_long_text(doc.text.strip(), max_document_chars)):
                origin = doc.origin if i == 0 else f"{doc.origin}#{i}"
                docs.append(Document(piece, doc.source, origin))
    stats.documents = len(docs)
    stats.text_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    return docs, stats
