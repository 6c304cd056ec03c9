"""Configuration: one typed object, read from the environment (prefix ``WSI_``) and an env file.

The env file defaults to ``$WSI_HOME/stack.env`` (written by ``wsi stack up``), so that services,
the CLI and tests started beside a local stack find its endpoints without extra flags. Anything set
in the environment wins over the file. Secrets are ``SecretStr`` and are masked when printed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Variables that point the tools at a stack without a local state directory (a real deployment).
ENDPOINT_VARIABLES = (
    "WSI_ENV_FILE",
    "WSI_KAFKA_BOOTSTRAP",
    "WSI_DATABASE_URL",
    "WSI_DATABASE_URL_FILE",
    "WSI_S3_ENDPOINT",
)


class StateNotFound(RuntimeError):
    """No local state directory: neither ``WSI_HOME`` nor a ``.wsi`` folder here, above, or in ``~``."""


def find_wsi_home() -> Path | None:
    """The local state directory if there is one: ``WSI_HOME`` when set; otherwise the nearest ``.wsi``
    folder in the working directory or one of its parents (found the way git finds its repository, so
    the README's commands work from a checkout after ``make demo``); otherwise ``~/.wsi`` if it exists.
    """
    configured = os.environ.get("WSI_HOME")
    if configured:
        return Path(configured).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / ".wsi").is_dir():
            return folder / ".wsi"
    user_home = (Path.home() / ".wsi").resolve()
    return user_home if user_home.is_dir() else None


def wsi_home() -> Path:
    """The local state directory: stack data, service logs, cached slides and default models.

    ``find_wsi_home()``, or ``~/.wsi`` where nothing is found yet (``wsi stack up`` creates it there).
    """
    return find_wsi_home() or (Path.home() / ".wsi").resolve()


def require_wsi_home() -> Path:
    """The local state directory, or ``StateNotFound`` saying what to do, for the commands that talk to
    a stack; endpoints given in the environment (a real deployment) need no local state."""
    found = find_wsi_home()
    if found is not None or any(os.environ.get(name) for name in ENDPOINT_VARIABLES):
        return found or wsi_home()
    raise StateNotFound(
        f"no local stack found: WSI_HOME is unset and there is no .wsi folder in {Path.cwd()} or its "
        "parents, nor in your home folder; run wsi from the checkout where `make demo` (or `wsi stack up`) "
        "ran, or set WSI_HOME to that .wsi folder (or the WSI_* endpoints to a running stack)"
    )


def default_env_file() -> Path:
    return Path(os.environ.get("WSI_ENV_FILE", wsi_home() / "stack.env"))


def _read_secret_file(value: SecretStr | None, file_var: str) -> SecretStr | None:
    """``WSI_X_FILE=/run/secrets/x`` supplies a secret from a file (Kubernetes/Docker secrets)."""
    path = os.environ.get(file_var)
    if path:
        return SecretStr(Path(path).read_text().strip())
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WSI_", extra="ignore", case_sensitive=False)

    # Kafka (any Kafka-API broker: Apache Kafka, Redpanda, the local Tansu broker)
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: str = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL
    kafka_sasl_mechanism: str = "PLAIN"  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str = ""
    kafka_session_timeout_ms: int = 30000
    kafka_heartbeat_interval_ms: int = 3000
    kafka_max_poll_interval_ms: int = 300000
    kafka_request_timeout_ms: int = 40000

    # Object store (S3 API: MinIO, AWS S3, the local moto server)
    s3_endpoint: str = "127.0.0.1:9000"
    s3_secure: bool = False
    s3_access_key: str = "wsi"
    s3_secret_key: SecretStr = SecretStr("wsi-secret")
    s3_region: str = "us-east-1"
    s3_ca_file: str = ""
    uploads_bucket: str = "wsi-uploads"
    artifacts_bucket: str = "wsi-artifacts"

    # PostgreSQL: the services' role (rows only) and the owner role used by `wsi db migrate`
    database_url: SecretStr = SecretStr("postgresql://wsi_app:wsi_app@127.0.0.1:5432/wsi")
    database_admin_url: SecretStr | None = None
    database_sslmode: str = ""  # e.g. verify-full; appended to the URL when set
    database_sslrootcert: str = ""  # CA file that verifies the server (libpq's sslrootcert), when set

    # Service runtime
    metrics_port: int = 0  # 0 = pick a free port (the chosen port is logged)
    metrics_host: str = "127.0.0.1"
    max_attempts: int = 3  # deterministic failures before a message is dead-lettered
    batch_size: int = 16
    infra_backoff_max_s: float = 30.0
    log_level: str = "INFO"
    lag_interval_s: float = 10.0  # how often each member exports the lag of the partitions it owns
    probe_interval_s: float = 5.0  # how often each service checks PostgreSQL for /readyz
    replica: str = ""  # this process's instance name when a stage runs several (`wsi services up --replicas`)
    slide_deadline_s: int = 3600
    reconcile_interval_s: int = 300
    poll_interval_s: float = 2.0  # the ingest bucket poller
    poller_enabled: bool = True
    # Multi-file slides (DICOM series, MIRAX; docs/interoperability.md): a group whose files are complete by
    # what they declare is ingested once no new file arrived for the settle time (or at once when a
    # manifest.json lists its files); one still incomplete after the timeout is rejected with the reason.
    multifile_settle_s: float = 30.0
    multifile_timeout_s: float = 3600.0
    multifile_check_interval_s: float = 5.0
    dicom_uid_key: SecretStr = SecretStr("")  # set: DICOM UIDs are pseudonymised with this key (HMAC)
    # Results for hospital systems (docs/interoperability.md): DICOM SR + parametric map, FHIR R4
    interop_results: bool = True
    fhir_identifier_system: str = "urn:wsitk:slide"  # the system of the slide id in FHIR identifiers
    fhir_subject_reference: str = ""  # e.g. "Patient/123" fixed by the integration; empty: no subject

    # Local paths
    cache_dir: Path = Field(default_factory=lambda: wsi_home() / "cache")
    cache_max_bytes: int = 20 * 1024**3
    model_dir: Path = Field(default_factory=lambda: wsi_home() / "models")

    # Pipeline profile defaults (pinned per slide at ingest)
    target_mpp: float = 0.5
    tile_size: int = 224
    tiles_per_shard: int = 256
    min_tissue_fraction: float = 0.25
    # Tile QC limits (services/quality_filter/measures.py); 0 = that service's documented default
    qc_min_tissue_fraction: float = 0.0  # default 0.15: tissue-edge tiles with a fair share are kept
    qc_min_sharpness: float = 0.0  # default 0.18
    qc_keep_fat: bool = False  # adipose tiles are rejected as "fat" unless this is set
    mpp_override: float = 0.0  # used only for slides without MPP; 0 = reject such slides
    stain_method: str = (
        ""  # "", "macenko" or "reinhard": fitted per slide by the tiler, applied by the embedder
    )
    qc_max_pen_fraction: float = 0.0  # 0 = quality-filter's documented default (services/quality_filter)
    qc_max_dark_fraction: float = 0.0
    qc_max_bright_fraction: float = 0.0
    max_slide_pixels: int = 200_000 * 200_000  # larger claimed dimensions are rejected as absurd
    model_refresh_s: float = 5.0  # how often ingest and the scorer look up the registry's active model
    max_tiles_per_slide: int = 20000  # the scorer's cap (deterministic sub-sampling beyond it)
    isolation_memory_bytes: int = 6 * 1024**3  # address-space limit of the slide-decoding subprocess

    # Embedder (docs/embedder.md)
    embed_batch_size: int = (
        64  # tiles per model call; batches fill across shards and slides (256-512 on a GPU)
    )
    embed_messages_per_batch: int = 32  # QC results consumed and embedded together
    embed_decode_workers: int = 0  # decoding/preprocessing threads; 0 = cores - 1
    embed_prefetch_batches: int = 3  # model batches prepared ahead of the running one (the bounded queue)
    # Shards fetched from the object store ahead of the one being packed into batches (each holds its
    # compressed tiles, ~4 MB at 256 tiles): enough to hide S3 latency on CPU; raise it for a GPU.
    embed_fetch_ahead_shards: int = 3
    embed_backend: str = "auto"  # "onnxruntime", "torch" (CUDA torch beside a CPU-only onnxruntime) or "auto"

    # Viewer (docs/viewer.md): read-only web service; its own database role (SELECT only)
    viewer_host: str = "127.0.0.1"
    viewer_port: int = 8090  # 0 = pick a free port (the chosen port is logged)
    viewer_database_url: SecretStr | None = None  # the read-only role; unset = database_url
    viewer_tokens: SecretStr | None = None  # comma-separated bearer tokens; unset = no token check
    viewer_identity_header: str = ""  # e.g. X-Auth-Request-Email, set by an OIDC proxy in front
    viewer_allow_anonymous: bool = False  # serve without any authentication on a non-loopback address
    viewer_tile_cache_tiles: int = 4096  # rendered deep-zoom tiles kept in memory (LRU)
    viewer_open_slides: int = 8  # slide files kept open (LRU)
    viewer_cache_max_bytes: int = 10 * 1024**3  # local copies of slide files (evicting)

    @field_validator("target_mpp", "tile_size", "tiles_per_shard")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        if value <= 0:
            raise ValueError("must be positive")
        return value

    def kafka_password(self) -> str:
        secret = _read_secret_file(self.kafka_sasl_password, "WSI_KAFKA_SASL_PASSWORD_FILE")
        return secret.get_secret_value() if secret else ""

    def dicom_uid_secret(self) -> str:
        """The key that pseudonymises DICOM UIDs (``WSI_DICOM_UID_KEY`` or ``_FILE``); empty: UIDs kept."""
        secret = _read_secret_file(self.dicom_uid_key, "WSI_DICOM_UID_KEY_FILE")
        return secret.get_secret_value() if secret else ""

    def s3_secret(self) -> str:
        secret = _read_secret_file(self.s3_secret_key, "WSI_S3_SECRET_KEY_FILE")
        return secret.get_secret_value() if secret else ""

    def dsn(self, *, admin: bool = False) -> str:
        if admin and self.has_admin_url():
            secret: SecretStr | None = _read_secret_file(
                self.database_admin_url, "WSI_DATABASE_ADMIN_URL_FILE"
            )
        else:
            secret = _read_secret_file(self.database_url, "WSI_DATABASE_URL_FILE")
        assert secret is not None
        return self._with_tls_options(secret.get_secret_value())

    def _with_tls_options(self, url: str) -> str:
        for name, value in (("sslmode", self.database_sslmode), ("sslrootcert", self.database_sslrootcert)):
            if value and f"{name}=" not in url:
                url += ("&" if "?" in url else "?") + f"{name}={quote(value, safe='/')}"
        return url

    def viewer_dsn(self) -> str:
        """The viewer's read-only role when configured, else the services' role."""
        secret = _read_secret_file(self.viewer_database_url, "WSI_VIEWER_DATABASE_URL_FILE")
        if secret is None:
            return self.dsn()
        return self._with_tls_options(secret.get_secret_value())

    def viewer_token_list(self) -> list[str]:
        """The viewer's bearer tokens; a tokens file that is not there (an optional Secret) means none."""
        path = os.environ.get("WSI_VIEWER_TOKENS_FILE")
        if path and not Path(path).is_file():
            return []
        secret = _read_secret_file(self.viewer_tokens, "WSI_VIEWER_TOKENS_FILE")
        raw = secret.get_secret_value() if secret else ""
        return [token.strip() for token in raw.split(",") if token.strip()]

    def has_admin_url(self) -> bool:
        return self.database_admin_url is not None or bool(os.environ.get("WSI_DATABASE_ADMIN_URL_FILE"))

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with every secret masked: for the first log line of a service."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                shown = name in {"database_url", "viewer_database_url"}
                out[name] = _mask_url(value.get_secret_value()) if shown else "***"
            elif isinstance(value, Path):
                out[name] = str(value)
            else:
                out[name] = value
        return out


def _mask_url(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, then the env file, then defaults."""
    env_file = default_env_file()
    kwargs: dict[str, Any] = {}
    if env_file.is_file():
        kwargs["_env_file"] = str(env_file)
    return Settings(**kwargs, **overrides)
