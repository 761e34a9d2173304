"""Outputs as text, as they come: the API's output items (Contract of `POST /execute`).

Streams as the kernel wrote them, stdout to stdout and stderr to stderr; a display or result
as its `text/plain`, or by the names of its types when it has none (`kallichore run --json`
gives every item whole, images included); an error as its traceback, on stderr. Tracebacks'
colours (ANSI escapes) are kept on a terminal and removed elsewhere, so that a log or a pipe
gets plain text.
"""

from __future__ import annotations

import re
from typing import Any, TextIO

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """Where a subcommand writes: `out` for results, `err` for errors and notes."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out = out
        self.err = err
        self._colour = err.isatty()

    def show(self, item: dict[str, Any], *, numbered: bool = False) -> None:
        """One output item; with `numbered`, a result is labelled `Out[n]:` as in a console."""
        kind = item.get("type")
        if kind == "stream":
            stream = self.err if item.get("stream_name") == "stderr" else self.out
            self._write(stream, str(item.get("text", "")))
        elif kind in ("display_data", "execute_result"):
            text = plain_text(item.get("data") or {})
            count = item.get("execution_count")
            if numbered and kind == "execute_result" and count is not None:
                text = f"Out[{count}]: {text}"
            self._write(self.out, text + "\n")
        elif kind == "error":
            traceback = item.get("error_traceback") or [
                f"{item.get('error_name')}: {item.get('error_message')}"
            ]
            self._write(self.err, "\n".join(traceback) + "\n")

    def note(self, text: str) -> None:
        """A line of our own (not the kernel's), on stderr."""
        self._write(self.err, text + "\n")

    def _write(self, stream: TextIO, text: str) -> None:
        if not self._colour:
            text = ANSI_ESCAPE.sub("", text)
        stream.write(text)
        stream.flush()


def plain_text(data: dict[str, Any]) -> str:
    """A MIME bundle as one line or block of text."""
    text = data.get("text/plain")
    if isinstance(text, str):
        return text
    return "[" + ", ".join(sorted(data)) + "]"
