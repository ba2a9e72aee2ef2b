"""The errors a user can cause, at the ground floor: every layer raises them, the CLI prints them in one line.

This module imports nothing from mimkit, so any module may import it without creating an import circle.
"""
import difflib


class MimkitError(ValueError):
    """A problem the user must fix; the message is one line and names the option, file or path."""


class ConfigError(MimkitError):
    """A bad option: the message names the option and what is allowed."""


class DataError(MimkitError):
    """A problem with the data the user must fix before training; the message names the path."""


class CheckpointError(MimkitError):
    """A checkpoint that cannot be used; the message names the file."""


class BadImage(ValueError):
    """One file that cannot be used (undecodable, truncated, empty, too small); training skips it and names it once."""

    def __init__(self, name, reason):
        super().__init__(name, reason)  # both in args, so it pickles across worker processes
        self.name, self.reason = name, reason

    def __str__(self):
        return f"{self.name}: {self.reason}"


class DivergedError(RuntimeError):
    """Too many non-finite losses in a row."""


class Preempted(RuntimeError):
    """Raised after a SIGTERM once the checkpoint is on disk."""


def did_you_mean(word, choices, show=str, before: str = "; ", after: str = "") -> str:
    """The one spelling hint of every error message: ``'; did you mean X?'`` for the choice closest to ``word``
    (difflib's), or '' when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"{before}did you mean {show(close[0])}?{after}" if close else ""
