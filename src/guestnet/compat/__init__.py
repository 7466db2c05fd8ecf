"""Drop-in modes: guestnet answering to the argv of the helpers other tools start by name.

Each mode parses its peer's command line and maps it onto :class:`guestnet.Network` and
:class:`guestnet.config.Config`; none of them carries a datapath of its own. This layer sits
between the library face (``guestnet.network``) and the command line (``guestnet.cli``).
"""
