"""What a container needs from the code itself: no writes relative to the working directory (the
image's root is read-only), and thread pools sized from the container's CPU limit, not the host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def test_the_scorer_keeps_faust_data_under_wsi_home_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsitk.services.mil_scorer.stream import build_app, scorer_datadir
    from wsitk.shared.config import Settings

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("WSI_HOME", str(home))
    monkeypatch.chdir(cwd)
    app = build_app(Settings(kafka_bootstrap="127.0.0.1:9"))
    assert Path(app.conf.datadir).is_absolute()
    assert Path(app.conf.datadir) == scorer_datadir() == home.resolve() / "mil-scorer" / "faust"
    assert Path(app.conf.appdir).is_relative_to(home.resolve())
    app._create_directories()  # what Faust does on its first start (mkdir of the last component only)
    assert Path(app.conf.appdir).is_dir()
    assert list(cwd.iterdir()) == [], "nothing may be created in the (read-only) working directory"


def _cgroup(tmp_path: Path, cpu_max: str | None = None, v1: tuple[int, int] | None = None) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    if cpu_max is not None:
        (root / "cpu.max").write_text(cpu_max + "\n")
    if v1 is not None:
        (root / "cpu").mkdir()
        (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (root / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return root


def test_thread_pools_follow_the_container_cpu_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsitk.shared import cpus

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)), raising=False)
    assert cpus.usable_cpus(_cgroup(tmp_path / "a", "400000 100000")) == 4  # limits.cpu: "4"
    assert cpus.usable_cpus(_cgroup(tmp_path / "b", "250000 100000")) == 3  # 2.5 CPUs: 3 busy threads
    assert cpus.usable_cpus(_cgroup(tmp_path / "c", "max 100000")) == 64  # no limit
    assert cpus.usable_cpus(_cgroup(tmp_path / "d", v1=(200000, 100000))) == 2  # cgroup v1
    assert cpus.usable_cpus(_cgroup(tmp_path / "e", v1=(-1, 100000))) == 64
    assert cpus.usable_cpus(_cgroup(tmp_path / "f", "50000 100000")) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert cpus.usable_cpus(_cgroup(tmp_path / "g", "max 100000")) == 2  # pinned to two cores

    # The embedder's decoders and ONNX Runtime's pool both read it (limit 4 -> 3 decoders + inference).
    from wsitk.services.embedder import engine
    from wsitk.shared.models import runtime

    monkeypatch.setattr(engine, "usable_cpus", lambda: 4)
    assert engine._default_workers() == 3
    seen: dict[str, int] = {}

    class FakeSession:
        def __init__(self, _path: str, sess_options: object, providers: object) -> None:
            seen["threads"] = sess_options.intra_op_num_threads  # type: ignore[attr-defined]

        def get_providers(self) -> list[str]:
            return ["CPUExecutionProvider"]

    model = tmp_path / "model.onnx"
    model.write_bytes(b"not a model: the session is faked")
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 4)
    monkeypatch.setattr(runtime.ort, "InferenceSession", FakeSession)
    runtime.create_session(model, ("CPUExecutionProvider",))
    assert seen["threads"] == 4


def _double(x: int) -> int:
    return 2 * x


def test_isolated_decoding_works_when_the_service_is_pid_1() -> None:
    """In a container the service is pid 1: its decoding child must not take that for a dead parent
    (every slide was rejected as "decoder-crashed" in the images). Run in a new PID namespace."""
    import shutil
    import subprocess
    import sys

    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and util-linux unshare for a PID namespace")
    script = (
        "import os; from wsitk.shared.isolation import IsolatedRunner; "
        "from tests.integration.test_container_runtime import _double; "
        "assert os.getpid() == 1, os.getpid(); "
        "print(IsolatedRunner(1 << 30, 60).run('doubling', _double, 21))"
    )
    result = subprocess.run(
        [unshare, "--pid", "--fork", "--mount-proc", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip() == "42", result.stdout + result.stderr


# Optional third-party modules (import name -> distribution) that only some images carry.
OPTIONAL_MODULES = {
    "scipy": "scipy",
    "openslide": "openslide-python",
    "tifffile": "tifffile",
    "imagecodecs": "imagecodecs",
    "PIL": "pillow",
    "onnxruntime": "onnxruntime",
    "faust": "faust-streaming",
    "h5py": "h5py",
    "torch": "torch",
    "cv2": "opencv-python-headless",
}


# Declared dependencies of those distributions that the services rely on too.
REQUIRES = {"openslide-python": ("pillow",)}


def _extra_distributions(extra: str, extras: dict[str, list[str]]) -> set[str]:
    import re

    names: set[str] = set()
    for requirement in extras[extra]:
        nested = re.match(r"wsi-toolkit\[([\w,-]+)\]", requirement)
        if nested:
            for inner in nested.group(1).split(","):
                names |= _extra_distributions(inner, extras)
        else:
            name = re.split(r"[=<>\[ ;]", requirement, maxsplit=1)[0].lower()
            names |= {name, *REQUIRES.get(name, ())}
    return names


def _imported_top_level(folder: Path) -> set[str]:
    import ast

    modules: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.add(node.module.split(".")[0])
    return modules


@pytest.mark.parametrize("service", ["ingest", "tiler", "quality-filter", "embedder", "mil-scorer"])
def test_each_image_extra_carries_what_its_service_imports(service: str) -> None:
    """An image installs `wsi-toolkit[<service>]` only: an import the extra lacks fails in the container
    (the quality-filter image had no scipy). Imports inside the service's own package count, lazy ones too."""
    import tomllib

    root = Path(__file__).resolve().parents[2]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    have = _extra_distributions(service, extras)
    needed = {
        OPTIONAL_MODULES[m]
        for m in _imported_top_level(root / "services" / service.replace("-", "_"))
        if m in OPTIONAL_MODULES
    }
    if service == "embedder":
        needed.discard("torch")  # the optional torch backend (WSI_EMBED_BACKEND=torch) brings its own install
    missing = needed - have
    assert not missing, f"services/{service} imports {sorted(missing)}, absent from the `{service}` extra"
