"""One exception type for bad user input, and how its message names parameters.

Library code raises `StridelabError` (or a subclass) for input a user can fix; anything else is a bug.
Library messages never name CLI flags: they name the Python parameter, in backticks, e.g.
``StridelabError("must be in (0, 8], got 9", param="gpus_per_actor")`` reads
"`gpus_per_actor` must be in (0, 8], got 9". The CLI renders every backticked name that is one of the
command's parameters as its flag ("--gpus-per-actor must be in (0, 8], got 9"), prints that one line on
stderr and exits 2; any other exception keeps its traceback.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_PARAM = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


class StridelabError(ValueError):
    """Bad input a user can fix: the message is one line that says what and how.

    Args:
        message: what is wrong; other parameters it mentions are written in backticks (`actors`).
        param: the parameter at fault, if one is; the message is then read as "`param` <message>".
    """

    def __init__(self, message: str, *, param: str | None = None):
        self.param = param
        self.message = f"`{param}` {message}" if param else message
        super().__init__(self.message)

    def render(self, name_of: Callable[[str], str | None]) -> str:
        """The message with each backticked parameter replaced by ``name_of(param)`` (e.g. its CLI flag);
        a parameter ``name_of`` does not know (returns None) keeps its backticks."""
        return _PARAM.sub(lambda m: name_of(m.group(1)) or m.group(0), self.message)


class PlacementTimeout(StridelabError):
    """No live Ray node could host the actors for the allowed time (a node lost, or none with the resources
    asked): an infrastructure stop, not a trial's failure, so a sweep ends (its study intact) instead of
    failing trial after trial."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when empty): for one-line errors that wrap
    a library's multi-line one."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
