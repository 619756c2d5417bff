"""Exception hierarchy of :mod:`calibration`: every message names the file or option and the fix.

The ``fod`` CLI catches :class:`CalibrationError` (and :class:`fod.errors.FodError`, which data and
package problems raise), prints the one-line message and exits 2.
"""


class CalibrationError(Exception):
    """Base class of all errors raised by :mod:`calibration`."""


class CalibrationDataError(CalibrationError):
    """Too few images, no good images, a folder of the wrong layout for calibration."""


class QuantizationError(CalibrationError):
    """A reduced-precision variant cannot be produced (quantizer or converter failed)."""


class GateFailedError(CalibrationError):
    """A precision variant failed the accuracy gate and was not written (``--force`` writes it anyway).

    Attributes:
        report: the gate report (``calibration.gate.GateReport.to_dict()``).
    """

    def __init__(self, message: str, report: dict[str, object]) -> None:
        super().__init__(message)
        self.report = report
