"""What a service's handler works with: settings, the object store, the database, the slide cache.

Built once per process by the service's entry point and handed to its handler, so handlers can be
unit-tested with a context pointing at a test stack (or the filesystem object store).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsitk.shared.cache import SlideCache
from wsitk.shared.config import Settings
from wsitk.shared.contracts import pb, profile_id
from wsitk.shared.db.connection import Database
from wsitk.shared.objectstore import ObjectStore, open_store

if TYPE_CHECKING:
    from wsitk.shared.models.registry import ModelResolver


@dataclass
class ServiceContext:
    settings: Settings
    service: str
    _store: ObjectStore | None = field(default=None, repr=False)

    @cached_property
    def store(self) -> ObjectStore:
        return self._store if self._store is not None else open_store(self.settings)

    @cached_property
    def db(self) -> Database:
        return Database(self.settings.dsn())

    @cached_property
    def cache(self) -> SlideCache:
        # One directory per process: replicas of a stage (tiler, tiler-2) never evict each other's files.
        return SlideCache(
            self.settings.cache_dir / (self.settings.replica or self.service), self.settings.cache_max_bytes
        )

    @cached_property
    def models(self) -> ModelResolver:
        """MIL model versions: the registry's active one, any registered one, or the shipped default."""
        from wsitk.shared.models.registry import ModelResolver

        return ModelResolver(
            self.db, self.store, Path(self.settings.model_dir), refresh_s=self.settings.model_refresh_s
        )

    def model_manifest(self) -> dict[str, Any]:
        """The local model manifest (``$WSI_MODEL_DIR/models.json``), written by `wsi model init-defaults`."""
        from wsitk.shared.models.defaults import load_manifest

        return load_manifest(Path(self.settings.model_dir)) or {}

    def profile_geometry(self, manifest: dict[str, Any] | None = None) -> tuple[int, float]:
        """``(tile_size, target_mpp)`` for new slides: the registered encoder's, else the settings'.

        A backbone registered from the encoder registry (``wsi model export-backbone ENCODER --weights
        FILE``) records the tile size and magnification its model was trained at in ``models.json``;
        tiling at anything else would feed it tiles it was not trained on.
        """
        backbone = (self.model_manifest() if manifest is None else manifest).get("backbone", {})
        if backbone.get("encoder") and backbone.get("tile_size") and backbone.get("target_mpp"):
            return int(backbone["tile_size"]), float(backbone["target_mpp"])
        return self.settings.tile_size, self.settings.target_mpp

    def current_profile(self, *, slide_mpp_override: float = 0.0) -> pb.PipelineProfile:
        """The pipeline profile pinned on slides ingested now (settings + the active models).

        The MIL model version is the registry's active one (the shipped default when none is active), so
        a slide is scored by the version that was active when it arrived, whatever is promoted meanwhile.
        ``slide_mpp_override`` is the MPP a lab registered for this one slide (0 = none).
        """
        manifest = self.model_manifest()
        s = self.settings
        tile_size, target_mpp = self.profile_geometry(manifest)
        profile = pb.PipelineProfile(
            target_mpp=target_mpp,
            tile_size=tile_size,
            tiles_per_shard=s.tiles_per_shard,
            encoder_id=str(manifest.get("backbone", {}).get("backbone_id", "")),
            mil_model_version=self.models.active(),
            min_tissue_fraction=s.min_tissue_fraction,
            qc_min_tissue_fraction=s.qc_min_tissue_fraction,
            qc_min_sharpness=s.qc_min_sharpness,
            qc_keep_fat=s.qc_keep_fat,
            mpp_override=s.mpp_override,
            stain_method=s.stain_method,
            qc_max_pen_fraction=s.qc_max_pen_fraction,
            qc_max_dark_fraction=s.qc_max_dark_fraction,
            qc_max_bright_fraction=s.qc_max_bright_fraction,
            slide_mpp_override=slide_mpp_override,
        )
        profile.profile_id = profile_id(profile)
        return profile
