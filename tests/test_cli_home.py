"""The CLI finds the project's state the way git finds its repository, and says plainly when a server is down."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from wsitk.shared.config import wsi_home

from tests.tcpproxy import free_port


def test_wsi_home_is_found_in_the_working_directory_or_a_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "checkout"
    (project / ".wsi").mkdir(parents=True)
    (project / "docs" / "deep").mkdir(parents=True)
    monkeypatch.delenv("WSI_HOME", raising=False)
    monkeypatch.chdir(project / "docs" / "deep")
    assert wsi_home() == (project / ".wsi").resolve()
    monkeypatch.setenv("WSI_HOME", str(tmp_path / "elsewhere"))
    assert wsi_home() == (tmp_path / "elsewhere").resolve()  # the variable wins
    monkeypatch.delenv("WSI_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert wsi_home() == (tmp_path / "home" / ".wsi").resolve()  # no .wsi above: the user's own


def test_a_server_that_is_down_gets_a_sentence_not_a_traceback(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WSI_")},
        "WSI_HOME": str(tmp_path),
        "WSI_DATABASE_URL": f"postgresql://wsi_app:x@127.0.0.1:{port}/wsi",
    }
    done = subprocess.run(
        [sys.executable, "-m", "wsitk.shared.cli", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "PostgreSQL unreachable" in done.stderr and "wsi stack up" in done.stderr
    assert "Traceback" not in done.stderr
