"""An execution's outcome as MCP content (sans-io): what the model reads of each output."""

from __future__ import annotations

from typing import Any

from mcp.types import ImageContent, TextContent

from kallichore.mcp.content import MAX_TEXT, outcome_result

PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJg"
    "gg=="
)


def stream(text: str, name: str = "stdout") -> dict[str, Any]:
    return {"type": "stream", "stream_name": name, "text": text}


def display(data: dict[str, Any], kind: str = "display_data") -> dict[str, Any]:
    return {"type": kind, "data": data, "metadata": {}}


def texts(result: Any) -> list[str]:
    return [block.text for block in result.content if isinstance(block, TextContent)]


def test_text_and_images_in_the_order_the_kernel_produced_them() -> None:
    outcome = {
        "status": "ok",
        "execution_count": 3,
        "output": [
            stream("before\n"),
            display({"image/png": PNG + "\n", "text/plain": "<Figure>"}),
            stream("warned\n", "stderr"),
            display({"text/plain": "42"}, "execute_result"),
        ],
    }
    result = outcome_result(outcome)
    assert not result.is_error
    first, image, last = result.content
    assert isinstance(first, TextContent)
    assert first.text == "before\n"
    assert isinstance(image, ImageContent)
    assert (image.mime_type, image.data) == ("image/png", PNG)  # as sent, without the newline
    assert isinstance(last, TextContent)
    assert last.text == "warned\n42\n"


def test_a_display_without_an_image_or_plain_text_shows_its_best_text() -> None:
    outcome = {
        "status": "ok",
        "output": [
            display({"image/jpeg": "/9j/", "text/plain": "<Image>"}),
            display({"text/html": ["<b>", "bold</b>"]}),
            display({"application/x-custom": {}}),
        ],
    }
    image, _ = outcome_result(outcome).content
    assert isinstance(image, ImageContent)
    assert image.mime_type == "image/jpeg"
    assert texts(outcome_result(outcome)) == ["<b>bold</b>\n"]


def test_an_error_is_its_traceback_without_colours() -> None:
    red, green, grey, plain = "\x1b[0;31m", "\x1b[0;32m", "\x1b[38;5;241m", "\x1b[0m"
    traceback = [
        f"{red}-----------------------------------",
        f"{red}ZeroDivisionError{plain}     Traceback (most recent call last)",
        f"Cell {green}In[1], line 1{plain}\n{green}----> 1{plain} {grey}1{plain}{grey}/0{plain}",
        f"{red}ZeroDivisionError{plain}: division by zero",
    ]
    error = {
        "type": "error",
        "error_name": "ZeroDivisionError",
        "error_message": "division by zero",
        "error_traceback": traceback,
    }
    result = outcome_result({"status": "error", "output": [stream("partial\n"), error]})
    assert result.is_error
    [text] = texts(result)
    assert text.startswith("partial\n---")
    assert "----> 1 1/0\n" in text
    assert text.endswith("ZeroDivisionError: division by zero\n")
    assert "\x1b" not in text


def test_an_error_not_in_the_output_is_told_from_the_outcome() -> None:
    outcome = {"status": "error", "output": [], "error_name": "E", "error_message": "m"}
    assert texts(outcome_result(outcome)) == ["E: m\n"]


def test_a_timeout_says_whether_the_state_survived() -> None:
    interrupted = outcome_result({"status": "timeout", "output": [stream("tick\n")]})
    assert interrupted.is_error
    assert texts(interrupted) == [
        "tick\n[Timed out: the kernel was interrupted; its state is kept.]\n"
    ]
    restarted = outcome_result({"status": "timeout", "output": [], "restarted": True})
    [text] = texts(restarted)
    assert text.endswith(", then restarted as it did not stop: its state is gone.]\n")


def test_an_aborted_execution_says_it_did_not_run() -> None:
    result = outcome_result({"status": "aborted", "output": []})
    assert result.is_error
    assert texts(result)[0].startswith("[Not run:")


def test_no_output_is_said() -> None:
    result = outcome_result({"status": "ok", "execution_count": 1, "output": []})
    assert texts(result) == ["[Done: no output.]"]


def test_a_progress_bar_leaves_its_last_state() -> None:
    result = outcome_result({"status": "ok", "output": [stream("10%\r50%\r100%\ndone\r\n")]})
    assert texts(result) == ["100%\ndone\r\n"]


def test_a_flood_is_clipped_in_its_middle() -> None:
    flood = "".join(f"line {n}\n" for n in range(10_000))
    [text] = texts(outcome_result({"status": "ok", "output": [stream(flood)]}))
    assert len(text) < MAX_TEXT + 100
    assert text.startswith("line 0\n")
    assert text.endswith("line 9999\n")
    assert f"[... {len(flood) - MAX_TEXT} characters not shown ...]" in text
