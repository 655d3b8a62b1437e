"""FHIR R4 protocol pieces with no storage behind them: the resource-type registry, date and
instant values, the FHIRPath subset, validation (JSON schema, models, structure, narrative,
profiles), OperationOutcome errors, reference rewriting and _summary/_elements.

May import: clock, config.
"""
