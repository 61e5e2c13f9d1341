"""Backbone weights: torchvision ImageNet files or local files (BARM network/backbone/resnet.py::model_urls).

ImageNet weights are the legacy torchvision "V1" files BARM and SSUL download, fetched with
``torch.hub.load_state_dict_from_url`` and cached under ``$TORCH_HOME/hub/checkpoints``. A cached file
is read without touching the network. A local file may be a torchvision-layout ResNet state dict
(with or without ``fc.*``, optionally wrapped in ``state_dict``/``model`` and/or prefixed with
``module.``) or a whole model checkpoint (BARM/SSUL ``{"model_state": ...}`` or a bare model state
dict) whose ``backbone.*`` keys are taken. Weights load strictly, ``fc.*`` aside.
"""
import http.client
import os
import pickle
from collections.abc import Mapping

import torch

from utils.checkpoint import load_checkpoint_file
from utils.errors import UserError

#: ImageNet weights used by BARM/SSUL (BARM network/backbone/resnet.py::model_urls).
IMAGENET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-5c106cde.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-19c8e357.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-5d3b4d8f.pth",
}

_HOW_TO_AVOID = (
    "pass a local copy with --pretrained PATH (a torchvision ResNet state dict or a checkpoint with "
    "backbone.* weights) or train from random backbone weights with --no_pretrained"
)
_LISTED_KEYS = 5


def imagenet_cache_path(arch):
    """Where ``torch.hub`` caches the ImageNet file of ``arch`` (``$TORCH_HOME/hub/checkpoints/<name>``)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(IMAGENET_URLS[arch]))


def imagenet_state_dict(arch):
    """The torchvision ImageNet state dict of ``arch``, from the hub cache or downloaded into it.

    Raises:
        UserError: not cached and the download fails, or the cached/downloaded file is unreadable.
    """
    if arch not in IMAGENET_URLS:
        raise UserError(f"no ImageNet weights for backbone {arch!r}: expected one of {', '.join(IMAGENET_URLS)}")
    url, cached = IMAGENET_URLS[arch], imagenet_cache_path(arch)
    if os.path.isfile(cached):
        return load_checkpoint_file(cached)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, weights_only=True)
    except (OSError, http.client.HTTPException) as err:
        raise UserError(
            f"ImageNet weights for {arch} are needed: {os.path.basename(cached)} is not in the cache "
            f"{os.path.dirname(cached)} and downloading {url} failed ({err}); {_HOW_TO_AVOID}"
        ) from err
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise UserError(
            f"the downloaded ImageNet weights {cached} could not be read ({err}); delete the file and retry, "
            f"or {_HOW_TO_AVOID}"
        ) from err


def _unwrap_state_dict(obj, path):
    """Pick the backbone state dict out of a loaded file (see the module docstring for the layouts)."""
    if not isinstance(obj, Mapping):
        raise UserError(
            f"pretrained file {path} holds a {type(obj).__name__}: expected a state dict (a dict of tensors)"
        )
    if isinstance(obj.get("model_state"), Mapping):
        obj = obj["model_state"]
    else:
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(
            f"pretrained file {path} is not a state dict: entry {not_tensors[0]!r} is a "
            f"{type(state[not_tensors[0]]).__name__}, expected tensors only"
        )
    return state


def read_backbone_state_dict(path):
    """Read a local pretrained file and return its backbone state dict (torchvision key names)."""
    return _unwrap_state_dict(load_checkpoint_file(path), path)


def _first(keys):
    listed = ", ".join(keys[:_LISTED_KEYS])
    return f"{listed}, ... ({len(keys)} in all)" if len(keys) > _LISTED_KEYS else listed


def load_backbone_weights(backbone, state_dict, source):
    """Load ``state_dict`` into ``backbone`` strictly, ignoring ``fc.*`` (dropped by BARM's layer getter).

    BN ``num_batches_tracked`` may be absent (the legacy torchvision files predate it); the
    backbone's own counters are kept then.

    Raises:
        UserError: naming ``source`` and the first missing, unexpected or mis-shaped keys.
    """
    state = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
        for k in state if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        problems = [
            f"{label}: {_first(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if keys
        ]
        raise UserError(
            f"pretrained weights {source} do not fit the {backbone.arch} backbone: expected a "
            f"torchvision {backbone.arch} state dict; {'; '.join(problems)}"
        )
    for key, value in expected.items():
        state.setdefault(key, value)
    backbone.load_state_dict(state, strict=True)


def load_pretrained_backbone(backbone, pretrained):
    """Load ``pretrained`` (``"imagenet"`` or a local file path) into ``backbone``."""
    if pretrained == "imagenet":
        state, source = imagenet_state_dict(backbone.arch), f"ImageNet {imagenet_cache_path(backbone.arch)}"
    else:
        state, source = read_backbone_state_dict(pretrained), str(pretrained)
    load_backbone_weights(backbone, state, source)
