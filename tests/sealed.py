"""Evaluation tasks whose test outputs fail loudly when anything reads them.

A :class:`SealedGrid` stands where a test output grid would be: converting it to an array,
indexing, iterating, comparing, asking its shape or any other attribute raises
:class:`TestOutputRead`. Code that builds training samples, trains at test time or predicts
must run on sealed tasks without raising; only scoring may read the real outputs. Every read
is also recorded in :attr:`SealedGrid.reads`, since some callers swallow exceptions
(``numpy.array_equal`` returns False when its argument cannot become an array).
"""

from __future__ import annotations

from qwenrl.data import ArcTask


class TestOutputRead(AssertionError):
    """An evaluation task's test output was read where it must not be."""

    __test__ = False  # not a pytest test class


class SealedGrid:
    """A test output grid that raises :class:`TestOutputRead` on every use."""

    reads: list[str] = []  # task ids, one per read, across all sealed grids

    def __init__(self, task_id: str) -> None:
        object.__setattr__(self, "_where", task_id)

    def _fail(self, *args, **kwargs):
        SealedGrid.reads.append(object.__getattribute__(self, "_where"))
        raise TestOutputRead(
            f"a test output of task {object.__getattribute__(self, '_where')} was read"
        )

    def __getattr__(self, name: str):
        self._fail()

    __array__ = __getitem__ = __iter__ = __len__ = __eq__ = __ne__ = __bool__ = _fail
    __int__ = __float__ = __index__ = __hash__ = __reduce__ = __reduce_ex__ = _fail


def seal_test_outputs(tasks: list[ArcTask]) -> list[ArcTask]:
    """The same tasks with every test output replaced by a :class:`SealedGrid`."""
    return [
        ArcTask(id=t.id, train=t.train, test=tuple((i, SealedGrid(t.id)) for i, _ in t.test))
        for t in tasks
    ]
