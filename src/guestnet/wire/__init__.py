"""Pure wire codecs: parse from and build into memoryviews. No I/O, no state."""


class WireError(ValueError):
    """Bad bytes from the remote side. Carries a dotted reason name for the drop counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
