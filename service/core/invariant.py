"""What the code's own invariants rule out, checked in production too.

`assert` vanishes under `python -O`; these checks do not. A failure is a bug or a
database changed behind the service's back, never bad input (that is a 4xx at the edge).
"""

from __future__ import annotations


class InvariantError(RuntimeError):
    """A state the service's invariants rule out: a bug or a tampered database."""
