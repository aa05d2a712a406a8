"""Records: the plain data the guard passes between its stages, without dataclasses.

A refusal makes some thirty record classes before it can say who holds the address. As
dataclasses they cost 4.5 ms to import (dataclasses pulls in inspect, ast, dis and re) and
about 0.1 ms each to make (dataclasses writes each method as source and compiles it): a sixth
of the refusal's run. A Record's methods are written once, here; a class lists its fields as
annotations, as a dataclass does, and mypy reads it as one (dataclass_transform), constructor
arguments and frozen fields included.

What dataclasses gave is kept: the constructor takes the fields in order, by position or by
name, with their defaults (`field(default_factory=list)` for a fresh one each time); a base
record's fields come first; equality compares the fields of two records of the same class;
repr names them; `frozen=True` refuses assignment (FrozenInstanceError) and hashes the
fields; a record that is not frozen is not hashable. replace() makes a changed copy.
"""

from __future__ import annotations

from _operator import attrgetter

TYPE_CHECKING = False  # typing's own costs an import on the guard's path
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, ClassVar, TypeVar, dataclass_transform

    T = TypeVar("T")
    R = TypeVar("R", bound="Record")
else:
    def dataclass_transform(**_options):
        return lambda cls: cls


class FrozenInstanceError(AttributeError):
    """An assignment to a field of a frozen record."""


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], object]) -> None:
        self.make = make


_MISSING = _Factory(lambda: None)  # the default of a field that has none


def field(*, default_factory: Callable[[], T]) -> T:
    """A field whose default is made afresh for each record (a list, a dict)."""
    return _Factory(default_factory)  # type: ignore[return-value]


def _frozen_setattr(self: object, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: object, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


@dataclass_transform(field_specifiers=(field,))
class Record:
    """The base of a record class; `class Name(Record, frozen=True)` for one that never changes."""

    _fields: ClassVar[tuple[str, ...]] = ()
    _defaults: ClassVar[dict[str, object]] = {}
    _values: ClassVar[Any]  # the fields' values as one tuple: _values(record)

    def __init_subclass__(cls, *, frozen: bool = False, **options: Any) -> None:
        super().__init_subclass__(**options)
        # What dataclasses would do differently is refused, not silently done another way.
        if "__post_init__" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: a Record has no __post_init__")
        if not frozen and getattr(cls, "__setattr__", None) is _frozen_setattr:
            raise TypeError(f"{cls.__name__}: a record that is not frozen cannot extend a frozen one")
        defaults = dict(cls._defaults)
        fields = dict.fromkeys(cls._fields)
        for name, annotation in cls.__dict__.get("__annotations__", {}).items():
            if str(annotation).startswith(("ClassVar", "typing.ClassVar")):
                continue  # a class attribute, as for a dataclass
            if isinstance(cls.__dict__.get(name), (list, dict, set)):
                raise ValueError(f"{cls.__name__}.{name}: a mutable default is shared; use field(default_factory=...)")
            fields[name] = None
            if name in cls.__dict__:
                defaults[name] = cls.__dict__[name]
                if isinstance(defaults[name], _Factory):
                    delattr(cls, name)  # as dataclasses leaves it: no shared list on the class
            else:
                defaults.pop(name, None)
        cls._fields = tuple(fields)
        cls._defaults = defaults
        # attrgetter of several names gives a tuple, of one name the value alone
        cls._values = attrgetter(*cls._fields) if len(fields) > 1 else lambda record: tuple(
            getattr(record, name) for name in cls._fields)
        if frozen:
            cls.__setattr__ = _frozen_setattr  # type: ignore[method-assign]
            cls.__delattr__ = _frozen_delattr  # type: ignore[method-assign]
            cls.__hash__ = Record._hash  # type: ignore[method-assign, assignment]

    def __init__(self, *args: Any, **given: Any) -> None:
        fields = self._fields
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__}() takes {len(fields)} fields but {len(args)} were given")
        assign = object.__setattr__
        for name, value in zip(fields, args, strict=False):  # the rest by name or default
            assign(self, name, value)
        for name in fields[len(args):]:
            if name in given:
                value = given.pop(name)
            else:
                default = self._defaults.get(name, _MISSING)
                if default is _MISSING:
                    raise TypeError(f"{type(self).__name__}() missing field {name!r}")
                value = default.make() if isinstance(default, _Factory) else default
            assign(self, name, value)
        if given:
            raise TypeError(f"{type(self).__name__}() got an unexpected or repeated field {next(iter(given))!r}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return bool(self._values(self) == other._values(other))

    def _hash(self) -> int:
        return hash(self._values(self))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__qualname__}({shown})"


def replace(record: R, **changes: object) -> R:
    """A copy of record with some fields changed, as dataclasses.replace makes it."""
    values = {name: getattr(record, name) for name in record._fields}
    unknown = set(changes) - set(values)
    if unknown:
        raise TypeError(f"{type(record).__name__} has no field {sorted(unknown)[0]!r}")
    values.update(changes)
    return type(record)(**values)
