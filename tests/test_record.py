"""bindguard.model.record: what dataclasses gave, and what a Record refuses rather than doing it
differently from the dataclass mypy reads it as (pure logic)."""

from __future__ import annotations

from typing import ClassVar

import pytest

from bindguard.model.record import FrozenInstanceError, Record, field, replace


class Point(Record, frozen=True):
    LIMIT: ClassVar[int] = 3  # a class attribute, not a field
    x: int
    y: int = 0
    tags: list[str] = field(default_factory=list)


def test_a_record_behaves_as_its_dataclass():
    p = Point(1)
    assert (p.x, p.y, p.tags, Point.LIMIT) == (1, 0, [], 3)
    assert p == Point(1, 0, []) and p != Point(2) and repr(p) == "Point(x=1, y=0, tags=[])"
    assert Point(1).tags is not Point(1).tags
    assert replace(p, y=5) == Point(1, 5)
    with pytest.raises(FrozenInstanceError):
        p.x = 2  # type: ignore[misc]


@pytest.mark.parametrize("body, error", [
    ("class Shared(Record):\n    items: list = []", ValueError),
    ("class Hooked(Record):\n    x: int = 0\n    def __post_init__(self):\n        pass", TypeError),
    ("class Base(Record, frozen=True):\n    x: int = 0\nclass Thawed(Base):\n    y: int = 0", TypeError),
])
def test_what_a_dataclass_does_otherwise_is_refused(body, error):
    with pytest.raises(error):
        exec(body, {"Record": Record})
