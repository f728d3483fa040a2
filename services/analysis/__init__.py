"""sfx-live analysis service."""
