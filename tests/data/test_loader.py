import json

import numpy as np
import pytest
import torch

from lmstack.data.loader import TokenBatches, epoch_permutation, eval_batches, splitmix64, splitmix64_int
from lmstack.data.shards import write_shard
from lmstack.errors import InputError


@pytest.fixture
def shard(tmp_path):
    """1,000 tokens whose value is their position mod 997 (EOS 999 after the single document)."""
    path = tmp_path / "train.bin"
    write_shard(path, [[i % 997 for i in range(999)]], vocab_size=1000, eos_id=999)
    return path


def take(batches, n):
    return [next(batches) for _ in range(n)]


def test_shapes_and_shift(shard):
    x, y = next(TokenBatches(shard, 4, 16, seed=0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.all((y[:, -1] == x[:, -1] + 1) | (y[:, -1] == 999) | (x[:, -1] == 996))


def test_same_seed_same_batches_other_seed_differs(shard):
    a = take(TokenBatches(shard, 4, 16, seed=3), 5)
    b = take(TokenBatches(shard, 4, 16, seed=3), 5)
    c = take(TokenBatches(shard, 4, 16, seed=4), 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_each_epoch_visits_every_window_once(shard):
    batches = TokenBatches(shard, 8, 10, seed=0)  # 99 windows
    starts = [int(row[0]) for x, _ in take(batches, 99) for row in x]  # 792 items: 8 epochs
    for epoch in range(7):
        seen = sorted(starts[epoch * 99 : (epoch + 1) * 99])
        assert seen == [w * 10 % 997 for w in range(99)]
    assert starts[:99] != starts[99:198]  # a fresh shuffle every epoch


def test_resume_continues_with_the_same_batches(shard):
    straight = take(TokenBatches(shard, 4, 16, seed=1), 40)
    first = TokenBatches(shard, 4, 16, seed=1)
    take(first, 25)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able ints
    resumed = TokenBatches(shard, 4, 16, seed=1)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(straight[25:], take(resumed, 15)):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_resume_refuses_other_settings(shard):
    state = TokenBatches(shard, 4, 16, seed=1).state_dict()
    with pytest.raises(InputError, match="batch_size"):
        TokenBatches(shard, 8, 16, seed=1).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_together_equal_one_process(shard, world_size):
    single = take(TokenBatches(shard, 8, 12, seed=5), 30)
    ranks = [
        take(TokenBatches(shard, 8, 12, seed=5, rank=r, world_size=world_size), 30) for r in range(world_size)
    ]
    for step, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[r][step][0] for r in range(world_size)]), x)
        assert torch.equal(torch.cat([ranks[r][step][1] for r in range(world_size)]), y)


def test_corpus_smaller_than_one_batch(tmp_path):
    path = tmp_path / "tiny.bin"
    write_shard(path, [[1, 2, 3]], vocab_size=10, eos_id=9)
    with pytest.raises(InputError, match="corpus smaller than one batch"):
        TokenBatches(path, 2, 8, seed=0)
    with pytest.raises(InputError, match="split evenly"):
        TokenBatches(path, 3, 2, seed=0, world_size=2)


def test_eval_batches_cover_the_shard_in_order(shard):
    batches = list(eval_batches(shard, 4, 10))
    assert [x.shape[0] for x, _ in batches] == [4] * 24 + [3]  # 99 windows
    xs = torch.cat([x for x, _ in batches]).flatten()
    ys = torch.cat([y for _, y in batches]).flatten()
    tokens = torch.tensor([i % 997 for i in range(999)] + [999])
    assert torch.equal(xs, tokens[:990]) and torch.equal(ys, tokens[1:991])
    assert len(list(eval_batches(shard, 4, 10, max_batches=3))) == 3
    split = [list(eval_batches(shard, 4, 10, rank=r, world_size=2)) for r in range(2)]
    merged = [split[i % 2][i // 2] for i in range(25)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(merged, batches))


def test_eval_on_a_split_shorter_than_the_context(tmp_path):
    path = tmp_path / "val.bin"
    write_shard(path, [[1, 2, 3]], vocab_size=10, eos_id=9)
    ((x, y),) = list(eval_batches(path, 8, 64))
    assert x.tolist() == [[1, 2, 3]] and y.tolist() == [[2, 3, 9]]


def test_permutation_is_a_permutation_and_pinned():
    perm = epoch_permutation(1000, seed=0, epoch=0)
    assert sorted(perm.tolist()) == list(range(1000))
    assert not np.array_equal(perm, epoch_permutation(1000, seed=0, epoch=1))
    # plain integer arithmetic, so resuming under another NumPy version gives the same order
    assert epoch_permutation(8, seed=0, epoch=0).tolist() == [0, 1, 6, 3, 5, 4, 2, 7]
    assert epoch_permutation(8, seed=7, epoch=3).tolist() == [2, 1, 7, 6, 3, 4, 0, 5]


def test_vectorised_splitmix64_matches_the_scalar_reference():
    xs = [0, 1, 2**63, 2**64 - 1, 0x123456789ABCDEF]
    assert splitmix64(np.array(xs, dtype=np.uint64)).tolist() == [splitmix64_int(x) for x in xs]
    assert splitmix64_int(0) == 0xE220A8397B1DCDAF  # first output of SplitMix64 seeded with 0
