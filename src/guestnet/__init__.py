"""guestnet: a user-mode network backend for virtual machines and network namespaces.

The library face::

    import guestnet

    with guestnet.Network(guestnet.Config(mtu=1500)) as net:
        print(net.listen_qemu("/tmp/gn.sock"))   # the QEMU arguments to use
        net.add_forward("tcp", 8080, 80)          # host 127.0.0.1:8080 -> guest port 80
        net.run(timeout=60)                       # or net.start(): the loop in a thread

:class:`Network` attaches guests (QEMU stream or datagram sockets, a TAP fd, a network
namespace, a command in new namespaces), runs the loop, reads stats, flows and leases, adds and
removes forwards, and closes. :class:`Config` holds every start-up setting.
"""

from guestnet.config import Config
from guestnet.io.forwards import ForwardError
from guestnet.network import Child, Network, StartError

__version__ = "0.1.0"

__all__ = ["Child", "Config", "ForwardError", "Network", "StartError", "__version__"]
