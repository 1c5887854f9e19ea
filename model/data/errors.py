"""The one exception the data-set readers raise.

Readers raise :class:`DatasetError` for every problem a user can fix by looking at their
files (a wrong root, a missing mask, a corrupt PNG). Its message always names the path at
fault, so a CLI can print it as is and the user knows where to look.
"""

from __future__ import annotations

from pathlib import Path


class DatasetError(ValueError):
    """A data set on disk does not have the layout or content a reader expects.

    Subclassing :class:`ValueError` lets callers that already catch bad input values
    (argument parsing, request validation) handle it without importing this module.

    Args:
        message: what is wrong, in words a user can act on.
        path: the file or folder at fault, appended to the message when given.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path: Path | None = Path(path) if path is not None else None
        full_message = f"{message}: {self.path}" if self.path is not None else message
        super().__init__(full_message)
