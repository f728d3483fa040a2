"""sfx-live ingest service."""
