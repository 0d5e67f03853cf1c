"""The official `openai` client against a live server: every output equals `generate_text` (the
reference path, one request alone) with the same settings — chat and completions, streaming and not,
n > 1 (choice i seeded seed + i), stop strings, log-probabilities, and the model folder's defaults."""

from __future__ import annotations

import json

import pytest

from lmstack.infer import generate_text

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be, or not"}]


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def reference(loaded, prompt, **kwargs):
    model, tok = loaded
    return generate_text(model, tok, prompt, details=True, **kwargs)[0]


def test_completion_greedy_equals_generate_text(client, loaded):
    out = client.completions.create(model="tiny", prompt="whether 'tis", max_tokens=20, temperature=0)
    ref = reference(loaded, "whether 'tis", max_new_tokens=20)
    assert out.choices[0].text == ref.text and len(ref.text) > 5
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.completion_tokens == len(ref.tokens)
    tok = loaded[1]
    assert out.usage.prompt_tokens == (tok.bos_id is not None) + len(tok.encode_ordinary("whether 'tis"))


def test_chat_sampled_n2_each_choice_equals_generate_with_seed_plus_i(client, loaded):
    out = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=24, temperature=0.9, top_p=0.95, seed=11, n=2
    )
    refs = [
        reference(loaded, MESSAGES, max_new_tokens=24, temperature=0.9, top_p=0.95, seed=11 + i)
        for i in range(2)
    ]
    assert [c.message.content for c in out.choices] == [r.text for r in refs]
    assert [c.finish_reason for c in out.choices] == [r.finish_reason for r in refs]
    assert refs[0].text != refs[1].text  # the seeds really differ
    assert out.usage.completion_tokens == sum(len(r.tokens) for r in refs)


def test_chat_defaults_come_from_the_model_folder(client, loaded):
    # our checkpoints' generation_config.json has no sampling fields: chat defaults 0.7 / 0.9 apply
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, seed=5)
    ref = reference(loaded, MESSAGES, max_new_tokens=16, temperature=0.7, top_p=0.9, seed=5)
    assert out.choices[0].message.content == ref.text


def test_streaming_chat_equals_the_whole_response_and_reports_usage(client, loaded):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=20, temperature=1.0, top_p=1, seed=2, n=2)
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    texts, reasons, usage = ["", ""], [None, None], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    refs = [reference(loaded, MESSAGES, max_new_tokens=20, temperature=1.0, seed=2 + i) for i in range(2)]
    assert texts == [r.text for r in refs] and reasons == [r.finish_reason for r in refs]
    assert usage.completion_tokens == sum(len(r.tokens) for r in refs)


def test_stop_strings_cut_across_tokens_and_are_never_streamed(client, loaded):
    free = reference(loaded, "To be", max_new_tokens=40, temperature=1.0, seed=4)
    stop = free.text[7:10]  # three characters from the middle: likely spans a token boundary
    ref = reference(loaded, "To be", max_new_tokens=40, temperature=1.0, seed=4, stop=[stop])
    assert ref.text == free.text[: free.text.index(stop)] and ref.finish_reason == "stop"
    whole = client.completions.create(
        model="tiny", prompt="To be", max_tokens=40, temperature=1.0, top_p=1, seed=4, stop=stop
    )
    assert whole.choices[0].text == ref.text and whole.choices[0].finish_reason == "stop"
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model="tiny",
            prompt="To be",
            max_tokens=40,
            temperature=1.0,
            top_p=1,
            seed=4,
            stop=[stop],
            stream=True,
        )
        if c.choices
    ]
    assert "".join(pieces) == ref.text
    for i in range(len(pieces)):  # no prefix of the stream ever held the stop string
        assert stop not in "".join(pieces[: i + 1])


def test_logprobs_equal_the_reference(client, loaded):
    model, tok = loaded
    out = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    ref = reference(loaded, MESSAGES, max_new_tokens=8, logprobs=3)
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(ref.logprobs, abs=1e-9)
    assert [a.logprob for c in content for a in c.top_logprobs] == pytest.approx(
        [lp for top in ref.top_logprobs for _, lp in top], abs=1e-9
    )
    assert [bytes(a.bytes) for c in content for a in c.top_logprobs] == [
        tok.id_to_bytes(t) for top in ref.top_logprobs for t, _ in top
    ]
    assert [bytes(c.bytes) for c in content] == [tok.id_to_bytes(t) for t in ref.tokens]
    legacy = client.completions.create(model="tiny", prompt="To be", max_tokens=6, temperature=0, logprobs=2)
    ref = reference(loaded, "To be", max_new_tokens=6, logprobs=2)
    assert legacy.choices[0].logprobs.token_logprobs == pytest.approx(ref.logprobs, abs=1e-9)


def test_json_mode_output_parses_whenever_it_stops(client):
    for seed in range(4):
        out = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=40, temperature=1.0, top_p=1, seed=seed,
            response_format={"type": "json_object"},
        )  # fmt: skip
        choice = out.choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        assert choice.message.content.lstrip().startswith("{")


def test_models_and_errors_in_openai_shape(client, server):
    openai = pytest.importorskip("openai")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=5)
    status, _, body = server.request(
        "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 300}
    )
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "max_tokens" and "256" in error["message"]
    assert "300 in the completion" in error["message"]
    status, _, body = server.request("POST", "/v1/completions", raw=b'{"model": "tiny", "prompt": ')
    assert status == 400 and "malformed JSON" in json.loads(body)["error"]["message"]
