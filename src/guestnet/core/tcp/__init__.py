"""TCP translation: one guest TCP connection spliced onto one host socket.

Theory of operation
-------------------
guestnet does not run a TCP stack for the host side: the host kernel does that on an ordinary
socket. Toward the guest, guestnet *is* the remote TCP peer, but a thin one: it keeps no receive
queue and a bounded send queue, and lets each side's kernel do the hard parts. A guest SYN
opens a host connect and only its outcome is answered (SYN-ACK or RST); a connection accepted on
a published port is opened toward the guest with our SYN. Established, guest payload goes
straight into the host socket and is acknowledged only as far as the socket took it, with the
socket's free send buffer as the window we advertise; host data is read only while the guest's
window has room, straight into pooled frames, and kept until acknowledged for retransmission
(copied, or for a bulk transfer left in the host socket and read again with ``MSG_PEEK``).
FINs are passed on as half-closes, RSTs both ways; no TIME_WAIT holds a descriptor.

The package, one module per concern (each module's docstring tells its part):

- :mod:`~guestnet.core.tcp.flow`: :class:`TcpFlow` (all per-flow state), the states, sequence
  arithmetic (:func:`seq_delta`), limits and timeouts, options, and :class:`TcpIo`.
- :mod:`~guestnet.core.tcp.handshake`: opening either way (guest SYN and host connect; our SYN
  for a forwarded connection) and refusals (RST for segments without a flow).
- :mod:`~guestnet.core.tcp.established`: the steady state of an established flow, both ways,
  including the classifier's fast path :meth:`TcpNat.handle_fast`, all in one module.
- :mod:`~guestnet.core.tcp.irregular`: the established flow's cold branches (RST, SYN,
  out-of-order, out-of-window, duplicate segments).
- :mod:`~guestnet.core.tcp.recovery`: RTO, fast retransmit, zero-window probes, window
  re-checks, the per-flow timer and the ways a flow ends.
- :mod:`~guestnet.core.tcp.segment`: writing segments (headers, checksums, offload
  super-frames); the only module that knows the IP version.
- :mod:`~guestnet.core.tcp.nat`: :class:`TcpNat`, assembled from the parts above, and the
  ordinary entry for guest segments.

This package is sans-I/O: it never touches a socket or a clock. :class:`TcpIo` is what it asks
of the I/O driver (``guestnet.io.tcp_nat``), which calls back :meth:`TcpNat.host_connected`,
:meth:`TcpNat.host_readable`, :meth:`TcpNat.host_writable` and :meth:`TcpNat.on_timer`. Unit
tests drive it with a fake driver and a scripted clock.
"""

from guestnet.core.tcp.flow import (
    CLOSED,
    CONNECT_TIMEOUT_S,
    CONNECTED,
    CONNECTING,
    DEFAULT_MSS,
    DELACK_S,
    DNS_CONNECT_TIMEOUT_S,
    ESTABLISHED,
    FORWARD_CONNECT_TIMEOUT_S,
    FORWARD_PORT_MAX,
    FORWARD_PORT_MIN,
    FORWARD_SYN_RTO_S,
    IDLE_TIMEOUT_S,
    KEEP_MIN_FRAMES,
    MAX_RETRANSMITS,
    MAX_UNACKED,
    MAX_WINDOW,
    OUR_WSCALE,
    PERSIST_MAX_S,
    PERSIST_MIN_S,
    READ_BATCH,
    REAP_DELAY_S,
    RTO_INITIAL_S,
    RTO_MAX_S,
    RTO_MIN_S,
    SEQ_MASK,
    STATE_NAMES,
    SYN_RCVD,
    SYN_SENT,
    WND_CHECK_MAX_S,
    WND_CHECK_MIN_S,
    TcpFlow,
    TcpIo,
    seq_delta,
)
from guestnet.core.tcp.nat import TcpNat
from guestnet.core.tcp.segment import HDRS_LEN

__all__ = [
    "CLOSED",
    "CONNECTED",
    "CONNECTING",
    "CONNECT_TIMEOUT_S",
    "DEFAULT_MSS",
    "DELACK_S",
    "DNS_CONNECT_TIMEOUT_S",
    "ESTABLISHED",
    "FORWARD_CONNECT_TIMEOUT_S",
    "FORWARD_PORT_MAX",
    "FORWARD_PORT_MIN",
    "FORWARD_SYN_RTO_S",
    "HDRS_LEN",
    "IDLE_TIMEOUT_S",
    "KEEP_MIN_FRAMES",
    "MAX_RETRANSMITS",
    "MAX_UNACKED",
    "MAX_WINDOW",
    "OUR_WSCALE",
    "PERSIST_MAX_S",
    "PERSIST_MIN_S",
    "READ_BATCH",
    "REAP_DELAY_S",
    "RTO_INITIAL_S",
    "RTO_MAX_S",
    "RTO_MIN_S",
    "SEQ_MASK",
    "STATE_NAMES",
    "SYN_RCVD",
    "SYN_SENT",
    "WND_CHECK_MAX_S",
    "WND_CHECK_MIN_S",
    "TcpFlow",
    "TcpIo",
    "TcpNat",
    "seq_delta",
]
