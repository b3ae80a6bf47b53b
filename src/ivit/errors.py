"""User-facing errors: anything a user can cause with bad input raises ``IvitError``.

The CLI turns an ``IvitError`` into one line on stderr and exit code 2.
"""

from __future__ import annotations

__all__ = ["IvitError"]


class IvitError(Exception):
    """An error caused by user input (bad file, bad data, unknown model): one clear line."""
