import gzip
import json

import pytest

from lmstack.data.extract import (
    discover_files,
    extract_documents,
    html_to_text,
    json_texts,
    split_long_text,
)
from lmstack.errors import InputError


def test_plain_text_folder_sorted_and_hidden_files_skipped(tmp_path):
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second book")
    (folder / "a.txt").write_text("first book")
    (folder / "sub" / "c.md").write_text("third book")
    (folder / ".hidden.txt").write_text("secret")
    files = discover_files([folder])
    assert [f.relpath for f in files] == ["a.txt", "b.txt", "sub/c.md"]
    assert {f.source for f in files} == {"books"}
    docs, stats = extract_documents(files)
    assert [d.text for d in docs] == ["first book", "second book", "third book"]
    assert docs[0].origin == "books/a.txt"
    assert stats.files == 3 and stats.documents == 3


def test_argument_order_does_not_matter(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    (tmp_path / "y.txt").write_text("y")
    a = discover_files([tmp_path / "x.txt", tmp_path / "y.txt"])
    b = discover_files([tmp_path / "y.txt", tmp_path / "x.txt"])
    assert a == b


def test_jsonl_chosen_field_nested_and_missing(tmp_path):
    path = tmp_path / "wiki.jsonl"
    records = [{"body": "alpha", "meta": {"t": "nested one"}}, {"title": "no body"}, {"body": "beta"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    docs, _ = extract_documents(discover_files([path]), jsonl_field="body")
    assert [(d.text, d.source, d.origin) for d in docs] == [
        ("alpha", "wiki", "wiki/wiki.jsonl:0"),
        ("beta", "wiki", "wiki/wiki.jsonl:2"),
    ]
    docs, _ = extract_documents(discover_files([path]), jsonl_field="meta.t")
    assert [d.text for d in docs] == ["nested one"]
    with pytest.raises(InputError, match="--jsonl-field"):
        extract_documents(discover_files([path]), jsonl_field="text")


def test_json_array_and_bad_jsonl_line(tmp_path):
    assert json_texts('[{"text": "a"}, "b"]', "text", "x.json") == [(0, "a"), (1, "b")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(InputError, match="bad.jsonl:2"):
        extract_documents(discover_files([bad]))


def test_html_to_text_uses_a_real_parser():
    html = """<!doctype html><html><head><title>T</title><style>p {color: red}</style>
    <script>var x = "<p>not text</p>";</script></head>
    <body><h1>Hello &amp; welcome</h1><p>First   paragraph
    spans lines.</p><!-- a comment --><ul><li>one</li><li>two &lt;3</li></ul>
    <pre>  keep
    this</pre><p>caf&eacute; &#8212; done</p></body></html>"""
    text = html_to_text(html)
    assert text.splitlines() == [
        "Hello & welcome",
        "",
        "First paragraph spans lines.",
        "",
        "one",
        "two <3",
        "",
        "  keep",
        "    this",
        "",
        "café — done",
    ]
    assert "color" not in text and "not text" not in text and "comment" not in text


def test_html_files_and_gzip(tmp_path):
    (tmp_path / "page.html").write_text("<p>Hi <b>there</b></p>")
    (tmp_path / "notes.txt.gz").write_bytes(gzip.compress(b"zipped words"))
    docs, _ = extract_documents(discover_files([tmp_path]))
    assert sorted(d.text for d in docs) == ["Hi there", "zipped words"]


def test_binary_files_skipped_in_folders_error_when_named(tmp_path):
    (tmp_path / "good.txt").write_text("words")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "empty.txt").write_text("  \n")
    docs, stats = extract_documents(discover_files([tmp_path]))
    assert [d.text for d in docs] == ["words"]
    assert stats.binary_files_skipped == 1 and stats.empty_files == 1
    with pytest.raises(InputError, match="binary"):
        extract_documents(discover_files([tmp_path / "image.png"]), explicit={tmp_path / "image.png"})


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(InputError, match="no input"):
        discover_files([])
    with pytest.raises(InputError, match="not found"):
        discover_files([tmp_path / "nope.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no files"):
        discover_files([tmp_path / "empty"])


def test_split_long_text_respects_limit_and_keeps_content(make_prose):
    text = "\n\n".join(make_prose(i, 80) for i in range(30)) + "\n" + "x" * 2500
    pieces = split_long_text(text, 1000)
    assert len(pieces) > 10
    assert all(len(p) <= 1000 for p in pieces)
    assert "".join(text.split()) == "".join("".join(pieces).split())
    assert split_long_text("short", 1000) == ["short"]
