import json

import pytest

from lmstack.cli import main


def test_prepare_from_the_command_line(tmp_path, make_prose, byte_tokenizer, monkeypatch, capsys):
    import lmstack.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_train_tokenizer", lambda *args, **kwargs: byte_tokenizer)
    (tmp_path / "wiki.jsonl").write_text("\n".join(json.dumps({"body": make_prose(i)}) for i in range(20)))
    (tmp_path / "books").mkdir()
    for i in range(20):
        (tmp_path / "books" / f"{i}.txt").write_text(make_prose(100 + i))
    (tmp_path / "cfg.yaml").write_text("dedup:\n  threshold: 0.9\n")
    out = tmp_path / "ds"
    argv = ["data", "prepare", str(tmp_path / "wiki.jsonl"), str(tmp_path / "books"), "--out", str(out),
            "--jsonl-field", "body", "--weights", "wiki=3", "books=1", "--config", str(tmp_path / "cfg.yaml"),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "requested" in printed and "75.0%" in printed and f"dataset written to {out}" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["jsonl_field"] == "body" and manifest["config"]["dedup"]["threshold"] == 0.9
    assert main(["data", "info", str(out)]) == 0
    assert manifest["version"][:16] in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "prepare", "{tmp}/missing.txt", "--out", "{tmp}/o"], "input not found"),
        (["data", "prepare", "{tmp}/a.txt", "--out", "{tmp}/o", "--weights", "a"], "SOURCE=WEIGHT"),
        (
            ["data", "prepare", "{tmp}/a.txt", "--out", "{tmp}/o", "--config", "{tmp}/nope.yaml"],
            "cannot read",
        ),
        (["data", "info", "{tmp}"], "not a prepared dataset"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lmstack: error:") and message in err and err.count("\n") == 1
