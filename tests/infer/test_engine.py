"""The continuous-batching engine: batched outputs equal solo outputs, preemption never loses a request,
cancel frees blocks. Models run in float64 so batch-size-dependent rounding cannot flip a choice."""

from __future__ import annotations

import pytest
import torch

from lmstack.infer import Engine, SamplingParams, generate

PROMPTS = [
    [1, 5, 9],
    [40, 2, 2, 7, 13, 8, 30, 31, 32, 33, 1],
    [7],
    [3, 3, 3, 3, 3, 3],
    [50, 51],
    [9, 8, 7, 6, 5, 4, 3, 2],
]
PARAMS = [
    SamplingParams(max_new_tokens=14, stop_ids=()),
    SamplingParams(max_new_tokens=9, temperature=0.9, top_p=0.9, seed=1, stop_ids=()),
    SamplingParams(max_new_tokens=20, temperature=1.2, top_k=10, seed=2, stop_ids=()),
    SamplingParams(max_new_tokens=6, repetition_penalty=1.5, no_repeat_ngram_size=2, stop_ids=()),
    SamplingParams(
        max_new_tokens=17,
        temperature=0.7,
        min_p=0.1,
        frequency_penalty=0.5,
        presence_penalty=0.3,
        seed=3,
        stop_ids=(),
    ),
    SamplingParams(max_new_tokens=11, logprobs=2, stop_ids=()),
]


def _solo(model, prompt, params):
    return Engine(model, max_batch=1, kv_blocks=64, block_size=4).run([prompt], params)[0]


def test_batched_outputs_equal_solo_outputs(make_tiny):
    model = make_tiny(seed=3)
    engine = Engine(model, max_batch=3, kv_blocks=64, block_size=4)
    batched = engine.run(PROMPTS, PARAMS)
    for prompt, params, got in zip(PROMPTS, PARAMS, batched):
        solo = _solo(model, prompt, params)
        assert got.tokens == solo.tokens and got.finish_reason == solo.finish_reason == "length"
        assert len(got.tokens) == params.max_new_tokens
    # greedy requests also agree with `generate`, and log-probabilities with the raw model
    assert batched[0].tokens == generate(model, [PROMPTS[0]], max_new_tokens=14, stop_ids=())[0]
    ref = generate(model, [PROMPTS[5]], max_new_tokens=11, stop_ids=(), logprobs=2, details=True)[0]
    assert batched[5].tokens == ref.tokens
    assert torch.allclose(torch.tensor(batched[5].logprobs), torch.tensor(ref.logprobs), atol=1e-9)
    assert engine.stats["peak_blocks"] > 0 and engine.cache.blocks_in_use == 0


def test_requests_join_and_leave_every_step(make_tiny):
    model = make_tiny(seed=3)
    engine = Engine(model, max_batch=2, kv_blocks=64, block_size=4)
    ids = [
        engine.submit(p, SamplingParams(max_new_tokens=n, stop_ids=()))
        for p, n in zip(PROMPTS[:4], (2, 8, 3, 5))
    ]
    batch_sizes, finished_at = [], {}
    step = 0
    while engine.has_work():
        for event in engine.step():
            if event.finished:
                finished_at[event.request_id] = step
        batch_sizes.append(len(engine.running))
        step += 1
    assert set(finished_at) == set(ids)
    assert max(batch_sizes) <= 2
    assert (
        finished_at[ids[0]] < finished_at[ids[1]] and finished_at[ids[2]] < finished_at[ids[1]]
    )  # 2 joined as 0 left


def test_tiny_block_pool_forces_preemption_and_every_request_completes(make_tiny):
    model = make_tiny(seed=4)
    # 12 blocks of 4 slots = 48 tokens for 4 running requests that each grow to ~20-30 tokens
    engine = Engine(model, max_batch=4, kv_blocks=12, block_size=4)
    batched = engine.run(PROMPTS, PARAMS)
    assert engine.stats["preemptions"] > 0
    for prompt, params, got in zip(PROMPTS, PARAMS, batched):
        assert got.tokens == _solo(model, prompt, params).tokens
    assert engine.cache.blocks_in_use == 0 and not engine.has_work()


def test_cancel_frees_blocks(make_tiny):
    model = make_tiny(seed=3)
    engine = Engine(model, max_batch=4, kv_blocks=32, block_size=4)
    keep = engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=10, stop_ids=()))
    drop = engine.submit(PROMPTS[5], SamplingParams(max_new_tokens=30, stop_ids=()))
    queued = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=5, stop_ids=()))
    engine.max_batch = 2  # the third request waits in the queue
    for _ in range(3):
        engine.step()
    used = engine.cache.blocks_in_use
    held = len(engine.cache.tables[drop])
    assert engine.cancel(drop) and engine.cancel(queued)
    assert engine.cache.blocks_in_use == used - held
    assert not engine.cancel(drop)  # already gone
    events = engine.step()
    assert {(e.request_id, e.finish_reason) for e in events if e.finished} >= {
        (drop, "cancelled"),
        (queued, "cancelled"),
    }
    rest = list(engine.stream())
    assert rest[-1].request_id == keep and rest[-1].finished
    assert engine.cache.blocks_in_use == 0


def test_stop_ids_context_limit_and_bad_requests(make_tiny):
    model = make_tiny(seed=3, max_seq_len=16)
    free = generate(model, [PROMPTS[0]], max_new_tokens=10, stop_ids=())[0]
    engine = Engine(model, max_batch=2, kv_blocks=16, block_size=4)
    stopped, capped = engine.run(
        [PROMPTS[0], PROMPTS[1]],
        [
            SamplingParams(max_new_tokens=10, stop_ids=(free[4],)),
            SamplingParams(max_new_tokens=50, stop_ids=()),
        ],
    )
    assert stopped.tokens == free[: free.index(free[4]) + 1] and stopped.finish_reason == "stop"
    assert len(capped.tokens) == 16 - len(PROMPTS[1]) and capped.finish_reason == "length"
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError, match="17 tokens is longer than the model's context of 16"):
        engine.submit(list(range(17)), SamplingParams())
    with pytest.raises(ValueError, match="raise kv_blocks"):
        Engine(model, max_batch=1, kv_blocks=2, block_size=4).submit(
            [1, 2, 3], SamplingParams(max_new_tokens=10)
        )
