"""The metrics are created on first use; a worker's threads answering their first requests at the
same moment must not both register them (the second registration raised DuplicateTimeseries and
the request got a 500)."""

from __future__ import annotations

import subprocess
import sys

RACE = """
import threading
from fhirserver import metrics

start = threading.Barrier(16)
errors = []

def first_request():
    start.wait()
    try:
        metrics.observe("read", "Observation", 200, 0.001)
    except Exception as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=first_request) for _ in range(16)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(len(errors), errors[:1])
"""


def test_threads_recording_their_first_request_at_once_all_succeed() -> None:
    for _ in range(3):  # a fresh interpreter each time: the metrics do not exist yet
        out = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout.split()[0] == "0", out.stdout
