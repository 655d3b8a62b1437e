"""Search: parameter registry, FHIRPath-subset extraction, indexing and SQL query building."""
