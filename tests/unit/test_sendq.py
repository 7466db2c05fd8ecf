"""SendQueue (core/tcp/sendq.py) behaves as the bytearray it replaced, for the operations the
TCP code uses: append, drop a prefix, read a prefix, length."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestnet.core.tcp.sendq import SendQueue


def test_append_read_drop() -> None:
    q = SendQueue()
    assert len(q) == 0 and q == b"" and q[:10] == b""
    q += b"hello"
    q += memoryview(b"--world--")[2:7]
    q += b""
    assert len(q) == 10 and bytes(q) == b"helloworld"
    assert q[:3] == b"hel" and q[:7] == b"hellowo" and q[:100] == b"helloworld"
    del q[:2]
    assert q == b"lloworld" and q[:4] == b"llow"
    del q[:3]  # the rest of the first chunk: it is gone, the offset back to 0
    assert q == b"world" and q[:5] == b"world"
    del q[:99]
    assert len(q) == 0 and q == bytearray()


def test_appended_bytes_are_copied() -> None:
    buf = bytearray(b"abcdef")
    q = SendQueue()
    q += memoryview(buf)[:4]
    buf[:] = b"zzzzzz"
    assert bytes(q) == b"abcd"


def test_only_prefix_slices() -> None:
    q = SendQueue()
    q += b"abc"
    with pytest.raises(AssertionError):
        q[1:2]
    with pytest.raises(AssertionError):
        del q[1:]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.binary(max_size=300)),
        st.tuples(st.just("del"), st.integers(0, 400)),
        st.tuples(st.just("get"), st.integers(0, 400)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_same_as_bytearray(script: list[tuple[str, object]]) -> None:
    q = SendQueue()
    ref = bytearray()
    for op, arg in script:
        if op == "add":
            assert isinstance(arg, bytes)
            q += arg
            ref += arg
        elif op == "del":
            assert isinstance(arg, int)
            del q[:arg]
            del ref[:arg]
        else:
            assert isinstance(arg, int)
            assert q[:arg] == bytes(ref[:arg])
        assert len(q) == len(ref) and bytes(q) == bytes(ref)


def test_bulk_pattern() -> None:
    """Super-frame appends, acknowledgements that end mid-chunk, retransmission reads."""
    rng = random.Random(5)
    data = rng.randbytes(8 << 20)
    q = SendQueue()
    sent = acked = 0
    while acked < len(data):
        while sent < len(data) and sent - acked < 4 << 20:
            n = rng.choice((1448, 65160, 7))
            q += memoryview(data)[sent : sent + n]
            sent = min(sent + n, len(data))
        assert q[:65160] == data[acked : acked + 65160]
        n = rng.randrange(1, 300_000)
        del q[:n]
        acked = min(acked + n, sent)
        assert len(q) == sent - acked


def test_ring_grows_while_wrapped() -> None:
    """The ring doubles in place while its contents wrap around the end: they stay in order."""
    from guestnet.core.tcp.sendq import KEEP

    q = SendQueue()
    first = bytes(i % 251 for i in range(KEEP))
    q += first  # exactly full
    del q[: KEEP - 100]  # head near the end
    wrapped = bytes(range(200))
    q += wrapped  # wraps to the front
    assert bytes(q) == first[-100:] + wrapped
    more = b"x" * (3 * KEEP)
    q += more  # needs two doublings
    assert bytes(q) == first[-100:] + wrapped + more
    assert q[:150] == first[-100:] + wrapped[:50]
    del q[:300]
    assert bytes(q) == more
    del q[: len(q)]
    assert len(q) == 0 and q == b""
    q += b"again"
    assert bytes(q) == b"again"
