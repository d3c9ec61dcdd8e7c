"""The sharded classifier's layout, initialisation and partial-FC sampling (no processes needed)."""
import pytest
import torch

from facekd.distributed.classifier import ShardedClassifier, shard_range
from facekd.distributed.world import World

MARGIN = dict(s=64.0, m1=1.0, m2=0.5, m3=0.0)


def _world(rank, world_size):
    return World(rank, world_size, rank, world_size, torch.device("cpu"))  # layout only: no process group


@pytest.mark.parametrize("num_classes,world_size", [(11, 2), (11, 3), (12, 3), (5, 5), (85_742, 8)])
def test_shards_are_contiguous_and_the_first_ranks_hold_one_more(num_classes, world_size):
    ranges = [shard_range(num_classes, world_size, rank) for rank in range(world_size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
    assert all(end == start for (_, end), (start, _) in zip(ranges, ranges[1:]))
    sizes = [end - start for start, end in ranges]
    extra = num_classes % world_size
    assert sizes == [num_classes // world_size + (rank < extra) for rank in range(world_size)]


def test_more_ranks_than_classes_is_refused():
    with pytest.raises(ValueError, match="cannot be sharded over 4 ranks"):
        shard_range(3, 4, 0)


def test_the_initial_centres_do_not_depend_on_the_world_size():
    def whole(world_size):
        return torch.cat([ShardedClassifier(70_001, 4, world=_world(rank, world_size), seed=3, **MARGIN).weight.detach()
                          for rank in range(world_size)])

    two, three = whole(2), whole(3)
    torch.testing.assert_close(two, three, rtol=0, atol=0)
    assert two.shape == (70_001, 4) and 0.009 < two.std().item() < 0.011  # insightface's N(0, 0.01²)
    other_seed = ShardedClassifier(70_001, 4, world=_world(0, 2), seed=4, **MARGIN).weight.detach()
    assert not torch.equal(other_seed, two[:35_001])


def test_sampling_keeps_every_positive_and_is_a_function_of_seed_step_and_rank():
    head = ShardedClassifier(1000, 8, world=_world(1, 2), sample_rate=0.1, seed=5, **MARGIN)
    assert head.class_offset == 500
    labels = torch.tensor([3, 501, 501, 777, 999, 200])
    index = head.sample_classes(labels, step=7)
    assert index.shape == (50,) and torch.equal(index, index.sort().values) and index.unique().numel() == 50
    assert {1, 277, 499} <= set(index.tolist())  # the labels this shard holds, as local rows
    torch.testing.assert_close(head.sample_classes(labels, step=7), index, rtol=0, atol=0)  # a resumed run
    assert not torch.equal(head.sample_classes(labels, step=8), index)
    other_rank = ShardedClassifier(1000, 8, world=_world(0, 2), sample_rate=0.1, seed=5, **MARGIN)
    assert not torch.equal(other_rank.sample_classes(labels, step=7), index)
    # more positives than the sample: all of them, nothing else
    crowded = ShardedClassifier(1000, 8, world=_world(1, 2), sample_rate=0.004, seed=5, **MARGIN)
    assert crowded.sample_classes(labels, step=7).tolist() == [1, 277, 499]
    assert ShardedClassifier(10, 8, **MARGIN).sample_classes(labels % 10, step=0) is None  # sample_rate 1


def test_one_process_with_sampling_takes_global_labels():
    """sample_rate < 1 in one process: the loss is the margin loss over the sampled classes alone, the labels
    mapped to their places in the sample (a one-process run must not read a global label as a position)."""
    from facekd.kernels import margin_softmax_ce

    torch.manual_seed(0)
    head = ShardedClassifier(40, 8, sample_rate=0.25, seed=1, **MARGIN).double()
    embeddings = torch.randn(6, 8, dtype=torch.float64)
    labels = torch.tensor([39, 0, 17, 17, 5, 22])
    index = head.sample_classes(labels, step=3)
    assert index.numel() == 10 and set(labels.tolist()) <= set(index.tolist())
    positions = torch.searchsorted(index, labels)
    expected = margin_softmax_ce(embeddings, head.weight[index], positions, **MARGIN)
    torch.testing.assert_close(head(embeddings, labels, index), expected, rtol=1e-12, atol=0)
