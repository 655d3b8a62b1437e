"""FHIR R4 protocol pieces: registry, validation, OperationOutcome, capability statement."""
