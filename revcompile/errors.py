"""Exceptions raised by revcompile."""


class ConversionError(RuntimeError):
    """The model cannot be traced or converted; the message says what to do."""
