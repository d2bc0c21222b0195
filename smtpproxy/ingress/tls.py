"""TLS for SMTP: the server context (TLS 1.2 or newer) from the configured certificate,
or from a self-signed one generated once under <data_dir>/tls when none is configured."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
import ssl
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


def _context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we do not ask clients for certificates
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"smtp.tls_cert: cannot load {cert} / {key}: {exc}") from None
    return ctx


class ServerTls:
    """The TLS context listeners use, whose certificate can be replaced while running.

    Listeners and STARTTLS always get `context`; its SNI callback (which OpenSSL calls
    for every handshake, with or without SNI) hands each new handshake the current
    context, so reload() swaps the certificate for new sessions and leaves sessions in
    progress alone.
    """

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._cert, self._key = certificate_paths(cfg)
        self.current = _context(self._cert, self._key)
        self.context = _context(self._cert, self._key)
        self.context.sni_callback = self._select

    def _select(self, sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.context = self.current

    def reload(self) -> None:
        """Load the certificate files again (blocking; raises ConfigError if unusable,
        keeping the current certificate)."""
        self.current = _context(self._cert, self._key)
        logger.info("TLS certificate reloaded from {}", self._cert)


def server_context(cfg: Config) -> ssl.SSLContext:
    cert, key = certificate_paths(cfg)
    return _context(cert, key)
