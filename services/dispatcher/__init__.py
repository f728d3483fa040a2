"""sfx-live dispatcher service."""
