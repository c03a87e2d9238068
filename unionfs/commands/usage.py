"""The error for a problem with the command line or the machine (exit status 2)."""

from __future__ import annotations


class UsageError(Exception):
    """A problem with the command line or the machine, found before any work."""
