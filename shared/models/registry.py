"""The model registry: MIL model versions as PostgreSQL rows with their artifacts in the object store.

A registered version is an ONNX file (as ``export_mil`` writes it: its contract is in its metadata) plus a
model card, stored under ``models/{model_version}/`` in the artifacts bucket, and one row in
``wsi.model_versions`` with what a reviewer asks of a model: the architecture, the backbone and pipeline
profile it expects, the training data summary and protocol, the held-out test metrics with confidence
intervals, who registered and promoted it and when. ``model_events`` keeps the history.

At most one version is *active* (a partial unique index enforces it). The ingest service pins the active
version on every new slide's pipeline profile, and the mil-scorer scores each slide with the version pinned
on it, loading versions from the registry as they appear: promotion needs no restart, and a redelivered
event after a promotion still gives the prediction it gave before (same version, same prediction id).
Without any active version, the shipped default model in ``$WSI_MODEL_DIR/models.json`` is used.

This module needs ``onnxruntime`` (to read model metadata) and psycopg; no torch.
"""

from __future__ import annotations

import getpass
import json
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg.types.json import Jsonb
from wsitk.shared.db.connection import Database
from wsitk.shared.errors import PermanentError
from wsitk.shared.models.defaults import load_manifest
from wsitk.shared.objectstore import ObjectStore, sha256_file

PROFILE_KEYS = ("backbone_id", "target_mpp", "tile_size", "stain_method")


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked (unknown version, mismatch, conflict)."""


def default_actor() -> str:
    """``user@host`` of whoever runs the command (overridable with ``--actor``)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class ModelVersion:
    model_version: str
    status: str
    architecture: dict[str, Any]
    backbone_id: str
    in_dim: int
    profile: dict[str, Any]
    threshold: float
    artifact_bucket: str
    artifact_key: str
    artifact_sha256: str
    artifact_size: int
    card_key: str | None
    training: dict[str, Any]
    metrics: dict[str, Any]
    created_by: str
    created_at: Any
    promoted_at: Any
    promoted_by: str | None


_COLUMNS = (
    "model_version, status, architecture, backbone_id, in_dim, profile, threshold, artifact_bucket, "
    "artifact_key, artifact_sha256, artifact_size, card_key, training, metrics, created_by, created_at, "
    "promoted_at, promoted_by"
)


def _row(values: tuple[Any, ...]) -> ModelVersion:
    return ModelVersion(*values)


def read_onnx_contract(path: Path) -> dict[str, Any]:
    """The MIL contract in an exported ONNX file's metadata (model_version, backbone_id, in_dim, ...)."""
    from wsitk.shared.models.runtime import MilRunner

    runner = MilRunner(path)
    return dict(runner.metadata)


def register_model(
    db: Database,
    store: ObjectStore,
    bucket: str,
    onnx_path: Path,
    *,
    card: Mapping[str, Any] | None = None,
    profile: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    actor: str | None = None,
) -> ModelVersion:
    """Upload the ONNX file and its card, insert the registry row; idempotent for the same file.

    Registering a different file under an existing version is refused: a version names one artifact.
    """
    onnx_path = Path(onnx_path)
    contract = read_onnx_contract(onnx_path)
    version = str(contract["model_version"])
    digest = sha256_file(onnx_path)
    existing = get_version(db, version)
    if existing is not None:
        if existing.artifact_sha256 != digest:
            raise RegistryError(
                f"model version {version} is already registered with another artifact "
                f"(sha256 {existing.artifact_sha256[:12]}..., this file {digest[:12]}...); a version names "
                "one file: export under a new version name"
            )
        return existing
    expected = {"backbone_id": str(contract["backbone_id"]), **dict(contract.get("profile") or {})}
    expected.update(dict(profile or {}))
    artifact = store.put_file_if_absent(bucket, f"models/{version}/model.onnx", onnx_path)
    full_card = {
        "model_version": version,
        "architecture": contract.get("architecture", {}),
        "backbone_id": contract["backbone_id"],
        "threshold": contract["threshold"],
        "profile": expected,
        "training": dict(training or {}),
        "metrics": dict(metrics or {}),
        "artifact": {"bucket": artifact.bucket, "key": artifact.key, "sha256": artifact.sha256},
        **dict(card or {}),
    }
    card_ref = store.put_if_absent(
        bucket,
        f"models/{version}/card.json",
        json.dumps(full_card, indent=2, sort_keys=True, default=str).encode(),
        content_type="application/json",
    )
    who = actor or default_actor()
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO model_versions (model_version, status, architecture, backbone_id, in_dim, profile, "
            "threshold, artifact_bucket, artifact_key, artifact_sha256, artifact_size, card_key, training, "
            "metrics, created_by) VALUES (%s, 'registered', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (model_version) DO NOTHING",
            (
                version,
                Jsonb(contract.get("architecture", {})),
                str(contract["backbone_id"]),
                int(contract["in_dim"]),
                Jsonb(expected),
                float(contract["threshold"]),
                artifact.bucket,
                artifact.key,
                digest,
                artifact.size,
                card_ref.key,
                Jsonb(dict(training or {})),
                Jsonb(dict(metrics or {})),
                who,
            ),
        )
        conn.execute(
            "INSERT INTO model_events (model_version, action, actor, detail) VALUES (%s, 'registered', %s, %s)",
            (version, who, Jsonb({"artifact_key": artifact.key, "sha256": digest})),
        )
    registered = get_version(db, version)
    assert registered is not None
    return registered


def get_version(db: Database, version: str) -> ModelVersion | None:
    rows = db.execute(f"SELECT {_COLUMNS} FROM model_versions WHERE model_version = %s", (version,))
    return _row(rows[0]) if rows else None


def list_versions(db: Database) -> list[ModelVersion]:
    return [_row(r) for r in db.execute(f"SELECT {_COLUMNS} FROM model_versions ORDER BY created_at")]


def active_version(db: Database) -> str | None:
    rows = db.execute("SELECT model_version FROM model_versions WHERE status = 'active'")
    return str(rows[0][0]) if rows else None


def promote(
    db: Database,
    version: str,
    *,
    actor: str | None = None,
    serving_backbone_id: str | None = None,
    force: bool = False,
) -> ModelVersion:
    """Make ``version`` the active one (the previous active version goes back to 'registered').

    ``serving_backbone_id`` is the backbone the embedder runs; a model trained on another backbone could
    score no new slide, so promoting it is refused unless ``force`` (for a planned encoder switch).
    """
    who = actor or default_actor()
    with db.transaction() as conn:
        conn.execute("LOCK TABLE model_versions IN SHARE ROW EXCLUSIVE MODE")
        row = conn.execute(
            "SELECT status, backbone_id FROM model_versions WHERE model_version = %s", (version,)
        ).fetchone()
        if row is None:
            known = [
                r[0] for r in conn.execute("SELECT model_version FROM model_versions ORDER BY created_at")
            ]
            raise RegistryError(
                f"no registered model version {version!r}; registered: {known or 'none'} "
                "(register one with `wsi model register RUN_DIR`)"
            )
        status, backbone = row
        if status == "retired":
            raise RegistryError(f"model version {version} is retired; register a new version instead")
        if serving_backbone_id and backbone != serving_backbone_id and not force:
            raise RegistryError(
                f"model version {version} was trained on embeddings of backbone {backbone}, but the embedder "
                f"serves {serving_backbone_id}: every new slide would be refused. Re-train on this backbone, "
                "or pass --force when switching the encoder too"
            )
        if status == "active":
            return _promoted(conn, version)
        previous = conn.execute(
            "UPDATE model_versions SET status = 'registered' WHERE status = 'active' RETURNING model_version"
        ).fetchall()
        for (old,) in previous:
            conn.execute(
                "INSERT INTO model_events (model_version, action, actor, detail) VALUES (%s, 'demoted', %s, %s)",
                (old, who, Jsonb({"replaced_by": version})),
            )
        conn.execute(
            "UPDATE model_versions SET status = 'active', promoted_at = now(), promoted_by = %s "
            "WHERE model_version = %s",
            (who, version),
        )
        conn.execute(
            "INSERT INTO model_events (model_version, action, actor, detail) VALUES (%s, 'promoted', %s, %s)",
            (version, who, Jsonb({"replaced": [old for (old,) in previous]})),
        )
        return _promoted(conn, version)


def deactivate(db: Database, *, actor: str | None = None) -> str | None:
    """No active version any more: new slides get the shipped default model. Returns the demoted one."""
    who = actor or default_actor()
    with db.transaction() as conn:
        row = conn.execute(
            "UPDATE model_versions SET status = 'registered' WHERE status = 'active' RETURNING model_version"
        ).fetchone()
        if row is None:
            return None
        conn.execute(
            "INSERT INTO model_events (model_version, action, actor, detail) VALUES (%s, 'demoted', %s, %s)",
            (row[0], who, Jsonb({"replaced_by": "shipped default"})),
        )
        return str(row[0])


def _promoted(conn: Any, version: str) -> ModelVersion:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM model_versions WHERE model_version = %s", (version,)
    ).fetchone()
    return _row(row)


def retire(db: Database, version: str, *, actor: str | None = None) -> None:
    """Retire a version: it can no longer be promoted; an active version must be replaced first."""
    who = actor or default_actor()
    with db.transaction() as conn:
        row = conn.execute(
            "SELECT status FROM model_versions WHERE model_version = %s", (version,)
        ).fetchone()
        if row is None:
            raise RegistryError(f"no registered model version {version!r}")
        if row[0] == "active":
            raise RegistryError(f"{version} is active; promote another version before retiring it")
        conn.execute("UPDATE model_versions SET status = 'retired' WHERE model_version = %s", (version,))
        conn.execute(
            "INSERT INTO model_events (model_version, action, actor) VALUES (%s, 'retired', %s)",
            (version, who),
        )


def profile_mismatch(expected: Mapping[str, Any], profile: Any, backbone_ids: set[str]) -> str | None:
    """Why a slide (its pipeline profile and the backbones its shards were embedded with) does not fit a
    model's expectations; None when it fits. Keys the model does not state are not checked."""
    problems = []
    want_backbone = expected.get("backbone_id")
    if want_backbone and backbone_ids and backbone_ids != {want_backbone}:
        problems.append(f"embedded with {sorted(backbone_ids)}, the model was trained on {want_backbone}")
    for key in ("target_mpp", "tile_size", "stain_method"):
        if key not in expected:
            continue
        got = getattr(profile, key)
        want = expected[key]
        same = abs(float(got) - float(want)) < 1e-9 if key == "target_mpp" else got == want
        if not same:
            problems.append(f"{key} {got!r} but the model was trained with {want!r}")
    return "; ".join(problems) or None


class ModelResolver:
    """Loads MIL model versions for scoring: the shipped default from the model directory, any other
    from the registry (artifact downloaded once into ``cache_dir`` and checked against its sha256).

    ``active()`` is cached for ``refresh_s`` seconds, so a promotion is seen within that time without a
    database query per event. Loaded runners are kept in a small LRU.
    """

    def __init__(
        self,
        db: Database,
        store: ObjectStore,
        model_dir: Path,
        *,
        refresh_s: float = 5.0,
        keep: int = 4,
    ) -> None:
        self.db = db
        self.store = store
        self.model_dir = Path(model_dir)
        self.cache_dir = self.model_dir / "registry-cache"
        self.refresh_s = refresh_s
        self.keep = keep
        self._lock = threading.RLock()
        self._runners: OrderedDict[str, tuple[Any, dict[str, Any]]] = OrderedDict()
        self._active: tuple[float, str | None] = (-1e9, None)

    def default_version(self) -> str:
        manifest = load_manifest(self.model_dir) or {}
        return str(manifest.get("mil", {}).get("model_version", ""))

    def active(self) -> str:
        """The version new slides get: the registry's active one, else the shipped default."""
        with self._lock:
            at, version = self._active
            if time.monotonic() - at > self.refresh_s:
                version = active_version(self.db)
                self._active = (time.monotonic(), version)
            return version or self.default_version()

    def get(self, version: str) -> tuple[Any, dict[str, Any]]:
        """``(MilRunner, expected profile)`` for ``version`` ('' means the active one)."""
        from wsitk.shared.models.runtime import MilRunner

        version = version or self.active()
        with self._lock:
            if version in self._runners:
                self._runners.move_to_end(version)
                return self._runners[version]
            manifest = load_manifest(self.model_dir) or {}
            mil = manifest.get("mil", {})
            if version == mil.get("model_version"):
                rel = Path(mil.get("path", "mil-default.onnx"))
                path = rel if rel.is_absolute() else self.model_dir / rel
                if not path.is_file():
                    raise PermanentError(
                        "model-missing",
                        f"MIL model {path} not found: run `wsi model init-defaults` or set WSI_MODEL_DIR",
                    )
                runner = MilRunner(path)
                backbone = manifest.get("backbone", {})
                expected: dict[str, Any] = {"backbone_id": runner.backbone_id}
                if "target_mpp" in backbone:
                    expected["target_mpp"] = float(backbone["target_mpp"])
                expected.update(dict(runner.metadata.get("profile") or {}))
            else:
                row = get_version(self.db, version)
                if row is None:
                    raise PermanentError(
                        "model-unknown",
                        f"model version {version!r} is neither registered nor the shipped default; register "
                        "it (`wsi model register`) or re-score the slide with a known version",
                    )
                path = self.cache_dir / f"{version}.onnx"
                if not path.is_file() or sha256_file(path) != row.artifact_sha256:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    partial = path.with_name(path.name + ".partial")
                    self.store.download(row.artifact_bucket, row.artifact_key, partial)
                    if sha256_file(partial) != row.artifact_sha256:
                        partial.unlink(missing_ok=True)
                        raise PermanentError(
                            "model-artifact-corrupt",
                            f"artifact of model {version} in s3://{row.artifact_bucket}/{row.artifact_key} "
                            "does not match the sha256 in the registry",
                        )
                    partial.replace(path)
                runner = MilRunner(path)
                expected = dict(row.profile)
            self._runners[version] = (runner, expected)
            while len(self._runners) > self.keep:
                self._runners.popitem(last=False)
            return runner, expected
