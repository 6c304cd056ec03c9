"""Every expected failure of ``wsi`` is one readable line and a non-zero status, never a traceback;
an unexpected one keeps its traceback only under ``--debug`` or ``WSI_DEBUG=1``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from wsitk.shared import ops
from wsitk.shared.cli import main
from wsitk.shared.corrections import CorrectionError

from tests.tcpproxy import free_port


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state directory with no stack in it, and no WSI_* setting leaking in from the caller."""
    for name in [n for n in os.environ if n.startswith("WSI_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("WSI_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(argv)
    return status, capsys.readouterr().err


def test_an_unexpected_error_is_one_line_unless_debugging(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(_args: object) -> int:
        raise ZeroDivisionError("a bug in the command")

    monkeypatch.setattr(ops, "cli_status", broken)
    status, err = _run(["status"], capsys)
    assert status == 1
    assert "wsi status: unexpected error: ZeroDivisionError: a bug in the command" in err
    assert "--debug" in err and "Traceback" not in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "status"])
    with pytest.raises(ZeroDivisionError):
        main(["status", "--debug"])  # anywhere on the line
    monkeypatch.setenv("WSI_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["status"])


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (CorrectionError("slide 'c0ffee00' names 2 slides (c0ffee00aaaa, c0ffee00bbbb)"), "names 2 slides"),
        (FileNotFoundError(2, "No such file or directory", "models/mil.onnx"), "models/mil.onnx"),
    ],
)
def test_known_failures_are_a_sentence_and_status_2(
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: Exception,
    expected: str,
) -> None:
    def failing(_args: object) -> int:
        raise error

    monkeypatch.setattr(ops, "cli_status", failing)
    status, err = _run(["status"], capsys)
    assert status == 2, err
    assert err.startswith("wsi status: ") and expected in err
    assert "Traceback" not in err and "unexpected" not in err


def test_a_bad_setting_names_the_variable(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WSI_METRICS_PORT", "not-a-port")
    status, err = _run(["status"], capsys)
    assert status == 2
    assert "invalid configuration: WSI_METRICS_PORT" in err and "Traceback" not in err


def test_an_unreachable_broker_and_s3_server_are_named(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    nothing = free_port()  # nothing listens there
    monkeypatch.setenv("WSI_KAFKA_BOOTSTRAP", f"127.0.0.1:{nothing}")
    monkeypatch.setenv("WSI_S3_ENDPOINT", f"127.0.0.1:{nothing}")
    status, err = _run(["events", "tail", "--idle-timeout", "1"], capsys)
    assert status == 2, err
    assert f"wsi events tail: Kafka broker unreachable at 127.0.0.1:{nothing}" in err
    assert "wsi stack up" in err and "Traceback" not in err

    slide = tmp_path / "slide.svs"
    slide.write_bytes(b"not really a slide")
    status, err = _run(["submit", str(slide)], capsys)
    assert status == 2, err
    assert f"wsi submit: S3 server unreachable at 127.0.0.1:{nothing}" in err and "Traceback" not in err


def test_bad_arguments_are_argparse_usage_not_a_traceback(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["status", "--no-such-option"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
