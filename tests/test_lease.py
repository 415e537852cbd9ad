"""The output lease: one writer per output folder (no Ray needed)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from skp_ray.lease import LEASE_FILE, LeaseHeldError, OutputLease


def write_lease(folder, **fields):
    record = {"owner": "other-run", "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
    (folder / LEASE_FILE).write_text(json.dumps({**record, **fields}))


def test_a_second_writer_is_refused_with_who_holds_the_lease(tmp_path):
    with OutputLease(str(tmp_path), "first"):
        held = json.loads((tmp_path / LEASE_FILE).read_text())
        assert held["owner"] == "first" and held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(LeaseHeldError) as info:
            OutputLease(str(tmp_path), "second").acquire()
        assert "run first" in str(info.value) and str(tmp_path) in str(info.value)
    assert not (tmp_path / LEASE_FILE).exists()  # given back
    with OutputLease(str(tmp_path), "second"):
        pass


def test_the_heartbeat_is_renewed_while_the_lease_is_held(tmp_path):
    with OutputLease(str(tmp_path), "beating", stale_after_s=60, heartbeat_s=0.2):
        first = json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"]
        time.sleep(0.7)
        assert json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"] > first


def test_a_lease_with_an_old_heartbeat_is_taken_over(tmp_path):
    write_lease(tmp_path, host="another-host", heartbeat=time.time() - 301)
    with OutputLease(str(tmp_path), "mine", stale_after_s=300):
        assert json.loads((tmp_path / LEASE_FILE).read_text())["owner"] == "mine"


def test_a_fresh_lease_of_another_host_is_respected(tmp_path):
    write_lease(tmp_path, host="another-host", heartbeat=time.time() - 10)
    with pytest.raises(LeaseHeldError, match="another-host"):
        OutputLease(str(tmp_path), "mine", stale_after_s=300).acquire()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["owner"] == "other-run"  # untouched


def test_a_lease_whose_process_is_gone_from_this_host_is_taken_over(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_lease(tmp_path, pid=int(finished.stdout))  # a killed run's lease: fresh heartbeat, no process
    with OutputLease(str(tmp_path), "mine"):
        assert json.loads((tmp_path / LEASE_FILE).read_text())["owner"] == "mine"


def test_a_lease_on_object_storage(s3_endpoint):
    import fsspec

    fsspec.filesystem("s3").mkdir("skp-lease")
    with OutputLease("s3://skp-lease/labels", "first"):
        with pytest.raises(LeaseHeldError, match="run first"):
            OutputLease("s3://skp-lease/labels", "second").acquire()
    assert not fsspec.filesystem("s3").exists(f"skp-lease/labels/{LEASE_FILE}")


def test_an_output_that_cannot_be_written_fails_at_once(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError):
        OutputLease(str(tmp_path / "file" / "labels"), "mine").acquire()
