"""The form of flash_varlen's error messages."""

from __future__ import annotations


def error(text: str) -> str:
    """``text`` as flash_varlen's messages read: prefixed with the package name."""
    return f"flash_varlen: {text}"
