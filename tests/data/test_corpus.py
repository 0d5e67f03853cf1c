import hashlib
import json
import sys

import pytest

from lmstack.data import corpus


@pytest.fixture(scope="module")
def documents():
    return corpus.default_corpus()


def test_default_corpus_is_real_english_text(documents):
    text = "\n".join(documents)
    assert len(text.encode("utf-8")) > 1_000_000
    assert len(documents) > 300
    letters = sum(c.isascii() and c.isalpha() for c in text)
    assert letters / len(text) > 0.6
    words = text.lower().split()
    for common in ("the", "of", "and", "return", "function"):
        assert words.count(common) > 500


def test_default_corpus_is_deterministic(documents):
    again = corpus.default_corpus()
    digest = lambda docs: hashlib.sha256("\0".join(docs).encode()).hexdigest()
    assert digest(again) == digest(documents)


def test_stdlib_is_parsed_never_imported(documents):
    # importing `antigravity` would open a web browser; parsing it must not
    assert "antigravity" not in sys.modules
    assert any(doc.startswith("Module antigravity") for doc in documents)


def test_docstrings_are_dedented_with_signatures(tmp_path):
    pkg = tmp_path / "lib"
    (pkg / "pkg" / "test").mkdir(parents=True)
    (pkg / "pkg" / "__init__.py").write_text('"""Package doc."""\n')
    (pkg / "pkg" / "test" / "test_x.py").write_text('"""Test suites are skipped."""\n')
    (pkg / "mod.py").write_text(
        '"""Module summary.\n\n    Indented body.\n    """\n'
        "class Thing(Base):\n"
        '    """A thing."""\n'
        "    def run(self, n=1):\n"
        '        """Run it.\n\n        Twice if asked.\n        """\n'
        "    def _private(self):\n"
        '        """Hidden."""\n'
        "def broken(:\n"
    )
    (pkg / "good.py").write_text('def f(a, *b, c=2):\n    """Eff."""\n')
    found = dict(corpus.stdlib_docstrings(pkg))
    assert list(found) == ["good", "pkg"]  # mod.py does not parse, the test folder is skipped
    assert found["good"] == "Module good\n\nf(a, *b, c=2)\n    Eff."
    (pkg / "mod.py").write_text((pkg / "mod.py").read_text().replace("def broken(:\n", ""))
    assert dict(corpus.stdlib_docstrings(pkg))["mod"] == (
        "Module mod\n\nModule summary.\n\nIndented body.\n\n"
        "class Thing(Base)\n    A thing.\n\nThing.run(self, n=1)\n    Run it.\n\n    Twice if asked."
    )


def test_write_default_corpus_as_jsonl(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "m.py").write_text('"""Doc of m."""\n')
    paths = corpus.write_default_corpus(tmp_path / "out", root=lib)
    names = [p.name for p in paths]
    assert names[-1] == "python_docstrings.jsonl"
    records = [json.loads(line) for line in paths[-1].read_text().splitlines()]
    assert records == [{"name": "m", "text": "Module m\n\nDoc of m."}]
