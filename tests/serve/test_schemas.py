"""Request bodies -> SamplingParams without sockets: the request's fields win over the model folder's
defaults, vLLM's extras map as documented, and bad fields are named."""

from __future__ import annotations

import pytest

from lmstack.serve.openai import RequestError, choice_params, parse_request, sampling_params

DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "top_k": 40}


def params(body: dict, chat: bool = True, **kw):
    request = parse_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt": "x", **body},
                            chat=chat)  # fmt: skip
    return request, sampling_params(
        request, DEFAULTS, max_new_tokens=kw.get("budget", 8), stop_ids=frozenset({3})
    )


def test_request_fields_override_the_folder_defaults():
    _, p = params({})
    assert (p.temperature, p.top_p, p.top_k, p.max_new_tokens, tuple(p.stop_ids)) == (0.7, 0.9, 40, 8, (3,))
    _, p = params({"temperature": 0, "top_p": 1, "top_k": -1, "seed": 5, "presence_penalty": 0.5})
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.presence_penalty) == (0.0, None, None, 5, 0.5)
    _, p = params({"ignore_eos": True, "repetition_penalty": 1.2, "frequency_penalty": -1})
    assert (tuple(p.stop_ids), p.repetition_penalty, p.frequency_penalty) == ((), 1.2, -1.0)


def test_n_choices_are_seeded_seed_plus_i_and_logprobs_map():
    request, p = params({"n": 3, "seed": 10, "logprobs": True, "top_logprobs": 4})
    assert request.n == 3 and [choice_params(p, i).seed for i in range(3)] == [10, 11, 12]
    assert p.logprobs == 4
    _, p = params({"logprobs": 2}, chat=False)
    assert p.logprobs == 2
    request, _ = params({"max_completion_tokens": 7, "stop": "END", "stream": True,
                         "stream_options": {"include_usage": True}})  # fmt: skip
    assert (request.max_tokens, request.stop, request.include_usage) == (7, ("END",), True)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", ""]}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"model": 3}, "model"),
    ],
)
def test_bad_fields_are_named(body, param):
    with pytest.raises(RequestError) as error:
        params(body)
    assert error.value.param == param and error.value.status == 400
