"""Where a request's time goes: pyinstrument over N reads, searches and creates through the real
app in process (Flask test client, SQLite, encryption and audit on). Prints one flame summary per
kind (the call tree down to the frames that take at least --min-share of the time), as quoted in
docs/performance.md.

    .venv/bin/pip install -e '.[profile]' && .venv/bin/python scripts/profile_requests.py [--n 400]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchdata import observation, patient  # noqa: E402


def main() -> None:
    from pyinstrument import Profiler

    from fhirserver.app import create_app
    from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
    from fhirserver.auth.clients import register_backend_client
    from fhirserver.config import load_settings

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--min-share", type=float, default=0.03)
    args = ap.parse_args()
    settings = load_settings(data_dir=tempfile.mkdtemp(prefix="fhirprofile-"), base_url="http://bench/fhir",
                             audit_sequencer=False, privacy_jobs=False, bulk_worker=False, log_level="WARNING")
    app = create_app(settings)
    svc = app.extensions["fhirserver"]
    http = app.test_client()
    key = generate_key("ES384")
    rec = register_backend_client(svc.engine, "profile", "system/*.cruds", jwks=public_jwks(key))
    token = http.post("/auth/token", data=token_request_form(key, rec.client_id, settings.token_url,
                                                             "system/*.cruds")).get_json()["access_token"]
    h = {"Authorization": f"Bearer {token}", "Prefer": "return=minimal"}
    rng = random.Random(3)
    pids, oids = [], []
    for i in range(50):
        pids.append(http.post("/fhir/Patient", json=patient(i, rng), headers=h).headers["Location"].split("/")[-3])
        for _ in range(10):
            oids.append(http.post("/fhir/Observation", json=observation(pids[-1], rng),
                                  headers=h).headers["Location"].split("/")[-3])
    kinds = {
        "read": lambda: http.get(f"/fhir/Observation/{rng.choice(oids)}", headers=h),
        "search": lambda: http.get(f"/fhir/Observation?subject=Patient/{rng.choice(pids)}&code=http://loinc.org|8867-4",
                                   headers=h),
        "create": lambda: http.post("/fhir/Observation", json=observation(rng.choice(pids), rng), headers=h),
        "metadata": lambda: http.get("/fhir/metadata"),
    }
    for name, call in kinds.items():
        for _ in range(20):
            call()  # warm
        profiler = Profiler(interval=0.0002)
        profiler.start()
        for _ in range(args.n):
            resp = call()
            assert resp.status_code in (200, 201), (name, resp.status_code)
        profiler.stop()
        session = profiler.last_session
        assert session is not None
        print(f"===== {name}: {1000 * session.duration / args.n:.2f} ms per request (in process, profiled)")
        print(_summary(profiler, args.min_share))


def _summary(profiler: object, min_share: float) -> str:
    from pyinstrument.renderers import ConsoleRenderer

    renderer = ConsoleRenderer(unicode=False, color=False, show_all=False,
                               processor_options={"filter_threshold": min_share})
    return renderer.render(profiler.last_session)  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
