"""Tests through the public surface (HTTP, the CLI, a real browser), one folder per package they exercise."""
