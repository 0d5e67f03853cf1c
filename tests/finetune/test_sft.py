"""SFT: records and their errors, assistant-only labels, truncation counts, packed loss == unpacked
loss, the ChatML base (vocabulary grown with mean rows), LoRA through the loop with a PEFT adapter in
each checkpoint, and an exact resume of a killed run."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmstack.errors import InputError
from lmstack.finetune.data import (
    IGNORE,
    pack_rows,
    packed_batch,
    pad_batch,
    read_records,
    sft_examples,
)
from lmstack.finetune.run import FinetuneConfig, finetune
from lmstack.finetune.sft import sft_loss
from lmstack.finetune.vocab import chat_ready_base, resize_vocab
from lmstack.interop.folders import load_model_and_tokenizer
from lmstack.model import build_model
from lmstack.train import TrainHooks
from lmstack.train.metrics import read_metrics


@pytest.fixture(scope="module")
def chat_base(base_dir, tmp_path_factory) -> Path:
    return chat_ready_base(base_dir, tmp_path_factory.mktemp("chat") / "base")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"prompt": "hi"}, r"bad\.jsonl:2: missing field\(s\) response"),
        ({"prompt": "hi", "response": "  "}, r"bad\.jsonl:2: 'response' is empty"),
        ({"messages": [{"role": "user", "content": "x"}]}, r"bad\.jsonl:2: .*no non-empty assistant message"),
        ({"messages": [{"role": "user"}]}, r"bad\.jsonl:2: messages\[0\] must be an object"),
    ],
)
def test_bad_records_name_their_line(tmp_path, write_jsonl, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, line])
    with pytest.raises(InputError, match=message):
        read_records(path)


def test_labels_are_the_assistant_tokens_only(chat_base, sft_file):
    _, tok = load_model_and_tokenizer(chat_base)
    examples, stats = sft_examples(tok, read_records(sft_file), 128)
    assert stats.kept == 24
    convo = examples[0]  # the two-turn conversation: both replies (and their <|im_end|>) are labelled
    labelled = [i for i, label in zip(convo.ids, convo.labels) if label != IGNORE]
    im_end = tok.special_tokens["<|im_end|>"]
    assert tok.decode(labelled) == "yes<|im_end|>Certain.<|im_end|>"
    assert labelled.count(im_end) == 2
    for e in examples:
        assert all(label in (IGNORE, i) for i, label in zip(e.ids, e.labels))
        assert e.labels[0] == IGNORE  # the prompt comes first


def test_truncation_is_counted(chat_base, sft_file):
    _, tok = load_model_and_tokenizer(chat_base)
    records = read_records(sft_file)
    lengths = [len(tok.render_chat(list(r.messages))[0]) for r in records]
    limit = sorted(lengths)[len(lengths) // 2]
    longer = sum(n > limit for n in lengths)
    assert longer > 0
    kept, stats = sft_examples(tok, records, limit, "drop")
    assert stats.dropped_too_long == longer and len(kept) == len(records) - longer
    assert all(len(e.ids) <= limit for e in kept)
    assert f"{longer} dropped as too long" in stats.summary() and "dropped lines" in stats.summary()
    assert sorted(stats.lines_dropped) == [k + 1 for k, n in enumerate(lengths) if n > limit]  # 1-based lines
    left, stats = sft_examples(tok, records, limit, "left")
    assert stats.truncated == longer and stats.kept + stats.dropped_no_target == len(records)
    right, stats = sft_examples(tok, records, limit, "right")
    # cutting the end may leave no assistant token: those are dropped and counted, not trained on
    assert stats.truncated == longer and stats.kept + stats.dropped_no_target == len(records)
    assert "truncated" in stats.summary()


def test_packed_loss_equals_unpacked_loss(chat_base, sft_file):
    model, tok = load_model_and_tokenizer(chat_base)
    examples, _ = sft_examples(tok, read_records(sft_file), 128)
    rows = pack_rows(examples, 96)
    assert any(len(r) > 1 for r in rows)  # examples really share rows
    packed = packed_batch(rows, 96)
    # positions restart at every example
    starts = (packed["positions"] == 0) & (packed["segments"] >= 0)
    assert int(starts.sum()) == len(examples)
    unpacked = pad_batch([e for row in rows for e in row])
    shapes = []
    model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        a, na = sft_loss(model, packed)
        assert shapes == [(len(rows), 96)]  # the packed rows run as they are: one sequence each
        b, nb = sft_loss(model, unpacked)
        # the reference: each example alone, token-weighted
        alone = [sft_loss(model, pad_batch([e])) for row in rows for e in row]
    ref = sum(loss * n for loss, n in alone) / sum(n for _, n in alone)
    assert int(na) == int(nb)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(a, ref, rtol=0, atol=1e-5)


def test_chat_base_grows_the_vocabulary_with_mean_rows(base_dir, chat_base):
    base, tok = load_model_and_tokenizer(base_dir)
    chat, chat_tok = load_model_and_tokenizer(chat_base)
    assert not tok.chat_template and chat_tok.chat_template
    old, new = base.config.vocab_size, chat.config.vocab_size
    assert new == old + 2 == chat_tok.vocab_size
    assert chat.config.eos_id == chat_tok.special_tokens["<|im_end|>"]
    for name in ("tok_emb", "lm_head"):
        w0, w1 = getattr(base, name).weight, getattr(chat, name).weight
        assert torch.equal(w1[:old], w0)
        torch.testing.assert_close(w1[old:], w0.mean(0, keepdim=True).expand(2, -1))
    ids = torch.tensor([tok.encode("Add 3 and 4.")])  # old ids: the same logits on the old vocabulary
    with torch.no_grad():
        torch.testing.assert_close(chat(ids)[..., :old], base(ids))
    tied = build_model(dataclasses.replace(chat.config, tie_embeddings=True), seed=0)
    grown = resize_vocab(tied, new + 3)
    assert grown.lm_head.weight is grown.tok_emb.weight and grown.config.vocab_size == new + 3
    torch.testing.assert_close(grown.tok_emb.weight[new:], tied.tok_emb.weight.mean(0).expand(3, -1))


def config(base: Path, data: Path, out: Path, **changes) -> FinetuneConfig:
    kw = dict(
        model=str(base), out=str(out), data=str(data), max_steps=8, batch_size=4, micro_batch_size=2, lr=1e-2,
        warmup_steps=2, seq_len=96, eval_interval=4, checkpoint_interval=2, threads=1, progress=False,
    )  # fmt: skip
    return FinetuneConfig(**{**kw, **changes})


class Crash(Exception):
    pass


def test_lora_run_writes_peft_adapters_and_resumes_exactly(base_dir, sft_file, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    whole = finetune(
        config(base_dir, sft_file, tmp_path / "whole", adapter="lora", lora_targets="all-linear")
    )
    ckpt = whole.train.checkpoint
    assert whole.train.step == 8 and whole.adapter == ckpt / "adapter"
    records = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    saved = json.loads((tmp_path / "whole" / "finetune_config.json").read_text())
    assert saved["base"]["path"] == str(base_dir) and len(saved["base"]["sha256"]) == 64

    # the adapter is a PEFT folder on the chat-ready base; PEFT on transformers gives the checkpoint's
    # (merged) model's logits
    adapter_config = json.loads((whole.adapter / "adapter_config.json").read_text())
    start = Path(adapter_config["base_model_name_or_path"])
    assert start == tmp_path / "whole" / "base"
    names = load_file(str(whole.adapter / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    hf = transformers.AutoModelForCausalLM.from_pretrained(start, torch_dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, whole.adapter).eval()
    merged, tok = load_model_and_tokenizer(ckpt)
    # the ChatML rows the base lacked trained beside the adapters (PEFT's trainable_token_indices):
    # they started equal (the mean row) and now differ
    chatml = [tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]]
    assert adapter_config["trainable_token_indices"] == {"model.embed_tokens": chatml, "lm_head": chatml}
    for layer in (merged.tok_emb, merged.lm_head):
        assert (layer.weight[chatml[0]] - layer.weight[chatml[1]]).abs().max() > 1e-3
    ids = torch.tensor(
        [tok.render_chat([{"role": "user", "content": "Add 2 and 3."}], add_generation_prompt=True)[0]]
    )
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, merged(ids), rtol=1e-4, atol=1e-4)

    def crash(step: int, record: dict) -> None:
        if step == 5:
            raise Crash

    killed = config(base_dir, sft_file, tmp_path / "killed", adapter="lora", lora_targets="all-linear")
    with pytest.raises(Crash):
        finetune(killed, hooks=TrainHooks(on_step_end=crash))
    finetune(FinetuneConfig(**{**killed.to_dict(), "resume": True}))
    a = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    b = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    keys = ("step", "train_loss", "val_loss", "epoch")
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]
    wa = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    wb = load_file(
        str(tmp_path / "killed" / "checkpoints" / "step_8" / "adapter" / "adapter_model.safetensors")
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_against_a_changed_base_is_refused(base_dir, sft_file, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    run = config(base, sft_file, tmp_path / "run", adapter="lora", max_steps=2)
    finetune(run)
    weights = load_file(str(base / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v + 0.01 for k, v in weights.items()}, str(base / "model.safetensors"))
    with pytest.raises(InputError, match="weights have changed"):
        finetune(FinetuneConfig(**{**run.to_dict(), "resume": True, "max_steps": 4}))


def test_full_finetune_with_packing_and_8bit_adamw(base_dir, sft_file, tmp_path):
    result = finetune(
        config(
            base_dir, sft_file, tmp_path / "run", packing=True, optimizer="adamw8bit", max_steps=4, lr=3e-3
        )
    )
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert result.train.step == 4 and result.adapter is None
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    state = load_file(str(result.train.checkpoint / "trainer" / "optimizer.safetensors"))
    assert any(v.dtype in (torch.uint8, torch.int8) for v in state.values())  # 8-bit moments
