"""Network namespaces: ``guestnet run`` and ``guestnet netns`` (being written)."""

from __future__ import annotations

import argparse
import sys

from guestnet.config import Config


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    """``guestnet run``: not available in this build yet."""
    print("guestnet run: error: not available yet", file=sys.stderr)
    return 1


def cmd_netns(args: argparse.Namespace, config: Config) -> int:
    """``guestnet netns``: not available in this build yet."""
    print("guestnet netns: error: not available yet", file=sys.stderr)
    return 1
