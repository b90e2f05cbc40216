"""Safe text for logs and reports: file names come from the data set, which anyone may have written."""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: object) -> str:
    """``str(text)`` with every non-printable character escaped (``\\x1b``, ``\\u202e``, ...).

    File names may carry terminal escape sequences, carriage returns, bidi overrides or undecodable
    bytes (lone surrogates from ``os.fsdecode``); printed raw they rewrite the terminal, forge log
    lines or crash the print. Every data log line and report that shows a name passes it through here.
    """
    s = str(text)
    if s.isprintable():
        return s
    out = []
    for c in s:
        if c.isprintable():
            out.append(c)
            continue
        o = ord(c)
        if 0xDC80 <= o <= 0xDCFF:  # a byte that was not valid UTF-8 (surrogateescape): show the byte
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x100:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    return "".join(out)
