"""guestnet: a user-mode network backend for virtual machines and network namespaces."""

__version__ = "0.1.0"
