"""Storage: the resource repository over encrypted versions and index tables."""
