"""Hypothesis strategies shared by the protocol property tests: datagrams mutated from seeds.

How many examples a property test runs comes from the profile (tests/conftest.py); a test
that is dearer per example than most takes a share of it with ``scaled``.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st

_EDITS = ("overwrite", "insert", "overwrite", "delete", "insert", "truncate")


def scaled(fraction: float) -> int:
    """A share of the profile's number of examples (at least 10)."""
    return max(10, int(settings.default.max_examples * fraction))


@st.composite
def mutated(draw, seeds: st.SearchStrategy[bytes], inserts: st.SearchStrategy[bytes], *,
            focus: int = 0, max_edits: int = 8) -> bytes:
    """A seed datagram with 1 to ``max_edits`` edits: bytes overwritten, ``inserts`` put in,
    runs deleted, the tail cut off. Half the edits land at or after ``focus`` (e.g. the
    options area), where a parser has the most to get wrong."""
    data = bytearray(draw(seeds))
    for _ in range(draw(st.integers(1, max_edits))):
        size = len(data)
        at = draw(st.integers(0, size) | st.integers(min(focus, size), size))
        edit = draw(st.sampled_from(_EDITS))
        if edit == "overwrite" and at < size:
            data[at] = draw(st.integers(0, 255))
        elif edit == "insert":
            data[at:at] = draw(inserts)
        elif edit == "delete":
            del data[at:at + draw(st.integers(1, 40))]
        elif edit == "truncate":
            del data[at:]
    return bytes(data)
