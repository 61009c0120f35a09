"""The one exception type users see: a message that names the bad thing and how to fix it.

The CLI prints ``error: <message>`` and exits non-zero (no traceback unless ``--debug``).
Library code raises it for anything a user can fix; genuine bugs stay ordinary exceptions.
"""


class H3FusionError(Exception):
    """A user-fixable problem (bad config, missing file, unsupported model ...)."""
