"""``python -m guestnet``."""

import sys

from guestnet.cli import main

sys.exit(main())
