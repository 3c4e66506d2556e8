"""The task sampler's shards: disjoint, making up the one-process meta-batch, one state for every rank
that re-shards under another world size; a meta-batch smaller than the world. Training and
evaluation over two processes: tests/integration/test_distributed.py."""

import pytest
import torch

from metaseg.engine import distributed


def test_meta_batch_smaller_than_the_world_is_a_config_error():
    from metaseg.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="meta.meta_batch=1 is smaller than the 2 processes"):
        distributed.check_meta_batch(1, 2)
    distributed.check_meta_batch(3, 2)  # uneven shares are fine: 1 and 2 tasks


def _sampler(seed=3):
    from metaseg.data.tasks import TaskSampler

    datasets = {name: torch.utils.data.TensorDataset(torch.full((12, 1, 2, 2), float(d)) + torch.arange(12).view(
        12, 1, 1, 1), torch.zeros(12, 2, 2, dtype=torch.long)) for d, name in enumerate("abc")}
    return TaskSampler(datasets, [1, 2, 3], shots=2, query=2, seed=seed)


def _key(task):
    return task.dataset, task.support[0][:, 0, 0, 0].tolist(), task.query[0][:, 0, 0, 0].tolist()


@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_disjoint_and_make_up_the_one_process_batch(world):
    one = _sampler()
    shards = [_sampler().shard(r, world) for r in range(world)]
    for _ in range(3):  # several steps: every rank's stream advances by the whole meta-batch
        expected = [_key(t) for t in one.sample_batch(5)]
        got = [_key(t) for s in shards for t in s.sample_batch(5)]
        assert got == expected
        assert [len(s.share(5)) for s in shards] == ([2, 3] if world == 2 else [1, 2, 2])


def test_sampler_state_reshards_under_another_world_size():
    two = [_sampler().shard(r, 2) for r in range(2)]
    for s in two:
        list(s.sample_batch(4))
    state = two[0].state_dict()
    assert state == two[1].state_dict()  # one state for every rank: nothing to merge
    one, reference = _sampler(), _sampler()
    one.load_state_dict(state)
    list(reference.sample_batch(4))
    assert [_key(t) for t in one.sample_batch(4)] == [_key(t) for t in reference.sample_batch(4)]
