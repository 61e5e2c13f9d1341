"""Incremental methods behind one interface (``methods/base.py``), one file each; the loss terms several methods
share are in ``methods/losses.py``. Every method is registered in :data:`METHODS`, the one table of methods.

``get_method(name, dataset="voc", **overrides)`` returns a method with its reference hyper-parameters for
``dataset``, with ``overrides`` (hyper-parameter names) applied.
"""
import dataclasses

from methods.barm import BARM
from methods.dkd import DKD
from methods.ewc import EWCMethod
from methods.finetune import FineTune
from methods.ilt import ILT
from methods.kproba import KProBA
from methods.lwf import LwF, LwFMC
from methods.mib import MiB
from methods.pi import PIMethod
from methods.plop import PLOP
from methods.rcil import RCIL
from methods.rw import RWMethod
from methods.ssul import SSUL
from utils.errors import UserError

#: The methods, by ``--method`` name.
METHODS = {cls.name: cls for cls in (BARM, FineTune, MiB, PLOP, LwF, LwFMC, ILT, EWCMethod, PIMethod, RWMethod, DKD,
                                     RCIL, SSUL, KProBA)}


def list_methods():
    return list(METHODS)


def get_method_class(name):
    if name not in METHODS:
        raise UserError(f"unknown method '{name}': expected one of {', '.join(METHODS)}")
    return METHODS[name]


def get_method(name, dataset="voc", **overrides):
    """The method ``name`` with the reference hyper-parameters for ``dataset`` and ``overrides`` applied."""
    cls = get_method_class(name)
    defaults = cls.default_hyper(dataset)
    known = {f.name for f in dataclasses.fields(defaults)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"method {name} has no hyper-parameter {', '.join(unknown)}:"
                        f" expected {', '.join(sorted(known))}")
    return cls(dataclasses.replace(defaults, **overrides), dataset=dataset)
