"""What can be wrong with a dataset: one `Problem` per file, and the error when too little is usable."""
from __future__ import annotations

from dataclasses import dataclass


class DatasetError(ValueError):
    """The dataset as a whole cannot train (e.g. fewer than 3 usable images)."""


@dataclass
class Problem:
    path: str     # the file concerned (full path) or the folder
    reason: str   # plain-language reason and what to do
    fatal: bool   # True: the file is skipped; False: a warning, the file is still used


__all__ = ["DatasetError", "Problem"]
