"""`lmstack finetune` (the shipped loan set when no --data, --resume from the saved config) and
`lmstack merge` (the merged folder gives the checkpoint's logits in fp32, and close in bf16); the
shipped set is the generator's output and fits 200 tokens of a 4096-id BPE."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.cli import main
from lmstack.finetune import loans
from lmstack.finetune.run import shipped_dataset
from lmstack.interop.folders import load_model_and_tokenizer


def test_shipped_set_is_the_generators_and_fits_200_tokens(tmp_path):
    written = loans.write(tmp_path)
    for path in written:
        split = path.stem.removeprefix("loans_")
        assert path.read_bytes() == shipped_dataset(split).read_bytes()
    rows = [json.loads(line) for line in shipped_dataset("train").read_text().splitlines()]
    assert len(rows) == 400 and len(shipped_dataset("heldout").read_text().splitlines()) == 100
    rules = {json.loads(r["response"])["rule"] for r in rows}
    assert len(rules) == 4  # every rule occurs
    for r in rows:  # the answers follow the rules from the prompt's numbers
        answer = json.loads(r["response"])
        assert answer["applicant"] in r["prompt"] and f"{answer['term_months']} month" in r["prompt"].replace(
            "-", " "
        )
        assert answer == {
            **answer,
            **loans.decide(answer["amount"], answer["income"], _debt(r["prompt"], answer)),
        }
        assert loans.score(r["response"], r["response"]) == (True, 1.0)
    assert loans.score("not json", rows[0]["response"]) == (False, 0.0)

    from lmstack.data.corpus import default_corpus
    from lmstack.tokenizer import Tokenizer
    from lmstack.tokenizer.chat import with_chatml

    docs = []
    for d in default_corpus():
        docs.append(d)
        if sum(map(len, docs)) > 2_000_000:
            break
    tok = with_chatml(
        Tokenizer.train(docs, 4096, special_tokens=["<|endoftext|>"], eos_token="<|endoftext|>")
    )
    lengths = [
        len(
            tok.render_chat(
                [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
            )[0]
        )
        for r in rows
    ]
    assert max(lengths) < 200


def _debt(prompt: str, answer: dict) -> int:
    """The monthly debt stated in the prompt: its dollar figure that is neither the amount nor the income."""
    import re

    figures = [int(a.replace(",", "")) for a in re.findall(r"\$([\d,]+)", prompt)]
    rest = [f for f in figures if f not in (answer["amount"], answer["income"])]
    return rest[0] if rest else answer["amount"] if figures.count(answer["amount"]) > 1 else answer["income"]


def test_finetune_cli_on_the_shipped_set_then_merge(base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--model", str(base_dir), "--adapter", "lora", "--max-steps", "2", "--batch-size", "4",
            "--seq-len", "256", "--out", str(out), "--threads", "1", "--quiet"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fine-tuned 2 steps" in printed and "of 400 examples kept" in printed
    assert main(["finetune", "--resume", "--out", str(out), "--quiet"]) == 0  # nothing left: same budget
    ckpt = out / "checkpoints" / "step_2"
    merged = {}
    for dtype in ("fp32", "bf16"):
        folder = tmp_path / f"merged_{dtype}"
        args = ["merge", "--model", str(out / "base"), "--adapter", str(ckpt / "adapter"), "--out", str(folder), "--dtype", dtype]  # fmt: skip
        assert main(args) == 0
        merged[dtype] = load_model_and_tokenizer(folder)
    (a, tok), (b, _) = merged["fp32"], load_model_and_tokenizer(ckpt)
    assert not any("lora" in k for k in a.state_dict())
    ids = torch.tensor([tok.encode("Loan request from Ana Silva")])
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), rtol=1e-5, atol=1e-5)
    half = merged["bf16"][0].state_dict()  # merged in fp32, then rounded once
    assert all(torch.equal(half[k], v.to(torch.bfloat16)) for k, v in a.state_dict().items())


def test_cli_errors_are_one_line(base_dir, tmp_path, capsys, write_jsonl):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "response": "y"}, {"prompt": "x"}])
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "finetune",
                "--model",
                str(base_dir),
                "--data",
                str(bad),
                "--out",
                str(tmp_path / "r"),
                "--max-steps",
                "1",
            ]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("lmstack: error:")
        and "bad.jsonl:2: missing field(s) response" in err
        and "\n" not in err
    )


def test_generate_with_adapter_applies_it_unmerged(base_dir, tmp_path, capsys):
    """`--adapter DIR` (generate, chat, serve) loads the base and applies the PEFT folder on top: the
    output equals the same adapter applied in Python, and differs from the base alone."""
    from lmstack.finetune.adapters import hf_module_names, load_with_adapter
    from lmstack.finetune.lora import LoraConfig, apply_lora, save_adapter
    from lmstack.infer import generate_text

    model, tok = load_model_and_tokenizer(base_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    adapter = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir),
                           name_map=hf_module_names(model))  # fmt: skip
    model.eval()
    expected = generate_text(model, tok, "applicant 7 asks", max_new_tokens=12)
    base, _ = load_model_and_tokenizer(base_dir)
    assert expected != generate_text(base, tok, "applicant 7 asks", max_new_tokens=12)
    loaded, _ = load_with_adapter(base_dir, adapter)
    assert generate_text(loaded, tok, "applicant 7 asks", max_new_tokens=12) == expected
    args = ["generate", "--model", str(base_dir), "--adapter", str(adapter), "applicant 7 asks"]
    assert main([*args, "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", str(base_dir), "--adapter", str(tmp_path / "nope"), "hi"])
    assert exc.value.code == 2 and "adapter folder not found" in capsys.readouterr().err
