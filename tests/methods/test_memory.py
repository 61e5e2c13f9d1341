"""methods/memory.py: the exemplar memory (SSUL-M: SSUL utils/memory.py::memory_sampling_balanced) on synthetic
candidate lists, candidates collected from batches, mixing memory samples into batches."""
import collections
import json

import numpy as np
import pytest
import torch

from methods import memory
from methods.base import Batch
from methods.memory import collect_candidates


def reference_selection(candidates, prev_num_classes, mem_size, seed):
    """SSUL's selection (SSUL utils/memory.py::memory_sampling_balanced), restated with the global numpy RNG."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        curr = {f"class_{cls}": [] for cls in range(1, prev_num_classes)}
        pool = [list(c) for c in candidates]
        np.random.shuffle(pool)
        order = list(range(1, prev_num_classes))
        np.random.shuffle(order)
        taken = []
        while mem_size > len(taken):
            for cls in order:
                for idx, mem in enumerate(pool):
                    if cls in mem[1]:
                        curr[f"class_{cls}"].append(mem)
                        taken.append(mem[0])
                        del pool[idx]
                        break
                if mem_size <= len(taken):
                    break
        grouped = [mem for mems in curr.values() for mem in mems]
        return taken, grouped
    finally:
        np.random.set_state(state)


def synthetic_candidates(n=40, n_classes=6, seed=0):
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        k = rng.randint(1, 3)
        out.append((f"img{i:03d}", sorted(set(rng.randint(1, n_classes, size=k).tolist()))))
    return out


def test_image_classes():
    labels = torch.tensor([[[0, 3, 3], [255, 1, 0]], [[0, 0, 255], [0, 0, 0]]])
    assert memory.image_classes(labels) == [[1, 3], []]
    assert memory.image_classes(labels[0]) == [1, 3]
    assert memory.image_classes(labels, ignore=(255,)) == [[0, 1, 3], [0]]
    # SSUL's shifted space: unknown 0, background 1, class k at k + 1
    shifted = torch.tensor([[[0, 1, 4], [255, 2, 0]], [[1, 1, 255], [0, 0, 0]]])
    assert memory.image_classes(shifted, shifted=True) == [[1, 3], []]


def test_selection_is_deterministic_and_seed_dependent():
    candidates = synthetic_candidates()
    classes = list(range(1, 6))
    first = memory.select_balanced(candidates, classes, 10, seed=3)
    assert first == memory.select_balanced(candidates, classes, 10, seed=3)
    assert len(first) == len(set(first)) == 10
    others = [memory.select_balanced(candidates, classes, 10, seed=s) for s in (4, 5, 6)]
    assert any(o != first for o in others)


def test_selection_is_class_balanced():
    # 12 single-class images per class 1..5: 10 picks give exactly 2 per class
    candidates = [(f"c{c}_{i}", [c]) for c in range(1, 6) for i in range(12)]
    picks = memory.select_balanced(candidates, range(1, 6), 10, seed=1, with_classes=True)
    counts = collections.Counter(cls for _, cls in picks)
    assert counts == {c: 2 for c in range(1, 6)}
    assert all(name.startswith(f"c{cls}_") for name, cls in picks)
    # 7 picks: two full rounds are not reached; every class at least once, none more than twice
    counts = collections.Counter(cls for _, cls in memory.select_balanced(candidates, range(1, 6), 7, 1, True))
    assert sorted(counts.values()) == [1, 1, 1, 2, 2]


def test_selection_terminates_when_candidates_run_out():
    candidates = [("a", [1]), ("b", [2, 3]), ("c", [2]), ("none", [])]
    # 4 classes, one of which (4) no candidate has; fewer usable candidates (3) than mem_size (10)
    chosen = memory.select_balanced(candidates, [1, 2, 3, 4], 10, seed=0)
    assert sorted(chosen) == ["a", "b", "c"]
    assert memory.select_balanced([], [1, 2], 5, seed=0) == []
    assert memory.select_balanced(candidates, [1, 2], 0, seed=0) == []
    # remaining candidates only hold classes that are not in the rotation
    assert memory.select_balanced([("x", [1]), ("y", [7]), ("z", [7])], [1, 2], 3, seed=0) == ["x"]


@pytest.mark.parametrize("seed,mem_size", [(1, 8), (7, 13), (42, 20)])
def test_selection_equals_reference(seed, mem_size):
    candidates = synthetic_candidates(n=50, n_classes=6, seed=seed)
    state = np.random.get_state()
    taken, grouped = reference_selection(candidates, 6, mem_size, seed)
    assert len(taken) == mem_size
    assert memory.select_balanced(candidates, range(1, 6), mem_size, seed) == taken
    mem = memory.Memory.select(candidates, range(1, 6), mem_size, seed)
    assert mem.ids == sorted(taken)
    assert mem.candidates == [[name, sorted(labels)] for name, labels in grouped]
    assert all(a == b for a, b in zip(np.random.get_state()[1], state[1]))  # global numpy state untouched


def test_memory_state_round_trip():
    candidates = synthetic_candidates(n=30, seed=2)
    mem = memory.Memory.select(candidates, range(1, 6), 6, seed=5)
    state = json.loads(json.dumps(mem.state_dict()))
    assert memory.Memory.from_state(state) == mem
    assert state["memory_list"] == sorted(state["memory_list"])
    # SSUL's memory.json records [name, #labels, #fg pixels, labels]
    ssul_entry = {"memory_list": ["b", "a"], "memory_candidates": [["b", 2, 140, [3, 1]], ["a", 1, 20, [2]]]}
    loaded = memory.Memory.from_state(ssul_entry)
    assert loaded.ids == ["a", "b"] and loaded.candidates == [["b", [1, 3]], ["a", [2]]]


def test_repeat_to_batch():
    assert memory.repeat_to_batch(["a", "b", "c"], 8) == ["a", "b", "c"] * 4
    assert memory.repeat_to_batch(["a", "b"], 2) == ["a", "b"]
    with pytest.raises(ValueError):
        memory.repeat_to_batch([], 4)


def test_memory_slots():
    slots = memory.memory_slots(6, torch.Generator().manual_seed(0))
    assert slots.tolist() == memory.memory_slots(6, torch.Generator().manual_seed(0)).tolist()
    assert len(slots) == 3 and len(set(slots.tolist())) == 3 and all(0 <= s < 6 for s in slots.tolist())
    assert len(memory.memory_slots(5, None)) == 2
    with torch.random.fork_rng():  # None: the global RNG, as SSUL's randperm(B)[:B//2]
        torch.manual_seed(3)
        expected = torch.randperm(8)[:4]
        torch.manual_seed(3)
        assert torch.equal(memory.memory_slots(8, None), expected)


def test_replace_half():
    images = torch.zeros(4, 1, 2, 2)
    labels = torch.zeros(4, 2, 2, dtype=torch.long)
    m_images = torch.arange(1, 5, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()
    m_labels = torch.arange(1, 5).view(4, 1, 1).expand(4, 2, 2).clone()
    (mixed_images, mixed_labels, none), is_memory = memory.replace_half(
        [images, labels, None], [m_images, m_labels, None], torch.Generator().manual_seed(1))
    assert none is None and is_memory.dtype == torch.bool and int(is_memory.sum()) == 2
    for b in range(4):
        want = float(b + 1) if is_memory[b] else 0.0
        assert (mixed_images[b] == want).all() and (mixed_labels[b] == int(want)).all()
    assert (images == 0).all() and (labels == 0).all()  # inputs untouched
    slots = memory.memory_slots(4, torch.Generator().manual_seed(1))
    assert sorted(slots.tolist()) == torch.nonzero(is_memory).flatten().tolist()
    with pytest.raises(ValueError):
        memory.replace_half([images], [m_images[:3]], None)


def test_collect_candidates_with_and_without_relabelling():
    batch = Batch(None, torch.tensor([[[0, 2], [255, 2]], [[0, 0], [0, 0]]]), ids=("x", "y"))
    assert collect_candidates([batch]) == [["x", [2]], ["y", []]]
    relabelled = collect_candidates([batch], relabel=lambda b: torch.where(b.labels == 0, 5, b.labels))
    assert relabelled == [["x", [2, 5]], ["y", [5]]]
