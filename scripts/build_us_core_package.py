"""Assemble profiles/packages/hl7.fhir.us.core-6.1.0.tgz from the HL7 US Core source repository.

Usage: python scripts/build_us_core_package.py CHECKOUT   (a checkout of github.com/HL7/US-Core
at tag 6.1.0, or `git archive 6.1.0 input fsh-generated | tar x` of it)

The published package (packages.fhir.org) is not reachable from here, so the package is built in
the same NPM layout from the tag's own sources: its StructureDefinitions (differentials; the IG
publisher adds snapshots, which this server does not read), ValueSets, CodeSystems and examples.
US Core is CC0-1.0 (HL7). The output is byte-for-byte reproducible (sorted members, zero times).
"""

from __future__ import annotations

import gzip
import io
import json
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "profiles" / "packages" / "hl7.fhir.us.core-6.1.0.tgz"
CONFORMANCE = ("StructureDefinition", "ValueSet", "CodeSystem")


def main(checkout: Path) -> None:
    ig = json.loads((checkout / "fsh-generated/resources/ImplementationGuide-hl7.fhir.us.core.json").read_text())
    files: dict[str, bytes] = {}
    for path in sorted((checkout / "input/resources").glob("*.json")):
        doc = json.loads(path.read_text())
        if doc.get("resourceType") in CONFORMANCE:
            files[f"package/{doc['resourceType']}-{doc['id']}.json"] = path.read_bytes()
    for path in sorted((checkout / "input/examples").glob("*.json")):
        doc = json.loads(path.read_text())
        files[f"package/example/{doc['resourceType']}-{doc['id']}.json"] = path.read_bytes()
    manifest = {
        "name": ig["packageId"], "version": ig["version"], "fhirVersions": ig["fhirVersion"],
        "license": ig["license"], "canonical": ig["url"].rsplit("/ImplementationGuide/", 1)[0],
        "title": ig.get("title"), "author": "HL7 International / Cross-Group Projects",
        "description": "US Core 6.1.0 conformance resources and examples, assembled from the tag 6.1.0 "
                       "sources of https://github.com/HL7/US-Core (differentials only).",
        "dependencies": {d["packageId"]: d["version"] for d in ig.get("dependsOn", [])},
    }
    files["package/package.json"] = json.dumps(manifest, indent=2).encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(files[name]), 0, 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    print(f"{OUT.relative_to(ROOT)}: {len(files)} files, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
