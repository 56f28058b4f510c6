"""User-facing error types.

Every error a user can cause (bad config, bad request, broken model directory) is a ``TLTError``
whose message names the offending field or file and says how to fix it. The CLI prints these
without a traceback; anything else is a bug.
"""


class TLTError(Exception):
    """Base class for errors caused by user input or environment, not by a bug."""


class PortInUseError(TLTError, OSError):
    """A server cannot listen on the port it was given (taken by another process or server)."""


class ConfigError(TLTError, ValueError):
    """A configuration field has an invalid value."""


class ModelLoadError(TLTError):
    """A model directory is missing, incomplete or corrupt."""


class InvalidRequestError(TLTError, ValueError):
    """A generation request (prompt or sampling parameters) is invalid."""
