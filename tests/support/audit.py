"""The audit log as `fhirserver audit verify` checks it, for tests holding a Services object."""

from __future__ import annotations

from fhirserver.audit.verify import VerifyResult, verify_log
from fhirserver.services import Services


def verify_audit(svc: Services) -> VerifyResult:
    """Sequence pending records (as the server does) and verify the whole log."""
    svc.sequencer.run_once(checkpoint=False)
    return verify_log(svc.audit, svc.sequencer.signer, svc.settings.checkpoint_path)
