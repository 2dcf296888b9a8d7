"""Exceptions raised by tsmsg. The frame errors come from the Rust codec, one class per
failure class, all subclasses of :class:`FrameError`."""

from tsmsg._native import (
    EncodeError,
    FrameError,
    FrameTooLarge,
    InvalidMsgpack,
    InvalidUtf8,
    LengthOverrun,
    NonStringKey,
    NotAMap,
    TooDeep,
    TrailingBytes,
    UnsupportedType,
)
from tsmsg.auth import AuthError

__all__ = [
    "AuthError",
    "EncodeError",
    "FrameError",
    "FrameTooLarge",
    "InvalidMsgpack",
    "InvalidUtf8",
    "LengthOverrun",
    "NonStringKey",
    "NotAMap",
    "TooDeep",
    "TrailingBytes",
    "UnsupportedType",
]
