"""The science every part shares: detector geometry, crystal symmetry, detector file formats (no bus, no Redis)."""
