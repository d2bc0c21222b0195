"""TLS for SMTP: the server context (TLS 1.2 or newer) from the configured certificate,
or from a self-signed one generated once under <data_dir>/tls when none is configured;
and, for device listeners only, a context that goes down to smtp.device_tls_min."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
import ssl
import warnings
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from loguru import logger

from smtpproxy.config import Config
from smtpproxy.errors import ConfigError


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write a file whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold <directory>/.lock: several processes on one data_dir (smtp.reuse_port)
    starting together must not each make a pair and load one's certificate with the
    other's key."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def generate_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """A P-256 key and a two-year certificate for hostname, localhost and loopback."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=730))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "selfsigned.crt", directory / "selfsigned.key"
    _write(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def certificate_paths(cfg: Config) -> tuple[Path, Path]:
    """The configured pair, or the self-signed pair (made on first use)."""
    if cfg.smtp.tls_cert:
        return Path(cfg.smtp.tls_cert), Path(cfg.smtp.tls_key)
    directory = Path(cfg.data_dir) / "tls"
    cert, key = directory / "selfsigned.crt", directory / "selfsigned.key"
    with _exclusive(directory):
        if not (cert.is_file() and key.is_file()):
            cert, key = generate_self_signed(directory, cfg.smtp.effective_hostname())
    logger.warning(
        "no smtp.tls_cert configured: STARTTLS uses a self-signed certificate ({}); "
        "clients that verify certificates will refuse it",
        cert,
    )
    return cert, key


# TLS 1.0 and 1.1 sign the handshake with SHA-1, which OpenSSL 3 allows only at security
# level 0. The ciphers stay AES and ChaCha20, modern ones first (the server's order
# wins): what old printers speak (AES128-SHA) is in, RC4, 3DES and export ciphers are not.
LEGACY_CIPHERS = (
    "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:ECDHE+AES:DHE+AES:RSA+AESGCM:RSA+AES"
    ":!aNULL:!eNULL:!MD5:!DSS:@SECLEVEL=0"
)


TLS_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
}


def _context(cert: Path, key: Path, tls_min: str = "1.2") -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    minimum = TLS_VERSIONS[tls_min]
    if minimum < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers(LEGACY_CIPHERS)
    with warnings.catch_warnings():  # TLS 1.0 and 1.1 are deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = minimum
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we do not ask clients for certificates
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"smtp.tls_cert: cannot load {cert} / {key}: {exc}") from None
    return ctx


class ServerTls:
    """The TLS contexts listeners use, whose certificate can be replaced while running.

    Listeners and STARTTLS always get `context` (`device_context` on device listeners);
    its SNI callback (which OpenSSL calls for every handshake, with or without SNI)
    hands each new handshake the current context of the same kind, so reload() swaps
    the certificate for new sessions and leaves sessions in progress alone. The kinds
    never mix: a context carries its TLS versions and security level with it.
    """

    def __init__(self, cfg: Config) -> None:
        self._cert, self._key = certificate_paths(cfg)
        # what listeners hold (made once, never replaced) -> its TLS floor
        self._floor: dict[ssl.SSLContext, str] = {}
        self.context = self._listening("1.2")
        self.device_context: ssl.SSLContext | None = None
        if cfg.smtp.device_listen:
            self.device_context = self._listening(cfg.smtp.device_tls_min)
        self._current: dict[str, ssl.SSLContext] = {}
        self._load()

    def _listening(self, floor: str) -> ssl.SSLContext:
        ctx = _context(self._cert, self._key, floor)
        ctx.sni_callback = self._select
        self._floor[ctx] = floor
        return ctx

    def _load(self) -> None:
        floors = set(self._floor.values())
        self._current = {floor: _context(self._cert, self._key, floor) for floor in floors}

    def _select(self, sslobj: ssl.SSLObject, _name: str | None, ctx: ssl.SSLContext) -> None:
        sslobj.context = self._current[self._floor[ctx]]

    def reload(self) -> None:
        """Load the certificate files again (blocking; raises ConfigError if unusable,
        keeping the current certificate)."""
        self._load()
        logger.info("TLS certificate reloaded from {}", self._cert)


def server_context(cfg: Config) -> ssl.SSLContext:
    cert, key = certificate_paths(cfg)
    return _context(cert, key)
