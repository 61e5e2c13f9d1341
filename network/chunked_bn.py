"""BatchNorm as ``nn.DataParallel`` computes it over several GPUs, on one device: the batch is cut into chunks as
DataParallel scatters it (``torch.chunk``), every chunk is normalised with its own statistics, and only the first
chunk's statistics update the running ones (DataParallel's replicas on the other GPUs update copies of the
buffers that are discarded after the forward; the module on the first GPU is the original). SSUL trained its
step 0 so (SSUL main.py::main: one process, ``nn.DataParallel`` over ``--gpu_id 0,1``); ``--bn_chunks N``
reproduces it. In eval mode, or with one chunk, the layer is a plain ``nn.BatchNorm2d``.
"""
import torch
import torch.nn.functional as F
from torch import nn


class ChunkedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of each of ``chunks`` parts of the batch (same
    parameters, buffers and state-dict keys)."""

    def __init__(self, num_features, chunks, **kwargs):
        super().__init__(num_features, **kwargs)
        self.chunks = int(chunks)

    def forward(self, x):
        if not self.training or self.chunks <= 1 or x.shape[0] < 2:
            return super().forward(x)
        parts = torch.chunk(x, self.chunks, dim=0)
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked)
        else:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum
        outputs = [F.batch_norm(parts[0], self.running_mean, self.running_var, self.weight, self.bias, True,
                                momentum, self.eps)]
        outputs += [F.batch_norm(part, None, None, self.weight, self.bias, True, 0.0, self.eps) for part in parts[1:]]
        return torch.cat(outputs, dim=0)


def convert_chunked_batchnorm(module, chunks):
    """``module`` with every ``nn.BatchNorm2d`` (not a subclass such as SyncBatchNorm) replaced, in place, by a
    :class:`ChunkedBatchNorm2d` of ``chunks`` chunks holding the same parameters and buffers; returns it."""
    if chunks <= 1:
        return module
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            chunked = ChunkedBatchNorm2d(child.num_features, chunks, eps=child.eps, momentum=child.momentum,
                                         affine=child.affine, track_running_stats=child.track_running_stats)
            chunked.load_state_dict(child.state_dict())
            if child.affine:
                chunked.weight, chunked.bias = child.weight, child.bias
            chunked.running_mean, chunked.running_var = child.running_mean, child.running_var
            chunked.num_batches_tracked = child.num_batches_tracked
            chunked.train(child.training)
            setattr(module, name, chunked)
        else:
            convert_chunked_batchnorm(child, chunks)
    return module
