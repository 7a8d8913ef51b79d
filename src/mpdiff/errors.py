"""User-facing errors.

Everything that is the user's input being wrong (a file, a field, an option) raises
:class:`MpdiffError` with one line that names the thing and what was expected. The command
line prints that line without a traceback and exits non-zero; bugs stay ordinary exceptions.
"""


class MpdiffError(Exception):
    """A problem with the user's input, files or environment, explained in one line."""


class DatasetError(MpdiffError):
    """A dataset file or its labels are unusable."""


class CheckpointError(MpdiffError):
    """A checkpoint or snapshot is missing, damaged, unsafe or does not match."""


class ConfigError(MpdiffError):
    """An option, preset name or config value is invalid."""


class NumericalError(MpdiffError):
    """Training kept producing non-finite values and was stopped."""
