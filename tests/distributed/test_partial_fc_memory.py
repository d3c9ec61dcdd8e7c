"""classifier_memory against the tensors a rank actually allocates: its ShardedClassifier shard, the shard's
gradient after a backward, SGD's momentum buffer after a step, a bf16 teacher shard, the partial-FC sample.

Ranks are simulated one at a time: a World with no process group (its all-reduce is the identity) gives a
ShardedClassifier every rank's shapes; the loss then covers only that shard's classes, which changes no size.
"""
import pytest
import torch

from facekd.distributed.classifier import ShardedClassifier, classifier_memory, shard_range
from facekd.distributed.world import World

ARCFACE = dict(s=64.0, m1=1.0, m2=0.5, m3=0.0)
# (C, W, D): C not divisible by W in each; an odd D; a shard of one or two classes
SHAPES = [(10_007, 3, 40), (1271, 4, 17), (41, 8, 24), (9, 8, 8)]


def simulated_rank(rank, world_size):
    return World(rank, world_size, 0, 1, torch.device("cpu"))


def trained_shard(num_classes, world_size, rank, dim, *, batch, sample_rate):
    """A rank's shard after one margin-loss backward and one SGD step (momentum 0.9, weight decay 5e-4, as the
    trainer's classifier optimiser), and the class_index that step used."""
    shard = ShardedClassifier(num_classes, dim, **ARCFACE, world=simulated_rank(rank, world_size),
                              sample_rate=sample_rate, seed=1)
    generator = torch.Generator().manual_seed(rank)
    embeddings = torch.randn(world_size * batch, dim, generator=generator)
    labels = torch.randint(0, num_classes, (world_size * batch,), generator=generator)
    class_index = shard.sample_classes(labels, step=3)
    optimiser = torch.optim.SGD(shard.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    optimiser.zero_grad(set_to_none=True)
    shard(embeddings, labels, class_index).backward()
    optimiser.step()
    return shard, optimiser, class_index


@pytest.mark.parametrize("num_classes,world_size,dim", SHAPES)
@pytest.mark.parametrize("sample_rate", [1.0, 0.3])
def test_state_bytes_are_the_allocated_tensors_of_every_rank(num_classes, world_size, dim, sample_rate):
    for rank in range(world_size):
        shard, optimiser, _ = trained_shard(num_classes, world_size, rank, dim, batch=5, sample_rate=sample_rate)
        teacher = torch.zeros_like(shard.weight, dtype=torch.bfloat16)
        memory = classifier_memory(num_classes, world_size, dim, rank=rank, teacher_dtype=torch.bfloat16)
        momentum = optimiser.state[shard.weight]["momentum_buffer"]
        assert (memory["classes"], memory["class_offset"]) == (shard.num_local, shard.class_offset)
        assert memory["centres"] == shard.weight.nbytes
        assert memory["gradient"] == shard.weight.grad.nbytes  # dense, also when only K rows were sampled
        assert memory["momentum"] == momentum.nbytes
        assert memory["teacher"] == teacher.nbytes
        assert memory["state"] == shard.weight.nbytes + shard.weight.grad.nbytes + momentum.nbytes + teacher.nbytes


@pytest.mark.parametrize("num_classes,world_size,dim", SHAPES + [(2_059_906, 64, 512), (30_000_001, 8, 512)])
def test_first_c_mod_w_ranks_hold_one_more(num_classes, world_size, dim):
    base, extra = divmod(num_classes, world_size)
    counts = [classifier_memory(num_classes, world_size, dim, rank=r)["classes"] for r in range(world_size)]
    assert counts == [base + 1] * extra + [base] * (world_size - extra)
    offsets = [classifier_memory(num_classes, world_size, dim, rank=r)["class_offset"] for r in range(world_size)]
    assert offsets == [shard_range(num_classes, world_size, r)[0] for r in range(world_size)]
    centres = sum(classifier_memory(num_classes, world_size, dim, rank=r)["centres"] for r in range(world_size))
    assert centres == num_classes * dim * 4  # the shards add up to the whole fp32 matrix, nothing twice


def test_options_switch_their_terms_off_and_dtypes_set_their_sizes():
    plain = classifier_memory(1001, 4, 16, rank=3, momentum=False, teacher_dtype=None)
    assert plain["classes"] == 250 and plain["momentum"] == 0 and plain["teacher"] == 0
    assert plain["state"] == plain["centres"] + plain["gradient"] == 2 * 250 * 16 * 4
    half = classifier_memory(1001, 4, 16, rank=0, weight_dtype=torch.float16, teacher_dtype=torch.float32)
    assert half["centres"] == 251 * 16 * 2 and half["teacher"] == 251 * 16 * 4
    assert "sampled_classes" not in plain  # per-step terms only with a batch size


@pytest.mark.parametrize("num_classes,world_size,dim", [(10_007, 3, 40), (1271, 4, 17)])
def test_sampled_classes_are_what_the_sampler_draws(num_classes, world_size, dim):
    batch, sample_rate = 2, 0.1
    for rank in range(world_size):
        shard = ShardedClassifier(num_classes, dim, **ARCFACE, world=simulated_rank(rank, world_size),
                                  sample_rate=sample_rate)
        # labels of another rank's classes only: the sample is the drawn negatives alone
        other = shard_range(num_classes, world_size, (rank + 1) % world_size)[0]
        labels = torch.full((world_size * batch,), other)
        class_index = shard.sample_classes(labels, step=0)
        memory = classifier_memory(num_classes, world_size, dim, rank=rank, batch_size=batch,
                                   sample_rate=sample_rate)
        assert memory["sampled_classes"] == class_index.numel()
        assert memory["class_index"] == class_index.nbytes + torch.rand(shard.num_local).nbytes
        gathered = torch.empty(world_size * batch, dim), torch.empty(world_size * batch, dim, dtype=torch.bfloat16)
        assert memory["gathered_embeddings"] == sum(tensor.nbytes for tensor in gathered)
        assert memory["kd_logits_unfused"] == 2 * torch.empty(world_size * batch, shard.num_local).nbytes


def test_without_sampling_every_class_is_used_and_no_index_is_drawn():
    memory = classifier_memory(1271, 4, 17, rank=1, batch_size=3, teacher_dtype=None)
    assert memory["sampled_classes"] == memory["classes"] == 318
    assert memory["class_index"] == 0 and memory["kd_logits_unfused"] == 0
    assert memory["gathered_embeddings"] == 4 * 3 * 17 * 4


@pytest.mark.parametrize("bad,message", [
    (dict(num_classes=3, world_size=4), "cannot be sharded"),
    (dict(rank=4), "rank must be in"),
    (dict(sample_rate=0.0), "sample_rate must be in"),
    (dict(batch_size=0), "batch_size must be"),
    (dict(embedding_dim=0), "embedding_dim must be"),
])
def test_bad_arguments_are_refused_by_name(bad, message):
    arguments = dict(num_classes=100, world_size=4, embedding_dim=8) | bad
    rank = arguments.pop("rank", 0)
    with pytest.raises(ValueError, match=message):
        classifier_memory(**arguments, rank=rank)
