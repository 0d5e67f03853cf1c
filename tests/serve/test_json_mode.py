"""JSON mode: the automaton accepts exactly the prefixes of JSON objects (checked against `json`), and as
a logits processor on a random model every output that stops parses, even under tight token budgets."""

from __future__ import annotations

import json

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.infer.engine import Engine
from lmstack.infer.sampling import SamplingParams
from lmstack.serve.json_mode import START, JsonObjectProcessor, JsonVocabulary, closing_cost, feed

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=5), values, max_size=4), st.sampled_from([None, 1, 2]))
def test_every_prefix_of_a_json_object_is_accepted_and_only_the_whole_is_done(obj, indent):
    data = json.dumps(obj, indent=indent, ensure_ascii=bool(indent)).encode()
    state = START
    for byte in data:
        assert state is not None and state[0] != "done"
        assert closing_cost(state) >= 1
        state = feed(state, bytes([byte]))
    assert state is not None and state[0] == "done"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='{}[]":,.-+0123456789eEtrufalsn \\ab', max_size=14))
def test_the_automaton_agrees_with_json_loads(text):
    state = feed(START, text.encode())
    try:
        parsed = json.loads(text)
        valid_object = isinstance(parsed, dict) and not text[-1:].isspace()
    except ValueError:
        valid_object = False
    assert (state is not None and state[0] == "done") == valid_object
    if (
        state is not None and state[0] != "done"
    ):  # a live prefix: some completion of closing_cost bytes exists
        assert closing_cost(state) >= 1


def test_json_mode_on_a_random_model_stops_only_with_valid_json(loaded):
    model, tok = loaded
    vocabulary = JsonVocabulary.from_tokenizer(tok, model.config.vocab_size)
    eos = {tok.eos_id}
    engine = Engine(model, max_batch=8, kv_blocks=256)
    prompts, params = [], []
    for seed in range(16):
        budget = 6 + 3 * seed
        processor = JsonObjectProcessor(vocabulary, eos, budget)
        params.append(SamplingParams(max_new_tokens=budget, temperature=1.0, seed=seed, stop_ids=tuple(eos),
                                     logits_processors=(processor,)))  # fmt: skip
        prompts.append(tok.encode_ordinary("To be"))
    results = engine.run(prompts, params)
    stopped = 0
    for r in results:
        text = tok.decode([t for t in r.tokens if t not in eos])
        if r.finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(text), dict)
        else:
            assert feed(START, text.encode()) is not None  # still a valid prefix
    assert stopped >= 12  # the budget rule closes the object in time
    assert any(len(r.tokens) > 8 for r in results)


def test_the_processor_masks_to_allowed_tokens(loaded):
    model, tok = loaded
    vocabulary = JsonVocabulary.from_tokenizer(tok, model.config.vocab_size)
    processor = JsonObjectProcessor(vocabulary, {tok.eos_id}, budget=10)
    out = processor([], torch.zeros(model.config.vocab_size))
    allowed = torch.isfinite(out).nonzero().flatten().tolist()
    assert ord("{") in allowed and tok.eos_id not in allowed
    assert all(
        tok.id_to_bytes(t).strip() in (b"", b"{") or tok.id_to_bytes(t).lstrip().startswith(b"{")
        for t in allowed
    )
    assert any(tok.id_to_bytes(t).isspace() for t in allowed)
    tight = JsonObjectProcessor(vocabulary, {tok.eos_id}, budget=3)  # "{", "}", EOS: no room for whitespace
    allowed = torch.isfinite(tight([], torch.zeros(model.config.vocab_size))).nonzero().flatten().tolist()
    assert ord("{") in allowed and not any(tok.id_to_bytes(t).isspace() for t in allowed)
