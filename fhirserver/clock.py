"""The server's clock: the one place "now" comes from (microseconds since the epoch, UTC), so every
time column, token expiry and audit timestamp agrees and tests can reason about it."""

from __future__ import annotations

import time


def now_us() -> int:
    return time.time_ns() // 1000
