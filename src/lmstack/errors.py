"""The two error kinds every part of lmstack raises at its boundary.

`ValueError` (and its subclass `InputError`) means the user gave something wrong — a config field, a
file, an argument, a request — and its message names the problem and the fix. `RunError` means a run
failed for a reason that is not a bug (a NaN loss, a full disk). The CLI turns the first into exit
code 2 and the second into exit code 1, each as one line on stderr.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input; the message says what is wrong and how to fix it."""


class RunError(RuntimeError):
    """A run failed for a reason the user can act on (not a bug in lmstack)."""
