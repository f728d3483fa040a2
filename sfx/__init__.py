"""The ``sfx`` command: the one face of sfx-live that may compose its services."""
