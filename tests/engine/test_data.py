"""engine/data.py: the images and order of rank 0 of an unsynchronised published run (``--no_sync_gradients``)."""
import torch

from engine.data import ReferenceShardSampler, sample_seed


def rank0_order(n, shards):
    """A DistributedSampler of ``shards`` replicas, rank 0, seed 0, shuffle, epoch 0 (torch's rule, written out:
    a permutation from a generator seeded with seed + epoch, padded to a multiple of the replicas, every
    ``shards``-th index from rank 0)."""
    generator = torch.Generator()
    generator.manual_seed(0)
    order = torch.randperm(n, generator=generator).tolist()
    total = -(-n // shards) * shards
    order += order[:total - n]
    return order[0:total:shards]


def test_rank0_of_two_unsynchronised_gpus_with_its_fixed_order():
    dataset = list(range(23))
    sampler = ReferenceShardSampler(dataset, shards=2, replica_batch=4, num_replicas=1, rank=0, seed=7, step=1)
    expected = rank0_order(23, 2)[:12]  # 12 of rank 0's 12 images make 3 full batches of 4
    first = [index for index, _ in sampler]
    sampler.set_epoch(5)
    later = list(sampler)
    assert first == expected and [index for index, _ in later] == expected  # never re-shuffled per epoch
    assert [seed for _, seed in later] == [sample_seed(7, 1, 5, i) for i in expected]  # augmentation still per epoch
    assert len(set(first)) == len(first) and len(sampler) == 12


def test_rank0s_batches_split_over_this_runs_processes():
    dataset = list(range(40))
    order = rank0_order(40, 2)  # 20 images: 2 batches of 8 (4 left over, dropped as drop_last does)
    parts = [[index for index, _ in ReferenceShardSampler(dataset, 2, 8, 4, rank, seed=0, step=1)]
             for rank in range(4)]
    assert all(len(part) == 4 for part in parts)
    for batch in range(2):  # batch b of process r = its 2 images of rank 0's batch b
        assert sum((part[2 * batch:2 * batch + 2] for part in parts), []) == order[8 * batch:8 * batch + 8]
