"""Catalog text made safe to print. Service names, instance IDs, node names and tags come from whoever
can register a service in Consul; printed raw, a control character or a terminal escape would reach an
operator's terminal or the log (and a line feed would forge a log line)."""

from __future__ import annotations

LIMIT = 200
"""Longer names are cut in text output (JSON output keeps them whole): a line is for reading."""


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str, limit: int = LIMIT) -> str:
    """`text` with every non-printable character (control, format such as bidi overrides, separators other
    than space, unassigned, surrogates) written as a Python-style escape, cut after `limit` characters."""
    if text.isprintable() and len(text) <= limit:
        return text
    cut = text[:limit]
    shown = "".join(c if c.isprintable() else _escape(c) for c in cut)
    return shown if len(text) <= limit else f"{shown}...({len(text)} characters)"
