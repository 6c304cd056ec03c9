"""Package layout and the build step that generates the event contracts.

The repository keeps the decided top level (``shared/``, ``services/``) and installs it under one
namespace, ``wsitk``: ``shared/bus`` becomes ``wsitk.shared.bus``, ``services/tiler`` becomes
``wsitk.services.tiler``. Python code for ``proto/`` is generated here, at build time, never
committed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
ROOTS = {"wsitk.shared": "shared", "wsitk.services": "services"}


def generate_contracts() -> None:
    """Run protoc (from grpcio-tools) over proto/ into shared/contracts/_generated/."""
    out = ROOT / "shared" / "contracts" / "_generated"
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}",
           f"--pyi_out={out}", *protos]
    subprocess.run(cmd, check=True, cwd=ROOT / "proto")
    for folder in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()


class BuildWithContracts(build_py):
    def run(self) -> None:
        generate_contracts()
        super().run()


def discover() -> tuple[list[str], dict[str, str]]:
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for name, folder in ROOTS.items():
        package_dir[name] = folder
        packages.append(name)
        packages.extend(f"{name}.{sub}" for sub in find_packages(folder))
    return packages, package_dir


if __name__ == "__main__" or "setuptools" in sys.modules:
    if (ROOT / "proto").is_dir():
        generate_contracts()
    packages, package_dir = discover()
    setup(
        packages=packages,
        package_dir=package_dir,
        package_data={
            "wsitk.shared": ["topics.toml", "db/migrations/*.sql"],
            # the viewer's page and the OpenSeadragon build `make viewer-assets` copies beside it
            "wsitk.services": ["viewer/web/index.html", "viewer/web/public/*", "viewer/web/public/**/*"],
        },
        cmdclass={"build_py": BuildWithContracts},
    )
