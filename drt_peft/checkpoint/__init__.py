"""Saving, loading and uploading adapters."""
