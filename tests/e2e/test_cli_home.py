"""The CLI finds the project's state the way git finds its repository, and says plainly when a server is down."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

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


def test_with_no_state_anywhere_the_cli_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from wsitk.shared.cli import main

    for name in [n for n in os.environ if n.startswith("WSI_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.wsi either
    monkeypatch.chdir(tmp_path)
    for argv in (["status"], ["events", "tail"], ["export", "heatmap", "0123456789ab", "--out", "out"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err  # one line
        assert f"no .wsi folder in {tmp_path}" in err and "make demo" in err and "WSI_HOME" in err
    assert not (tmp_path / "home" / ".wsi").exists()  # looking created nothing
    monkeypatch.setenv("WSI_DATABASE_URL", "postgresql://wsi_app:x@127.0.0.1:1/wsi")
    assert main(["status"]) == 2  # endpoints given: no local state needed, the server is what is missing
    assert "PostgreSQL unreachable" in capsys.readouterr().err


def _wsi(cwd: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``.venv/bin/wsi ARGS`` as the README shows it: no WSI_* variable set, from ``cwd``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSI_")}
    return subprocess.run(
        [sys.executable, "-m", "wsitk.shared.cli", *args],
        cwd=cwd,
        env={**env, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.e2e
def test_the_readme_commands_work_from_the_checkout_and_take_the_ids_status_prints(
    stack: Any, tmp_path: Path
) -> None:
    import psycopg

    checkout = tmp_path / "checkout"
    (checkout / "docs").mkdir(parents=True)
    (checkout / ".wsi").symlink_to(stack.state_dir)  # what `make demo` leaves: the stack's state in .wsi
    prefix = uuid.uuid4().hex[:8]
    first, second = prefix + "a" + uuid.uuid4().hex[:23], prefix + "b" + uuid.uuid4().hex[:23]
    with psycopg.connect(stack.database_url(), options="-c search_path=wsi,public") as conn:
        for slide_id, key in ((first, f"{prefix}/one.svs"), (second, f"{prefix}/two.svs")):
            conn.execute("INSERT INTO slides (slide_id, status) VALUES (%s, 'predicted')", (slide_id,))
            conn.execute(
                "INSERT INTO slide_sources (bucket, upload_key, slide_id) VALUES ('wsi-uploads', %s, %s)",
                (key, slide_id),
            )
            conn.execute(
                "INSERT INTO slide_runs (slide_id, tiling_run_id) VALUES (%s, %s)",
                (slide_id, f"run-{slide_id}"),
            )

    listed = _wsi(checkout, tmp_path, "status", "--limit", "500")
    assert listed.returncode == 0, listed.stderr
    assert first[:12] in listed.stdout and second[:12] in listed.stdout  # the short ids it prints
    tailed = _wsi(
        checkout / "docs", tmp_path, "events", "tail", "--idle-timeout", "1"
    )  # from a subfolder too
    assert tailed.returncode == 0, tailed.stderr

    one = _wsi(checkout, tmp_path, "status", "--slide", first[:12])
    assert one.returncode == 0, one.stderr
    assert f"run-{first}" in one.stdout and f"run-{second}" not in one.stdout
    by_name = _wsi(checkout, tmp_path, "status", "--slide", "two.svs")
    assert by_name.returncode == 0 and f"run-{second}" in by_name.stdout, by_name.stderr
    ambiguous = _wsi(checkout, tmp_path, "status", "--slide", prefix)
    assert ambiguous.returncode == 2 and "names 2 slides" in ambiguous.stderr, ambiguous.stderr
    assert first[:12] in ambiguous.stderr and second[:12] in ambiguous.stderr
    unknown = _wsi(checkout, tmp_path, "status", "--slide", "ffffffff0000")
    assert unknown.returncode == 2 and "no such slide" in unknown.stderr, unknown.stderr
    assert "Traceback" not in ambiguous.stderr + unknown.stderr

    # export looks the short id up: the error names the whole slide id (nothing was scored here)
    exported = _wsi(checkout, tmp_path, "export", "geojson", first[:12], "--out", str(tmp_path / "out"))
    assert exported.returncode == 1 and f"no attention map of slide {first}" in exported.stderr, (
        exported.stderr
    )
