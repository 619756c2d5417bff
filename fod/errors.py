"""Exception hierarchy of the ``fod`` package: every message names the file or key and the fix."""


class FodError(Exception):
    """Base class of all errors raised by :mod:`fod` (the CLI prints the message and exits 2)."""


class DataError(FodError):
    """A dataset folder, image or mask cannot be used (wrong layout, unreadable, size mismatch)."""


class CheckpointError(FodError):
    """A training checkpoint is missing, corrupt or from an incompatible version."""


class PackageError(FodError):
    """A model package is missing files, has edited files (hash mismatch) or a newer schema."""


class InputError(FodError):
    """An image handed to a predictor has the wrong dtype, rank or channel count."""


class ImageTooLarge(InputError):
    """An encoded image whose header announces a side above the allowed maximum (refused before decoding)."""


class OptionError(FodError):
    """A command-line option has a value the model cannot use (the message names the option and the allowed values)."""
