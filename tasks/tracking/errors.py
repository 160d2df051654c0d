"""`Refusal`: the one exception type of an expected refusal, which the command line prints as one line.

A refusal is featureatlas declining to go on for a reason the user can act on (a database that cannot be
reached, a cache whose checksums do not match, a store left half-migrated): its message names what is
wrong and says how to fix it, so a traceback would add nothing. Bugs stay ordinary exceptions, with theirs.
"""

from __future__ import annotations


class Refusal(RuntimeError):
    """An expected refusal whose message says what is wrong and how to fix it; no traceback needed."""
