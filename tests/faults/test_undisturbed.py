"""The baseline row: the reference run itself, undisturbed (its audit must be clean for the rest to mean anything)."""

from __future__ import annotations

from collections.abc import Callable

from tests.faults.support import FRAMES, Reference, Row, audit_journal, mtz_difference


def test_the_undisturbed_run_is_complete(reference: Reference, record_row: Callable[[Row], None]) -> None:
    result = audit_journal(reference.journal, FRAMES)
    identical = "yes" if mtz_difference(reference.mtz, reference.columns) is None else "no"
    record_row(
        Row(
            "undisturbed (reference)",
            FRAMES,
            result.merged,
            result.error_records,
            result.duplicates,
            result.lost,
            identical,
            None,
        )
    )
    print(f"reference run: {reference.seconds:.1f} s from landing to the final MergeUpdate")
    assert (result.duplicates, result.lost, result.error_records) == (0, 0, 0)
