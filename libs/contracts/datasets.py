"""How runs group into datasets: the one rule the merger, `sfx demo` and `sfx status` share."""

from __future__ import annotations

import re

from libs.contracts.messages import RunManifest

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def dataset_id_for(manifest: RunManifest) -> str:
    """Runs of the same sample, space group and cell (to 0.1 Å / 0.1°) merge into one dataset."""
    assert manifest.cell is not None and manifest.space_group is not None
    cell = "_".join(f"{value:.1f}" for value in manifest.cell)
    group = manifest.space_group.replace(" ", "")
    sample = manifest.sample or "sample"
    return _UNSAFE.sub("-", f"{sample}_{group}_{cell}")
