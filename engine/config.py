"""The resolved settings of a run, read-only.

The command line is parsed once (:mod:`engine.cli`) into a :class:`RunConfig`: every flag's value, the flags
the user gave (``explicit``) and where each value came from (``source``). Nothing changes it afterwards: what a
step adopts from its previous checkpoint (its model), or ``--test`` from the checkpoint it evaluates (its
evaluation settings), makes a new configuration with :meth:`RunConfig.replace`, recorded with its source.
"""

COMMAND_LINE = "command line"
DEFAULT = "default"


class RunConfig:
    """Flag values by attribute (``config.crop_size``), read-only.

    ``values``: flag name -> value; ``explicit``: the names given on the command line; ``sources``: name ->
    where the value came from (default: "command line" for the explicit names, "default" for the others).
    """

    __slots__ = ("_values", "_explicit", "_sources")

    def __init__(self, values, explicit=(), sources=None):
        explicit = tuple(sorted(explicit))
        sources = dict(sources or {})
        for name in values:
            sources.setdefault(name, COMMAND_LINE if name in explicit else DEFAULT)
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_explicit", explicit)
        object.__setattr__(self, "_sources", sources)

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"the run configuration has no setting {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError(f"the run configuration is read-only (tried to set {name!r}): use replace()")

    def __reduce__(self):
        return type(self), (self._values, self._explicit, self._sources)

    def __contains__(self, name):
        return name in self._values

    def __eq__(self, other):
        return isinstance(other, RunConfig) and (self._values, self._explicit) == (other._values, other._explicit)

    def __repr__(self):
        return f"RunConfig({self._values!r})"

    @property
    def explicit(self):
        """The names of the flags given on the command line."""
        return self._explicit

    def source(self, name):
        """Where the value of ``name`` came from ("command line", "default", or what :meth:`replace` said)."""
        return self._sources[name]

    def replace(self, source, **changes):
        """A new configuration with ``changes``, whose values are recorded as coming from ``source``."""
        unknown = sorted(set(changes) - set(self._values))
        if unknown:
            raise AttributeError(f"the run configuration has no setting {', '.join(map(repr, unknown))}")
        return type(self)({**self._values, **changes}, self._explicit,
                         {**self._sources, **{name: source for name in changes}})

    def resolved(self, values, sources):
        """A new configuration with ``values`` (new names allowed: values a step derives, such as its per-process
        batch), each recorded as coming from ``sources[name]``."""
        return type(self)({**self._values, **values}, self._explicit, {**self._sources, **sources})

    def sources(self):
        """Where every value came from, by name."""
        return dict(self._sources)

    def to_dict(self):
        """Every value, as a plain dict (written into checkpoints and ``config.json``)."""
        return dict(self._values)
