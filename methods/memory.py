"""Exemplar memory: class-balanced image selection and half-batch replacement (SSUL
utils/memory.py::memory_sampling_balanced, main.py::main).

SSUL-M's mechanism, kept generic so that DKD-M (DKD utils/memory.py::memory_sampling_balanced) reuses it:

1. candidates: one record ``(image id, classes)`` per image of the step t−1 training list, with the foreground
   classes present in its label map (:func:`image_classes`, :func:`collect_candidates`); for t > 1 the list
   starts with the previous memory's records (:attr:`Memory.candidates`), followed by the new ones;
2. selection: :func:`select_balanced` (shuffles, then round-robin over the old classes);
3. state: :class:`Memory` (sorted ids = SSUL's ``memory_list``, records = ``memory_candidates``), JSON-safe;
4. memory dataset: the ids repeated (:func:`repeat_to_batch`) and loaded with the training transforms;
5. training: every iteration, B//2 random slots of the batch are replaced by the memory batch's samples in the
   same slots (:func:`memory_slots`, :func:`replace_half`).
"""
from dataclasses import dataclass, field

import numpy as np
import torch

IGNORE_INDEX = 255
BACKGROUND = 0
NOT_CLASSES = (BACKGROUND, IGNORE_INDEX)  # what is not a memory class in a ciss label map

SSUL_MEMORY_VOC = 100  # SSUL-M's memory size (SSUL README)
SSUL_MEMORY_ADE = 300
# the threshold of the candidates' pseudo-labels at t > 1, hard-coded in SSUL utils/memory.py::memory_sampling_balanced
SSUL_MEMORY_PSEUDO_THRESH = 0.7


def image_classes(labels, ignore=NOT_CLASSES, shifted=False):
    """Foreground classes present in each label map (the ``labels`` of a candidate record in SSUL
    utils/memory.py::memory_sampling_balanced).

    ``labels``: integer tensor (B, H, W) (or one map (H, W)) of ciss label positions. Returns one sorted list of
    ints per image (a list of lists; one list for a single map)::

        classes(b) = sorted(unique(labels[b]) \\ ignore)         ignore = {0, 255} by default

    With ``shifted``, the maps are in SSUL's ``--unknown`` training label space (unknown 0, background 1, class
    k at k + 1, 255 ignore) and are shifted back first: ``unique − 1`` without the unknown's −1 and without 255.

    Equivalence with SSUL: with ``--unknown`` SSUL's labels are shifted (unknown −1 after its "− 1", background
    0, class k at k, ignore at 254) and it removed −1 and 0, keeping 254; without unknown it removed 0 and kept
    255. The kept ignore value never equals an old class (< 254), so it never matters for the selection;
    removing 255 here gives the same class sets in unshifted positions.
    """
    ignore = set(int(v) for v in ignore)
    single = labels.dim() == 2
    maps = labels[None] if single else labels
    result = []
    for label_map in maps:
        values = torch.unique(label_map).tolist()
        if shifted:
            values = [v - 1 for v in values if v != IGNORE_INDEX and v != 0]  # 0 = unknown
        result.append([c for c in values if c not in ignore])
    return result[0] if single else result


def collect_candidates(batches, relabel=None, shifted=False):
    """Memory candidate records ``[image id, classes present]``, one per image of ``batches`` in their order
    (SSUL utils/memory.py::memory_sampling_balanced; DKD-M: DKD utils/memory.py::memory_sampling_balanced).

    ``batches``: :class:`methods.base.Batch` objects (``ids``, ``labels`` (B, H, W)). ``relabel(batch) -> labels``
    (optional) replaces a batch's labels before their classes are read: the previous model's pseudo-labels at
    t > 1 (SSUL-M: :func:`methods.ssul.ssul_pseudo_labels` at 0.7 on resized centre crops; DKD-M:
    :func:`methods.dkd.dkd_memory_pseudo_labels` at 0.9 on augmented crops). ``shifted``: labels in SSUL's
    unknown space (see :func:`image_classes`). The two policies differ only in these arguments and in the
    batches they pass; the selection (:func:`select_balanced`, :meth:`Memory.select`) is shared.
    """
    records = []
    for batch in batches:
        labels = batch.labels if relabel is None else relabel(batch)
        classes = image_classes(labels, shifted=shifted)
        records.extend([image_id, present] for image_id, present in zip(batch.ids, classes))
    return records


def _select(candidates, classes, mem_size, seed):
    """Round-robin selection of :func:`select_balanced`; returns ``[(record, class it was picked for), ...]``."""
    rng = np.random.RandomState(seed)
    # a Python list, as SSUL's; the permutation depends only on its length
    pool = [(record, set(int(c) for c in record[1])) for record in candidates]
    rng.shuffle(pool)
    class_order = [int(c) for c in classes]
    rng.shuffle(class_order)
    picks = []
    while len(picks) < mem_size:
        picked_any = False
        for cls in class_order:
            for index, (record, present) in enumerate(pool):
                if cls in present:
                    picks.append((record, cls))
                    del pool[index]
                    picked_any = True
                    break
            if len(picks) >= mem_size:
                break
        # fix: SSUL utils/memory.py::memory_sampling_balanced loops forever once no remaining candidate has an
        # old class; here the selection stops (docs/differences.md)
        if not picked_any:
            break
    return picks


def select_balanced(candidates, classes, mem_size, seed, with_classes=False):
    """SSUL-M's class-balanced memory selection (SSUL utils/memory.py::memory_sampling_balanced).

    ``candidates``: sequence of ``(image id, classes present)`` records; ``classes``: the old foreground classes
    1 … C_{t−1} − 1 in that order; ``mem_size``: images to select; ``seed``: the step's random seed.

    1. shuffle the candidates, then the class order, with one ``np.random.RandomState(seed)`` in that order;
    2. round-robin over the shuffled class order: for each class take the first remaining candidate containing
       it and remove it from the pool; stop as soon as ``mem_size`` images are chosen.

    Returns the chosen ids in selection order (SSUL's ``memory_list`` is them sorted), or with
    ``with_classes`` the pairs ``(id, class it was chosen for)``. Deterministic for a seed.

    This equals SSUL's ``np.random.seed(seed)`` at step start followed by ``np.random.shuffle`` of the candidate
    list and of the class list, provided no other numpy draw happens between its seeding and the selection (in
    SSUL none does). Differences: SSUL loops forever when no remaining candidate contains a class still in the
    rotation (too few candidates, or classes no candidate has); here the selection stops there, with fewer
    than ``mem_size`` images (a fix: docs/differences.md). Duplicate ids in ``candidates`` are treated as
    different records, as in SSUL.
    """
    picks = _select(candidates, classes, mem_size, seed)
    return [(record[0], cls) for record, cls in picks] if with_classes else [record[0] for record, _ in picks]


def _record(record):
    """A JSON-safe ``[id, sorted classes]`` record; also reads SSUL's ``[name, #labels, #fg pixels, labels]``."""
    record = list(record)
    if len(record) == 4:  # SSUL's memory.json record
        record = [record[0], record[3]]
    if len(record) != 2:
        raise ValueError(f"a memory candidate record is [image id, classes], got {record!r}")
    return [record[0], sorted(int(c) for c in record[1])]


@dataclass
class Memory:
    """The memory of one step (SSUL utils/memory.py::memory_sampling_balanced): SSUL's ``memory.json[step_t]``.

    ``ids``: the chosen image ids, sorted (SSUL's ``memory_list``, the memory dataset's images).
    ``candidates``: their ``[id, classes]`` records in SSUL's order (grouped by the class each was chosen for,
    classes in ascending order, selection order within a class: SSUL's ``memory_candidates``); the candidate
    list of step t + 1 starts with them, which keeps the next shuffle equal to SSUL's.
    """
    ids: list = field(default_factory=list)
    candidates: list = field(default_factory=list)

    @classmethod
    def select(cls, candidates, classes, mem_size, seed):
        """Select with :func:`select_balanced` and order the records as SSUL saved them.

        ``classes`` must be in SSUL's order 1 … C_{t−1} − 1 (the records are grouped in that order)."""
        classes = [int(c) for c in classes]
        picks = _select(candidates, classes, mem_size, seed)
        order = {c: i for i, c in enumerate(classes)}
        grouped = sorted(range(len(picks)), key=lambda i: (order[int(picks[i][1])], i))
        records = [_record(picks[i][0]) for i in grouped]
        return cls(ids=sorted(r[0] for r in records), candidates=records)

    def state_dict(self):
        """JSON-safe state: ``{"memory_list": sorted ids, "memory_candidates": [[id, classes], ...]}``."""
        return {"memory_list": list(self.ids), "memory_candidates": [_record(r) for r in self.candidates]}

    @classmethod
    def from_state(cls, state):
        """Inverse of :meth:`state_dict`; also reads an entry ``memory.json["step_t"]`` written by SSUL."""
        return cls(ids=sorted(state["memory_list"]), candidates=[_record(r) for r in state["memory_candidates"]])


def repeat_to_batch(ids, batch_size):
    """SSUL's memory image list (SSUL datasets/voc.py::__init__, ``memory`` split): the list doubled until its
    length is ≥ ``batch_size``."""
    ids = list(ids)
    if not ids:
        raise ValueError("repeat_to_batch: the memory is empty")  # SSUL would loop forever
    while len(ids) < batch_size:
        ids = ids * 2
    return ids


def memory_slots(batch_size, generator):
    """The batch slots replaced by memory samples (SSUL main.py::main): ``randperm(B)[:B // 2]``.

    ``generator``: a CPU ``torch.Generator`` (``None`` draws from the global CPU RNG, as SSUL did). Returns a
    CPU int64 tensor of B // 2 distinct indices in [0, B).
    """
    return torch.randperm(batch_size, generator=generator)[:batch_size // 2]


def replace_half(batch, memory_batch, generator):
    """Replace B // 2 random slots of a batch by the memory batch's samples in the same slots (SSUL
    main.py::main).

    ``batch`` and ``memory_batch``: equal-length sequences of tensors (images, labels, saliency, …), each with
    the same leading batch size B (an entry may be ``None`` in both: it stays ``None``). Returns ``(mixed,
    is_memory)``: new tensors (inputs are not modified) where ``mixed[i][s] = memory_batch[i][s]`` for the slots
    s of :func:`memory_slots`, and a (B,) bool mask of those slots, on the batch's device.
    """
    sizes = {t.shape[0] for t in list(batch) + list(memory_batch) if t is not None}
    if len(batch) != len(memory_batch) or len(sizes) != 1:
        raise ValueError("replace_half: the batch and the memory batch must hold the same tensors with the same "
                         f"batch size, got {len(batch)} and {len(memory_batch)} tensors of sizes {sorted(sizes)}")
    batch_size = sizes.pop()
    slots = memory_slots(batch_size, generator)
    device = next(t.device for t in batch if t is not None)
    is_memory = torch.zeros(batch_size, dtype=torch.bool)
    is_memory[slots] = True
    is_memory = is_memory.to(device)
    mixed = []
    for current, memory in zip(batch, memory_batch):
        if current is None or memory is None:
            if current is not None or memory is not None:
                raise ValueError("replace_half: a tensor is missing from the batch or from the memory batch")
            mixed.append(None)
            continue
        mask = is_memory.to(current.device).view(-1, *([1] * (current.dim() - 1)))
        mixed.append(torch.where(mask, memory.to(device=current.device, dtype=current.dtype), current))
    return mixed, is_memory
