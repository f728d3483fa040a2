"""sfx-live merger service."""
