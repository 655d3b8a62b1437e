"""Worker processes starting together agree on one server secret, however long making it takes
(a CI run failed a demo start: generating the RSA key took longer than the old 1 s wait, and a
worker that found the file still empty gave up, taking gunicorn down)."""

from __future__ import annotations

import multiprocessing
import stat
import time
from pathlib import Path

from fhirserver.smart.secrets_store import _load_or_create


def _slow_value(path: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    def generate() -> str:
        time.sleep(1.5)  # longer than any reader used to wait
        return f"value of {multiprocessing.current_process().pid}"

    queue.put(_load_or_create(Path(path), generate))


def test_processes_starting_together_agree_on_one_value(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_slow_value, args=(str(path), queue)) for _ in range(6)]
    for p in procs:
        p.start()
    values = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(set(values)) == 1 and values[0] == path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]  # no temporary file left behind
    assert _load_or_create(path, lambda: "another") == values[0]  # later starts read it
