"""FlowTable: the bounded map of the TCP NAT's flows."""

from __future__ import annotations

from guestnet.core.flows import FlowTable

KEY = (bytes([10, 0, 2, 15]), 40000, bytes([10, 0, 2, 2]), 80)
OTHER = (bytes([10, 0, 2, 15]), 40001, bytes([10, 0, 2, 2]), 80)


def test_lookup_sees_every_add_and_remove_as_get_does() -> None:
    """``lookup`` (the datapath's frame-free ``get``) follows the table through its changes."""
    table: FlowTable[str] = FlowTable(2)
    assert table.lookup(KEY) is None and table.get(KEY) is None
    assert table.add(KEY, "a")
    assert table.lookup(KEY) == table.get(KEY) == "a"
    assert table.add(KEY, "b")  # replaced
    assert table.lookup(KEY) == "b"
    table.remove(KEY, "a")  # not the current flow: kept
    assert table.lookup(KEY) == "b"
    table.remove(KEY)
    assert table.lookup(KEY) is None and table.get(KEY) is None


def test_a_full_table_refuses_a_new_key_but_replaces_a_known_one() -> None:
    table: FlowTable[int] = FlowTable(1)
    assert table.add(KEY, 1)
    assert table.full
    assert not table.add(OTHER, 2)
    assert table.lookup(OTHER) is None
    assert table.add(KEY, 3) and table.lookup(KEY) == 3
    assert table.high_water == 1
