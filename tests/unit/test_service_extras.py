"""Each service image installs what its service imports, and only its own extra.

The import graph is read from the source (no service is imported): from every module under
``services/<service>/``, through the ``wsitk`` modules they import, at module level and inside functions
alike (``if TYPE_CHECKING:`` blocks left out). Each third-party module found must come from the core
dependencies or the service's extra in pyproject.toml; a deliberate exception is an entry of
``NOT_FOLLOWED`` saying why. deploy/docker/Dockerfile must install exactly that extra in the service's
image and run that service.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = "wsi-toolkit"

# services/<folder> -> its name: the extra, the image target and `wsi run NAME`
SERVICES = {
    "ingest": "ingest",
    "tiler": "tiler",
    "quality_filter": "quality-filter",
    "embedder": "embedder",
    "mil_scorer": "mil-scorer",
    "recorder": "recorder",
    "viewer": "viewer",
}

# Distributions whose import name is not their own (normalised) name.
IMPORT_NAMES = {
    "opencv-python-headless": "cv2",
    "openslide-python": "openslide",
    "faust-streaming": "faust",
    "fhir-resources": "fhir",
    "pillow": "PIL",
    "protobuf": "google",
    "onnxruntime-gpu": "onnxruntime",
}

ALL = frozenset(SERVICES.values())
# Imports a service's code can reach that its image deliberately does without: (importing module,
# imported module or third-party package) -> (the services concerned, why). Such an edge is not followed.
NOT_FOLLOWED: dict[tuple[str, str], tuple[frozenset[str], str]] = {
    # `wsi model init-defaults` (the tools image) trains the default models with torch on synthetic
    # tiles; services only read the manifest (ServiceContext.model_manifest: load_manifest).
    ("shared/models/defaults.py", "wsitk.shared.models.export"): (ALL, "init-defaults only"),
    ("shared/models/defaults.py", "wsitk.shared.models.mil"): (ALL, "init-defaults only"),
    ("shared/models/defaults.py", "wsitk.shared.models.runtime"): (ALL, "init-defaults only"),
    ("shared/models/defaults.py", "wsitk.shared.slides.synth"): (ALL, "init-defaults only"),
    ("shared/models/defaults.py", "wsitk.shared.models.synth_encoder"): (ALL, "init-defaults only"),
    # Optional torch: imported only where importlib finds it installed (_torch_cuda_available), and the
    # torch backbone backend (WSI_EMBED_BACKEND=torch, or auto on a CUDA machine without a GPU
    # onnxruntime) is for images that install torch beside the extra.
    ("shared/models/runtime.py", "torch"): (ALL, "guarded by importlib.util.find_spec"),
    ("shared/models/runtime.py", "wsitk.shared.models.torch_backend"): (ALL, "the optional torch backend"),
    # Only the mil-scorer loads MIL models (ModelResolver.get); the others ask the registry for the
    # active version, and `wsi model register` (the tools image) reads an ONNX file's contract.
    ("shared/models/registry.py", "wsitk.shared.models.runtime"): (ALL - {"mil-scorer"}, "no MIL model"),
    # The slide cache clears unpacked bundles; reading a DICOM bundle's base level (pydicom) is what
    # ingest and the tiler do, with the slides extra.
    ("shared/slides/bundle.py", "pydicom"): (
        frozenset({"quality-filter", "embedder", "mil-scorer", "recorder"}),
        "cache clean-up only",
    ),
    # The viewer names a rejected tile's reason from its stored measures (measures.decide: numbers
    # only); OpenCV is for measuring, the quality-filter's work.
    ("services/quality_filter/measures.py", "cv2"): (frozenset({"viewer"}), "decide() only"),
    # `wsi rescore` (the operator's command, run with the scorer's code) resolves slide names with
    # ops.resolve_slide_ids, a database query; the rest of the CLI's operations module is not run.
    ("services/mil_scorer/rescore.py", "wsitk.shared.ops"): (frozenset({"mil-scorer"}), "the CLI path"),
    # slide_shard_sources (the viewer's and the CLI's) finds shards from the embeddings; the scorer
    # passes its own shard index to the explanations.
    ("shared/models/explain.py", "wsitk.shared.models.features_export"): (
        frozenset({"mil-scorer"}),
        "not on the scorer's path",
    ),
}


def not_followed(service: str) -> set[tuple[str, str]]:
    return {edge for edge, (services, _why) in NOT_FOLLOWED.items() if service in services}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def import_name(distribution: str) -> str:
    name = canonical(distribution)
    return IMPORT_NAMES.get(name, name.replace("-", "_"))


def _requirement(spec: str) -> tuple[str, list[str]]:
    """``(distribution, [extras])`` of a requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", spec)
    assert match, spec
    return canonical(match.group(1)), [e.strip() for e in (match.group(2) or "").split(",") if e.strip()]


def _pyproject() -> dict[str, object]:
    project: dict[str, object] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project


def distributions(project: dict[str, object], extra: str | None) -> set[str]:
    """The distributions the core dependencies and ``extra`` name (the project's own extras expanded)."""
    base = project["dependencies"]
    extras = project["optional-dependencies"]
    assert isinstance(base, list) and isinstance(extras, dict)
    found: set[str] = set()
    todo = list(base) + (list(extras[extra]) if extra else [])
    while todo:
        name, wanted = _requirement(todo.pop())
        if name == PROJECT:
            todo += [spec for e in wanted for spec in extras[e]]
        else:
            found.add(name)
    return found


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "wsitk" or len(parts) < 2:
        return None
    relative = Path(*parts[1:])
    for candidate in (relative.with_suffix(".py"), relative / "__init__.py"):
        if (REPO / candidate).is_file():
            return REPO / candidate
    return None


def imports_of(source: str) -> list[tuple[str, int]]:
    """Every module an import statement names (with the names imported from it), outside TYPE_CHECKING."""
    tree = ast.parse(source)
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _skipped(here: str, module: str, skip: set[tuple[str, str]]) -> bool:
    """Whether ``here`` importing ``module`` (or a module inside it) is an edge not followed."""
    return any(here == importer and (module + ".").startswith(target + ".") for importer, target in skip)


def third_party_imports(roots: list[Path], skip: set[tuple[str, str]]) -> dict[str, list[str]]:
    """Third-party top-level package -> where it is imported (``path:line``), from ``roots`` on."""
    todo, seen = list(roots), set()
    found: dict[str, set[str]] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        here = str(path.relative_to(REPO))
        for name, line in imports_of(path.read_text()):
            top = name.split(".")[0]
            if top == "wsitk":
                parents = [".".join(name.split(".")[:n]) for n in range(2, name.count(".") + 2)]
                todo += [
                    file
                    for module in parents
                    if not _skipped(here, module, skip) and (file := module_file(module)) is not None
                ]
            elif top not in sys.stdlib_module_names and top != "__future__" and (here, top) not in skip:
                found.setdefault(top, set()).add(f"{here}:{line}")
    return {top: sorted(where) for top, where in found.items()}


def missing_from_image(folder: str, project: dict[str, object]) -> dict[str, list[str]]:
    """What a service imports that neither the core dependencies nor its extra provide."""
    provided = {import_name(d) for d in distributions(project, SERVICES[folder])}
    roots = sorted((REPO / "services" / folder).rglob("*.py"))
    imported = third_party_imports(roots, not_followed(SERVICES[folder]))
    return {top: where for top, where in sorted(imported.items()) if top not in provided}


@pytest.mark.parametrize("folder", sorted(SERVICES))
def test_the_service_extra_provides_every_import(folder: str) -> None:
    missing = missing_from_image(folder, _pyproject())
    assert missing == {}, (
        f"the {SERVICES[folder]} image lacks what its code imports (add it to the extra in pyproject.toml, "
        f"or to NOT_FOLLOWED with the reason): {missing}"
    )


def test_a_missing_dependency_is_found() -> None:
    project = _pyproject()
    extras = dict(project["optional-dependencies"])  # type: ignore[call-overload]
    extras["quality-filter"] = [s for s in extras["quality-filter"] if not s.startswith("opencv")]
    assert "cv2" in missing_from_image("quality_filter", {**project, "optional-dependencies": extras})
    # an edge left out of the graph takes what only it brings along
    registry, edge = (
        [REPO / "shared/models/registry.py"],
        ("shared/models/registry.py", "wsitk.shared.models.runtime"),
    )
    assert "onnxruntime" not in third_party_imports(registry, not_followed("ingest"))
    assert "onnxruntime" in third_party_imports(registry, not_followed("ingest") - {edge})


def test_import_names_match_the_installed_distributions() -> None:
    project = _pyproject()
    packages = importlib.metadata.packages_distributions()
    provides: dict[str, set[str]] = {}
    for top, names in packages.items():
        for name in names:
            provides.setdefault(canonical(name), set()).add(top)
    checked = 0
    for distribution in set().union(
        *(distributions(project, e) for e in [*SERVICES.values(), "embedder-gpu"])
    ):
        if distribution in provides:  # installed here
            assert import_name(distribution) in provides[distribution], distribution
            checked += 1
    assert checked > 10


def dockerfile_images(text: str) -> dict[str, tuple[set[str], str]]:
    """Image target -> (the extras its ``pip install`` names, the service its CMD runs)."""
    images: dict[str, tuple[set[str], str]] = {}
    for block in re.split(r"^FROM ", text, flags=re.M)[1:]:
        target = re.match(r"\S+\s+AS\s+(\S+)", block)
        extras = re.findall(rf'"{PROJECT}\[([^\]]+)\]', block)
        command = re.search(r'^CMD \["wsi", "run", "([^"]+)"\]', block, re.M)
        if target and (extras or command):
            installed = {e.strip() for spec in extras for e in spec.split(",")}
            images[target.group(1)] = (installed, command.group(1) if command else "")
    return images


def dockerfile_problems(text: str) -> list[str]:
    images = dockerfile_images(text)
    problems = []
    for service in SERVICES.values():
        if service not in images:
            problems.append(f"no image target {service}")
            continue
        extras, command = images[service]
        if extras != {service}:
            problems.append(f"the {service} image installs {sorted(extras)}, not [{service}]")
        if command != service:
            problems.append(f"the {service} image runs {command!r}")
    return problems


def test_each_image_installs_its_own_extra() -> None:
    text = (REPO / "deploy/docker/Dockerfile").read_text()
    assert dockerfile_problems(text) == []
    gpu = dockerfile_images((REPO / "deploy/docker/Dockerfile.embedder-gpu").read_text())
    assert gpu == {"embedder-gpu": ({"embedder-gpu"}, "embedder")}
    # the check sees an image that installs another service's extra too
    wrong = text.replace('"wsi-toolkit[tiler]==', '"wsi-toolkit[tiler,embedder]==', 1)
    assert wrong != text and dockerfile_problems(wrong) == [
        "the tiler image installs ['embedder', 'tiler'], not [tiler]"
    ]
