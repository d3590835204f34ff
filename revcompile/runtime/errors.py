"""The base of revcompile's one error hierarchy (re-exported by ``revcompile.errors``,
where every other error class is defined) and the runtime's own error."""

from __future__ import annotations


class RevcompileError(Exception):
    """Base class of every error revcompile raises on purpose."""


class ExactRangeError(RevcompileError, OverflowError):
    """An exact-mode trunk value left the range in which its fixed-point sums are exact.

    ``suggested_bits`` is the largest ``exact_bits`` whose range holds the value
    seen (None when no grid does: the value is not finite or too large).
    """

    def __init__(self, message: str, suggested_bits: int | None) -> None:
        super().__init__(message)
        self.suggested_bits = suggested_bits
