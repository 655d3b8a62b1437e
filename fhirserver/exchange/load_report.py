"""What `fhirserver load` reports: per file and in total, loaded, updated, skipped and invalid items."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

MAX_REPORTED_INVALID = 100


@dataclass
class FileReport:
    path: Path
    status: str = "loaded"  # loaded | resumed | restarted (changed since the interrupted run) | already loaded
    resumed_at: int = 0
    loaded: Counter[str] = field(default_factory=Counter)
    updated: int = 0  # of `loaded`, resources that existed already (a new version)
    skipped: Counter[str] = field(default_factory=Counter)
    invalid: int = 0

    def counts_json(self) -> str:
        return json.dumps({"loaded": dict(self.loaded), "updated": self.updated, "skipped": dict(self.skipped),
                           "invalid": self.invalid}, sort_keys=True)

    def restore(self, text: str) -> None:
        data = json.loads(text or "{}")
        self.loaded = Counter(data.get("loaded", {}))
        self.updated = int(data.get("updated", 0))
        self.skipped = Counter(data.get("skipped", {}))
        self.invalid = int(data.get("invalid", 0))

    def describe(self) -> str:
        parts = [f"loaded {_counts(self.loaded)}"]
        if self.updated:
            parts.append(f"{self.updated} updated")
        if self.skipped:
            parts.append(f"skipped {_counts(self.skipped)}")
        if self.invalid:
            parts.append(f"invalid {self.invalid}")
        return "; ".join(parts)


@dataclass
class LoadReport:
    files: list[FileReport] = field(default_factory=list)
    elapsed: float = 0.0
    invalid_messages: list[str] = field(default_factory=list)

    def total(self, name: str) -> Counter[str]:
        out: Counter[str] = Counter()
        for f in self.files:
            if f.status != "already loaded":
                out.update(getattr(f, name))
        return out

    @property
    def invalid(self) -> int:
        return sum(f.invalid for f in self.files if f.status != "already loaded")

    @property
    def loaded_total(self) -> int:
        return sum(self.total("loaded").values())

    @property
    def rate(self) -> float:
        return self.loaded_total / self.elapsed if self.elapsed > 0 else 0.0

    def summary(self) -> str:
        done = [f for f in self.files if f.status != "already loaded"]
        already = [f for f in self.files if f.status == "already loaded"]
        lines = [f"files: {len(done)} loaded" + (f", {len(already)} already loaded (skipped; --force reloads)"
                                                 if already else "")]
        for f in done:
            if f.status == "resumed":
                lines.append(f"resumed: {f.path} at item {f.resumed_at}")
            elif f.status == "restarted":
                lines.append(f"restarted: {f.path} changed since the interrupted run; loaded from the start")
        for f in already:
            lines.append(f"already loaded: {f.path}")
        loaded = self.total("loaded")
        updated = sum(f.updated for f in done)
        lines.append(f"loaded: {_counts(loaded)} (total {sum(loaded.values())}"
                     + (f", {updated} as new versions of existing resources)" if updated else ")"))
        skipped = self.total("skipped")
        lines.append(f"skipped (type not stored): {_counts(skipped) if skipped else 'none'}")
        lines.append(f"invalid: {self.invalid}")
        lines.append(f"elapsed: {self.elapsed:.1f} s, {self.rate:.0f} resources/s")
        return "\n".join(lines)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"


# ---------------------------------------------------------------- reading files


# ---------------------------------------------------------------- writing
