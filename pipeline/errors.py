"""One exception type for bad user input.

The CLI turns a `StridelabError` (or a `ValueError` raised by a validator) into one line on stderr and
exit code 2; anything else is a bug and keeps its traceback.
"""


class StridelabError(ValueError):
    """Bad input a user can fix: the message is one line that says what and how."""
