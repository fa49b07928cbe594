"""Errors that mean "the user's input is wrong", as opposed to a bug.

The command line (``kerasdet ...``) turns a :class:`UserInputError` into one line on
stderr and exit status 2 (``--debug`` shows the traceback); any other exception is a
bug and keeps its traceback. Both classes subclass ``ValueError`` so code that catches
``ValueError`` keeps working.
"""


class UserInputError(ValueError):
    """Something the user gave (a config key or value, a command-line argument, a file) is
    wrong. The message names what (the file, the key) and what is wrong with it."""


class ConfigError(UserInputError):
    """An unknown, misspelt or mistyped configuration key or value."""


class DataError(UserInputError):
    """A data file (annotation file, image, VOCdevkit folder) is missing or malformed."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file or folder the user named does not exist (also a ``FileNotFoundError``)."""
