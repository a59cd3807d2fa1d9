"""What the fault suite's modules share."""

import os
import subprocess

import pytest


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 32 KiB tmpfs (root that may mount), else an ordinary one (the hooks then
    inject what the small disk would do; CITYSEG_TEST_NO_TMPFS=1 asks for that). Yields
    (folder, real)."""
    folder = tmp_path / "small"
    folder.mkdir()
    may_mount = os.geteuid() == 0 and not os.environ.get("CITYSEG_TEST_NO_TMPFS")
    mounted = may_mount and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(folder)],
        capture_output=True).returncode == 0
    try:
        yield folder, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=True)
