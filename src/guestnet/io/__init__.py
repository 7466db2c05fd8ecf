"""The only code that touches file descriptors: the loop, the guest links, host sockets."""
