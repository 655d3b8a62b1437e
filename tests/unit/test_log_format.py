"""An exception reaches the log as its types and frames, never its message (issue 29, operations):
the message is the part most likely to hold patient data -- a database error quotes its statement's
values, a parse error the offending text."""

from __future__ import annotations

import json
import logging

from fhirserver.logs import JsonFormatter

NAME = "Devendra Okonkwo-Shah"


def _fail_deep() -> None:
    try:
        raise KeyError(f"Patient name {NAME}")
    except KeyError as exc:
        raise ValueError(f"could not store birthDate 1961-07-14 of {NAME}") from exc


def test_an_exception_is_logged_without_its_message() -> None:
    try:
        _fail_deep()
    except ValueError:
        record = logging.LogRecord("fhirserver.pipeline", logging.ERROR, __file__, 1, "request %s failed",
                                   ("rid-1",), exc_info=__import__("sys").exc_info())
    line = JsonFormatter().format(record)
    assert NAME not in line and "1961-07-14" not in line and "Okonkwo" not in line
    out = json.loads(line)
    assert out["message"] == "request rid-1 failed"
    assert out["exception"]["type"] == "builtins.ValueError"
    assert out["exception"]["caused_by"] == ["builtins.KeyError"]
    frames = out["exception"]["frames"]
    assert any("test_log_format.py" in f and "in _fail_deep" in f for f in frames), frames
