"""The one base class of every error the user is meant to fix.

Bad input, a wrong config, a missing model or dataset, an unusable device: the command line
prints such an error as one line and exits 2, and the build's tasks do not retry it (a retry
cannot fix it). Each stage derives its own error from `UserError`, so a new stage's errors are
handled the same way without touching any list.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user must fix; the message names what and where."""
