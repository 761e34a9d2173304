"""An execution's outcome (the execute API's body) as MCP content a language model can read.

Text for what a person would read in a console (streams, plain-text results, the traceback),
without the terminal's colours and with carriage-return progress bars reduced to their last
state; image content for PNG and JPEG displays, in the order the kernel produced them. A
result that did not run to its end is an error result, with a line that says why.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mcp.types import CallToolResult, ImageContent, TextContent

IMAGE_TYPES = ("image/png", "image/jpeg")
# What stands for a display that has no image, in order of preference.
TEXT_TYPES = ("text/plain", "text/markdown", "text/latex", "text/html")
# More than this in one text block is clipped in its middle: a model's context is precious,
# and a runaway print should not flood it.
MAX_TEXT = 20_000
# Terminal escape sequences (colours, cursor moves): tracebacks are full of them.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# Text a carriage return sends back over, up to the last one on its line.
OVERWRITTEN = re.compile(r"[^\n]*\r(?!\n)")

WHY_NOT_FINISHED = {
    "timeout": "Timed out: the kernel was interrupted",
    "aborted": "Not run: an earlier execution failed and the kernel aborted this one",
}


def outcome_result(outcome: Mapping[str, Any]) -> CallToolResult:
    """The tool result for one execution (Contract 1's body: status, output, error_*)."""
    blocks: list[TextContent | ImageContent] = []
    pending: list[str] = []

    def flush() -> None:
        if text := "".join(pending):
            blocks.append(TextContent(text=clipped(console_text(text))))
        pending.clear()

    errors_shown = False
    for item in outcome.get("output", ()):
        kind = item.get("type")
        if kind == "stream":
            pending.append(item.get("text", ""))
        elif kind == "error":
            pending.append(error_text(item))
            errors_shown = True
        elif kind in ("display_data", "execute_result"):
            data = item.get("data") or {}
            image = next((mime for mime in IMAGE_TYPES if mime in data), None)
            if image is not None:
                flush()
                blocks.append(ImageContent(data="".join(str(data[image]).split()), mime_type=image))
            elif (text := displayed_text(data)) is not None:
                pending.append(text if text.endswith("\n") else text + "\n")
    status = outcome.get("status", "ok")
    if status == "error" and not errors_shown:
        pending.append(error_text(outcome))
    if status in WHY_NOT_FINISHED:
        note = WHY_NOT_FINISHED[status]
        if status == "timeout":
            note += (
                ", then restarted as it did not stop: its state is gone"
                if outcome.get("restarted")
                else "; its state is kept"
            )
        pending.append(f"[{note}.]\n")
    flush()
    if not blocks:
        blocks.append(TextContent(text="[Done: no output.]"))
    return CallToolResult(content=list(blocks), is_error=status != "ok")


def displayed_text(data: Mapping[str, Any]) -> str | None:
    """The text a console shows for a display or result bundle (None: nothing textual)."""
    for mime in TEXT_TYPES:
        if mime in data:
            value = data[mime]
            return value if isinstance(value, str) else "".join(value)
    return None


def error_text(error: Mapping[str, Any]) -> str:
    """The traceback as IPython prints it (its last line names the error), else name: value."""
    traceback = error.get("error_traceback") or []
    if traceback:
        return "\n".join(traceback) + "\n"
    return f"{error.get('error_name', 'Error')}: {error.get('error_message', '')}\n"


def console_text(text: str) -> str:
    """`text` as a terminal would leave it: no escape sequences, overwritten text gone."""
    return OVERWRITTEN.sub("", ANSI_ESCAPE.sub("", text))


def clipped(text: str, limit: int = MAX_TEXT) -> str:
    """`text`, or its beginning and its end with a line saying how much is left out."""
    if len(text) <= limit:
        return text
    half = limit // 2
    left_out = len(text) - 2 * half
    return f"{text[:half]}\n[... {left_out} characters not shown ...]\n{text[-half:]}"
