import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from lmstack.data.config import DataConfig
from lmstack.data.dedup import DedupConfig
from lmstack.data.pipeline import is_prepared_dataset, load_dataset_info, prepare_dataset
from lmstack.data.shards import open_shard
from lmstack.errors import InputError


@pytest.fixture
def sources(tmp_path, make_prose):
    """Two sources with a planted exact duplicate, near duplicate, junk document and leaked eval text."""
    root = tmp_path / "in"
    (root / "books").mkdir(parents=True)
    for i in range(30):
        (root / "books" / f"b{i:02d}.txt").write_text(make_prose(i, 150))
    (root / "books" / "copy.txt").write_text(make_prose(3, 150).upper())  # exact dup after normalising
    near = make_prose(4, 150).split(" ")
    near[10] = "CHANGED"
    (root / "books" / "near.txt").write_text(" ".join(near))
    (root / "books" / "junk.txt").write_text("1234 5678 9012 " * 40)
    (root / "books" / "leak.txt").write_text(make_prose(90, 60) + " " + EVAL_TEXT + " " + make_prose(91, 60))
    web = [{"text": make_prose(100 + i, 80), "url": f"u{i}"} for i in range(20)]
    (root / "web.jsonl").write_text("\n".join(json.dumps(r) for r in web) + "\n")
    (root / "eval.txt").write_text(EVAL_TEXT + "\n")
    return root


EVAL_TEXT = "Which planet in our solar system has the most moons orbiting it as of the latest count"


def prepare(root, out, tokenizer, **kwargs):
    return prepare_dataset(
        [root / "books", root / "web.jsonl"],
        out,
        tokenizer=tokenizer,
        eval_sets=[root / "eval.txt"],
        **kwargs,
    )


def test_prepare_writes_a_complete_dataset(sources, tmp_path, byte_tokenizer):
    out = tmp_path / "ds"
    info = prepare(sources, out, byte_tokenizer)
    assert is_prepared_dataset(out) and info == load_dataset_info(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "report.txt",
        "tokenizer",
        "train.bin",
        "val.bin",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["documents_extracted"] == 54
    assert counts["quality_removed"]["digit_ratio"] == 1
    assert counts["exact_duplicates_removed"] == 1 and counts["near_duplicates_removed"] == 1
    assert counts["contaminated_removed"] == 1
    assert counts["val_documents"] == 3  # ceil(5% of 50)
    assert info.train_documents + info.val_documents == 50

    # shards decode back to the curated documents, EOS after each
    header, tokens = open_shard(info.val_path)
    assert header.eos_id == info.eos_id == 256 and tokens[-1] == 256
    pieces = np.split(np.asarray(tokens), np.flatnonzero(tokens == 256) + 1)[:-1]  # each ends with EOS
    val_texts = [byte_tokenizer.decode(piece.tolist()) for piece in pieces]
    inputs = {p.read_text().strip() for p in (sources / "books").glob("b*.txt")}
    inputs |= {json.loads(line)["text"] for line in (sources / "web.jsonl").read_text().splitlines()}
    assert len(val_texts) == 3 and set(val_texts) <= inputs
    assert sum(len(t.encode()) for t in val_texts) == info.val_text_bytes
    assert int(np.sum(open_shard(info.train_path)[1] == 256)) == info.train_documents
    assert info.val_tokens == info.val_text_bytes + info.val_documents
    assert (
        "quality" in (out / "report.txt").read_text()
        and info.version[:16] in (out / "report.txt").read_text()
    )
    assert manifest["tokenizer"]["files"] == {
        "byte_tokenizer.json": manifest["tokenizer"]["files"]["byte_tokenizer.json"]
    }
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))


def test_version_is_stable_and_location_independent(sources, tmp_path, byte_tokenizer):
    first = prepare(sources, tmp_path / "one", byte_tokenizer)
    moved = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(sources, moved)
    os.utime(moved / "eval.txt", (0, 0))  # timestamps never count
    second = prepare(moved, tmp_path / "two", byte_tokenizer)
    assert first.version == second.version and not second.reused
    assert (tmp_path / "one" / "train.bin").read_bytes() == (tmp_path / "two" / "train.bin").read_bytes()
    assert str(tmp_path) not in (tmp_path / "one" / "manifest.json").read_text()


def test_version_changes_with_config_and_inputs(sources, tmp_path, byte_tokenizer):
    base = prepare(sources, tmp_path / "a", byte_tokenizer)
    other_config = DataConfig(dedup=DedupConfig(threshold=0.9))
    assert prepare(sources, tmp_path / "b", byte_tokenizer, config=other_config).version != base.version
    (sources / "books" / "b00.txt").write_text(
        "A changed input file with enough words to pass the filters, surely."
    )
    assert prepare(sources, tmp_path / "c", byte_tokenizer).version != base.version


def test_same_recipe_is_reused(sources, tmp_path, byte_tokenizer):
    out = tmp_path / "ds"
    first = prepare(sources, out, byte_tokenizer)
    again = prepare(sources, out, byte_tokenizer)
    assert again.reused and again.version == first.version
    rebuilt = prepare(sources, out, byte_tokenizer, reuse=False)
    assert not rebuilt.reused and rebuilt.version == first.version


def test_output_inside_the_input_folder_is_not_read_back(tmp_path, prose_dir, byte_tokenizer):
    first = prepare_dataset([prose_dir], prose_dir / "prepared", tokenizer=byte_tokenizer)
    again = prepare_dataset([prose_dir], prose_dir / "prepared", tokenizer=byte_tokenizer)
    assert again.reused and again.version == first.version
    assert first.train_documents + first.val_documents == 40


def test_mixing_weights_through_the_pipeline(sources, tmp_path, byte_tokenizer):
    config = DataConfig(weights={"books": 0.5, "web": 0.5})
    prepare(sources, tmp_path / "ds", byte_tokenizer, config=config)
    mix = json.loads((tmp_path / "ds" / "manifest.json").read_text())["mix"]
    assert mix["requested"] == {"books": 0.5, "web": 0.5}
    assert mix["achieved"]["web"] == pytest.approx(0.5, abs=0.03)
    assert "requested" in (tmp_path / "ds" / "report.txt").read_text()


def test_tampered_manifest_is_rejected(sources, tmp_path, byte_tokenizer):
    out = tmp_path / "ds"
    prepare(sources, out, byte_tokenizer)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["tokens"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert not is_prepared_dataset(out)
    with pytest.raises(InputError, match="modified"):
        load_dataset_info(out)


def test_truncated_shard_makes_the_folder_unprepared(sources, tmp_path, byte_tokenizer):
    out = tmp_path / "ds"
    prepare(sources, out, byte_tokenizer)
    (out / "val.bin").write_bytes((out / "val.bin").read_bytes()[:-1])
    assert not is_prepared_dataset(out)
    assert not prepare(sources, out, byte_tokenizer).reused  # rebuilt, not reused
    assert is_prepared_dataset(out)


def test_a_failure_midway_leaves_no_partial_files(sources, tmp_path, byte_tokenizer):
    out = tmp_path / "ds"
    prepare(sources, out, byte_tokenizer)

    class Exploding(type(byte_tokenizer)):
        def encode_ordinary(self, text):
            raise RuntimeError("simulated crash while tokenising")

    with pytest.raises(RuntimeError, match="simulated"):
        prepare(sources, out, Exploding(), config=DataConfig(seed=1))
    assert not is_prepared_dataset(out)  # the old manifest went first: no mix of old and new parts
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not prepare(sources, out, byte_tokenizer).reused


def test_single_file_is_split_into_documents_for_validation(tmp_path, make_prose, byte_tokenizer):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(make_prose(i, 100) for i in range(60)))
    info = prepare_dataset(
        [path], tmp_path / "ds", tokenizer=byte_tokenizer, config=DataConfig(max_document_chars=2000)
    )
    assert info.val_documents >= 1 and info.train_documents > 10


def test_single_short_document_still_gets_a_validation_split(tmp_path, make_prose, byte_tokenizer):
    path = tmp_path / "note.txt"
    path.write_text(make_prose(1, 300))
    info = prepare_dataset([path], tmp_path / "ds", tokenizer=byte_tokenizer)
    assert info.train_documents == info.val_documents == 1
    assert info.val_text_bytes < info.train_text_bytes


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: [d / "empty.txt"], "no text found"),
        (lambda d: [d / "blob.bin"], "binary"),
        (lambda d: [d / "short.txt"], "everything was filtered out by the quality filters"),
        (lambda d: [], "no input files"),
        (lambda d: [d / "missing.txt"], "not found"),
    ],
)
def test_bad_input_errors(tmp_path, byte_tokenizer, setup, match):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(InputError, match=match):
        prepare_dataset(setup(tmp_path), tmp_path / "out", tokenizer=byte_tokenizer)


def test_unwritable_output_folder(tmp_path, make_prose, byte_tokenizer):
    (tmp_path / "a.txt").write_text(make_prose(1))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        prepare_dataset([tmp_path / "a.txt"], tmp_path / "file", tokenizer=byte_tokenizer)
    with pytest.raises(InputError, match="cannot write to the output folder"):
        prepare_dataset([tmp_path / "a.txt"], tmp_path / "file" / "ds", tokenizer=byte_tokenizer)
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(InputError, match="cannot write"):
        prepare_dataset([tmp_path / "a.txt"], locked / "ds", tokenizer=byte_tokenizer)


def test_config_validation_and_files(tmp_path):
    with pytest.raises(InputError, match="multiple of dedup.bands"):
        DataConfig(dedup=DedupConfig(num_perm=100, bands=32))
    with pytest.raises(InputError, match="unknown data config keys"):
        DataConfig.from_dict({"dedup": {"treshold": 0.5}})
    path = tmp_path / "c.yaml"
    path.write_text("quality:\n  min_chars: 10\nweights:\n  web: 2\n  books: 1\nval_fraction: 0.1\n")
    config = DataConfig.load(path)
    assert config.quality.min_chars == 10 and config.weights == (("books", 1.0), ("web", 2.0))
    assert DataConfig.from_dict(config.to_dict()) == config
    assert dataclasses.replace(config, seed=3).seed == 3
