"""The npm packages of scripts/interop-js (SMART's `fhirclient`; `axe-core` for the portal's
accessibility check), installed once per checkout.

Two test modules need them and may run in two xdist workers at the same time; `npm ci` starts by
deleting node_modules, so two concurrent installs break each other ("Cannot find module
'fhirclient'"). An exclusive file lock makes the second wait and then find the packages there."""

from __future__ import annotations

import fcntl
import subprocess
from pathlib import Path

SCRIPT_DIR = Path(__file__).resolve().parents[2] / "scripts" / "interop-js"


def node_modules() -> Path:
    with (SCRIPT_DIR / ".npm-ci.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wanted = ("fhirclient", "axe-core")
        if not all((SCRIPT_DIR / "node_modules" / name / "package.json").is_file() for name in wanted):
            proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--legacy-peer-deps"],
                                  cwd=SCRIPT_DIR, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"npm ci failed:\n{proc.stdout}\n{proc.stderr}"
    return SCRIPT_DIR / "node_modules"
