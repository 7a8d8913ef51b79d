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
    """An option, preset name or config value is invalid.

    A message may name config fields as ``{field}`` placeholders (listed in `fields`): the library's
    message shows the field names, and the command line shows its flags instead (see
    :meth:`render`), so that each says what its user typed.
    """

    def __init__(self, message, fields=()):
        self.template = message
        self.fields = tuple(fields)
        super().__init__(self.render(lambda name: name))

    def render(self, name_of):
        """The message with each ``{field}`` replaced by name_of(field)."""
        text = self.template
        for field in self.fields:
            text = text.replace("{" + field + "}", name_of(field))
        return text


class NumericalError(MpdiffError):
    """Training kept producing non-finite values and was stopped."""


def first_line(error, limit=200):
    """The first line of an exception's message (or its type name), cut to `limit` characters."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def printable(text):
    """`text` with undecodable bytes (surrogate escapes), lone surrogates and control characters escaped."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        if "\udc80" <= c <= "\udcff":          # a byte os.fsdecode could not decode
            out.append(f"\\x{ord(c) - 0xdc00:02x}")
        elif c.isprintable() and not "\ud800" <= c <= "\udfff":
            out.append(c)
        else:
            out.append(repr(c)[1:-1])
    return "".join(out)
