"""state.json: the run's small state file (phileo.run_state)."""

from __future__ import annotations

import json

import pytest

from phileo.run_state import EVENTS_KEPT, STATE_FILE, read_state, update_state


def test_state_file_round_trip_keeps_fields_and_stamps_the_writer(tmp_path):
    assert read_state(tmp_path) is None
    update_state(tmp_path, "pending", event="submitted", job_id="17", total_steps=100)
    s = update_state(tmp_path, "running", event="started", step=0)
    assert s["started"] and s["job_id"] == "17" and s["total_steps"] == 100 and s["requeues"] == 0
    s = update_state(tmp_path, last_checkpoint={"step": 50, "path": "checkpoints/step_00000050"}, step=50)
    assert s["state"] == "running"  # fields alone keep the state
    on_disk = json.loads((tmp_path / STATE_FILE).read_text())
    assert on_disk == read_state(tmp_path) == s
    assert [e["event"] for e in on_disk["events"]] == ["submitted", "started"]
    assert all(e["job_id"] == "17" for e in on_disk["events"])
    first_start = s["started"]
    assert update_state(tmp_path, "running", event="started")["started"] == first_start


def test_events_are_bounded_and_bad_input_is_refused(tmp_path):
    for i in range(EVENTS_KEPT + 5):
        update_state(tmp_path, "running", event=f"e{i}")
    events = read_state(tmp_path)["events"]
    assert len(events) == EVENTS_KEPT and events[-1]["event"] == f"e{EVENTS_KEPT + 4}"
    with pytest.raises(ValueError, match="unknown run state 'done'"):
        update_state(tmp_path, "done")
    (tmp_path / STATE_FILE).write_text('{"state": "weird"}')
    with pytest.raises(ValueError, match="not a run state file"):
        read_state(tmp_path)
