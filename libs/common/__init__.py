"""What every sfx-live service shares: contracts, settings, bus, live state, logging, geometry, symmetry."""
