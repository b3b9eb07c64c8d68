"""SeaweedFS paused and killed under load (the scenario: ``catalog/testing/s3_faults.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalog.testing.s3_faults import FaultPlan, run_faults


@pytest.mark.slow
@pytest.mark.s3
def test_clients_fail_cleanly_in_time_nothing_is_lost_and_the_catalog_recovers(
    tmp_path: Path,
) -> None:
    plan = FaultPlan(pause_at=3, pause_s=6, crash_at=13, down_s=3, total_s=24)
    report = run_faults(tmp_path, plan).to_json()
    codes = {code for counts in report["outcomes"].values() for code in counts}
    assert codes <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, report["outcomes"]
    # both faults were felt: calls failed during them, and each failed cleanly in time
    assert report["failed_cleanly"] > 0
    assert report["outcomes"]["push"].get("DEADLINE_EXCEEDED", 0) > 0  # the paused store
    assert report["outcomes"]["push"].get("UNAVAILABLE", 0) > 0  # the killed store
    assert report["late"] == 0, report["max_failed_call_s"]
    assert report["lost"] == 0
    assert report["half_written"] == 0
    assert report["verify_problems"] == []
    assert report["rebuilt_index_matches"]
    # it recovered by itself after each fault, without restarting the catalog
    assert all(seconds is not None for seconds in report["recovery_s"].values()), report
