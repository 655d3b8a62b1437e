"""Interoperability: the npm `fhirclient` library (SMART's reference JavaScript client, Node
adapter) performs a standalone patient launch against a real HTTP server and reads the patient
(`scripts/interop-js/run.mjs`). Runs wherever `node` and `npm` are installed; the packages come
from the committed lock file."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.functional.smart.conftest import PASSWORD, seed_live
from tests.support.npm import node_modules as installed_node_modules

SCRIPT_DIR = Path(__file__).resolve().parents[3] / "scripts" / "interop-js"
pytestmark = pytest.mark.skipif(not (shutil.which("node") and shutil.which("npm")), reason="node/npm not installed")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    return installed_node_modules()


def test_npm_fhirclient_standalone_patient_launch(live: tuple[str, Any], node_modules: Path) -> None:
    base, app = live
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        app_port = s.getsockname()[1]
    pid, username, client_id = seed_live(base, app, "openid fhirUser launch/patient patient/*.rs",
                                         f"http://127.0.0.1:{app_port}/callback", family="NodeInterop")
    proc = subprocess.run(["node", "run.mjs", base, username, PASSWORD, client_id, str(app_port), pid],
                          cwd=SCRIPT_DIR, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert f'"patient":"{pid}"' in proc.stdout and '"family":"NodeInterop"' in proc.stdout
