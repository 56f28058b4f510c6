"""Optional TLS for the TLT gRPC services (off by default).

* :class:`ServerTLS` — what ``tlt serve --tls-cert PATH --tls-key PATH [--tls-client-ca PATH]`` serves with:
  the server certificate chain and key, and with a client CA, mutual TLS (clients must present a certificate
  that CA signed).
* :class:`ClientTLS` — what a client dials with: the CA that signed the servers' certificates, optionally a
  client certificate and key (for servers that require one), and optionally the name to check the servers'
  certificates against instead of the dialed host (pods are dialed by IP or by per-job Service names, so in
  Kubernetes one name in the certificate, e.g. ``tlt-grpc``, stands for all of them).

Every file is read and checked when the settings are built — before a model is loaded or a port is bound —
and each problem (missing, unreadable, not PEM, an encrypted key, a key that does not belong to its
certificate) is a :class:`~tlt.errors.ConfigError` naming the flag (or environment variable) and the fix.

A server reloads its certificate, key and client CA when the files change (cert-manager renews the mounted
Secret in place): each new connection checks the files' modification times, and a changed set that passes
the same checks is served from then on; one that does not (e.g. a half-written rotation) is logged and the
last good set stays. Connections already open keep the certificate they were made with.

Clients built with :class:`~tlt.rpc.client.RemoteClient` do the same on their side: before each call they check
the modification times of their CA, certificate and key files, and when those changed and pass the checks
they dial new connections with them (calls in flight finish on the old ones).
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tlt.errors import ConfigError

# Client defaults (flags win): `tlt run` against running services, and the operator's SetRole calls.
ENV_CA = "TLT_TLS_CA"
ENV_CERT = "TLT_TLS_CERT"
ENV_KEY = "TLT_TLS_KEY"
ENV_SERVER_NAME = "TLT_TLS_SERVER_NAME"

# The client settings: field -> flag, and field -> environment variable.
CLIENT_FLAGS = {"ca": "--tls-ca", "cert": "--tls-cert", "key": "--tls-key", "server_name": "--tls-server-name"}
CLIENT_ENV = {"ca": ENV_CA, "cert": ENV_CERT, "key": ENV_KEY, "server_name": ENV_SERVER_NAME}

_CERT_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----")
_KEY_BLOCK = re.compile(rb"-----BEGIN (?:RSA |EC |ENCRYPTED )?PRIVATE KEY-----")
_SERVER_NAME = re.compile(r"[A-Za-z0-9*]([-A-Za-z0-9.*]{0,251}[A-Za-z0-9])?")

log = logging.getLogger(__name__)


def read_pem(path: str | os.PathLike[str], source: str, what: str) -> bytes:
    """The bytes of the PEM file ``path`` given by ``source`` (a flag or variable name); ``what`` is
    ``"certificate"`` or ``"private key"``. Raises ConfigError saying what is wrong and how to fix it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{source} {path}: no such file; give the path of a PEM {what}") from None
    except IsADirectoryError:
        raise ConfigError(f"{source} {path}: is a directory; give the path of a PEM {what} file") from None
    except OSError as exc:
        raise ConfigError(f"{source} {path}: cannot read it ({exc.strerror or exc}); check the path and that "
                          f"this user may read it") from None
    if what == "private key":
        if b"ENCRYPTED" in data:
            raise ConfigError(f"{source} {path}: the private key is encrypted; gRPC needs an unencrypted PEM key "
                              f"(e.g. `openssl pkey -in {path.name} -out key.pem`)")
        if not _KEY_BLOCK.search(data):
            raise ConfigError(f"{source} {path}: not a PEM private key (no '-----BEGIN ... PRIVATE KEY-----' block)")
    elif not _CERT_BLOCK.search(data):
        raise ConfigError(f"{source} {path}: not a PEM certificate (no '-----BEGIN CERTIFICATE-----' block)")
    return data


def _check_ca(data: bytes, path: str | os.PathLike[str], source: str) -> None:
    try:
        ssl.create_default_context(cadata=data.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{source} {path}: not a usable CA certificate ({_reason(exc)})") from None


def _check_pair(cert: str | os.PathLike[str], key: str | os.PathLike[str], cert_source: str,
                key_source: str) -> None:
    """The certificate and key load together (same key pair)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(f"{key_source} {key} does not belong to the certificate {cert_source} {cert}: give "
                              f"the key the certificate was issued for") from None
        raise ConfigError(f"{cert_source} {cert} with {key_source} {key}: not a usable certificate and key "
                          f"({_reason(exc)})") from None
    except OSError as exc:  # the file went away since it was read
        raise ConfigError(f"{cert_source} {cert} / {key_source} {key}: cannot read ({exc})") from None


def _reason(exc: Exception) -> str:
    return getattr(exc, "reason", None) or str(exc)


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate chain and key (PEM); with ``client_ca`` clients must present a certificate
    that CA signed (mutual TLS). ``files`` (cert, key, client CA paths), set by :meth:`from_files`, makes the
    server reload them when they change."""

    cert_chain: bytes
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = None
    files: tuple[str, str, str | None] | None = field(default=None, compare=False)

    @classmethod
    def from_files(cls, cert: str | os.PathLike[str] | None, key: str | os.PathLike[str] | None,
                   client_ca: str | os.PathLike[str] | None = None) -> ServerTLS | None:
        """Settings from ``--tls-cert``, ``--tls-key`` and ``--tls-client-ca`` (None: plaintext)."""
        if not cert and not key:
            if client_ca:
                raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key: the server's own certificate "
                                  "and key (client certificates are only checked over TLS)")
            return None
        if not cert or not key:
            given, missing = ("--tls-cert", "--tls-key") if cert else ("--tls-key", "--tls-cert")
            raise ConfigError(f"{given} needs {missing}: give both the server certificate and its private key")
        chain = read_pem(cert, "--tls-cert", "certificate")
        private_key = read_pem(key, "--tls-key", "private key")
        _check_pair(cert, key, "--tls-cert", "--tls-key")
        ca = None
        if client_ca:
            ca = read_pem(client_ca, "--tls-client-ca", "certificate")
            _check_ca(ca, client_ca, "--tls-client-ca")
        return cls(chain, private_key, ca, (str(cert), str(key), str(client_ca) if client_ca else None))

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate."""
        return self.client_ca is not None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """The certificate, key and client CA as one gRPC certificate configuration."""
        return grpc.ssl_server_certificate_configuration([(self.private_key, self.cert_chain)],
                                                         root_certificates=self.client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials (client certificates required and verified when ``client_ca`` is set); from
        files, they follow changes to the files (see the module docstring)."""
        if self.files is None:
            return grpc.ssl_server_credentials([(self.private_key, self.cert_chain)],
                                               root_certificates=self.client_ca, require_client_auth=self.mutual)
        return grpc.dynamic_ssl_server_credentials(self.configuration(), CertificateReloader(self),
                                                   require_client_authentication=self.mutual)


class FileChanges:
    """Tells whether any of ``paths`` (None entries are skipped) changed since the last look, by modification
    time and size; a missing file counts as a state of its own. Thread-safe."""

    def __init__(self, paths: tuple[str | None, ...]) -> None:
        self.paths = paths
        self._seen = self._signature()
        self._lock = threading.Lock()

    def _signature(self) -> tuple[tuple[int, int] | None, ...]:
        out = []
        for path in self.paths:
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            out.append((st.st_mtime_ns, st.st_size) if st else None)
        return tuple(out)

    def changed(self) -> bool:
        """True once for each change (the change is then the new state compared against)."""
        signature = self._signature()
        with self._lock:
            if signature == self._seen:
                return False
            self._seen = signature
            return True


class CertificateReloader:
    """gRPC's certificate-configuration fetcher for a :class:`ServerTLS` read from files: called on each new
    connection, it answers a new configuration when the files changed and passed the checks, else None (keep
    serving the current one)."""

    def __init__(self, tls: ServerTLS) -> None:
        if tls.files is None:
            raise ValueError("CertificateReloader needs a ServerTLS read from files")
        self.files = tls.files
        self._changes = FileChanges(self.files)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        if not self._changes.changed():
            return None
        try:
            fresh = ServerTLS.from_files(*self.files)
        except ConfigError as exc:
            log.warning("TLS files changed but cannot be used, still serving the previous certificate: %s", exc)
            return None
        if fresh is None:  # cannot happen: the cert and key paths are those the server started with
            return None
        log.info("TLS certificate reloaded from %s", self.files[0])
        return fresh.configuration()


@dataclass(frozen=True)
class ClientTLS:
    """What a client trusts (``ca``), the certificate it presents when asked (optional), and the name the
    servers' certificates are checked against (default: the dialed host)."""

    ca: bytes
    cert_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None
    # (CA, cert, key) paths when read from files (resolve_client_tls): what reread() reads again
    files: tuple[str, str | None, str | None] | None = field(default=None, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientTLS | None:
        """Settings from ``TLT_TLS_CA``/``TLT_TLS_CERT``/``TLT_TLS_KEY``/``TLT_TLS_SERVER_NAME`` (None when
        ``TLT_TLS_CA`` is unset: plaintext)."""
        return resolve_client_tls({}, os.environ if env is None else env)

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials."""
        return grpc.ssl_channel_credentials(self.ca, self.private_key, self.cert_chain)

    def channel_options(self) -> list[tuple[str, str]]:
        """Channel options: the certificate name override when ``server_name`` is set."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def reread(self) -> ClientTLS:
        """The same settings read again from their files (renewed in place); ConfigError when they no longer
        pass the checks. Settings not read from files are returned as they are."""
        if self.files is None:
            return self
        ca, cert, key = self.files
        fresh = resolve_client_tls({"ca": ca, "cert": cert, "key": key, "server_name": self.server_name})
        assert fresh is not None  # a CA path is given
        return fresh


def resolve_client_tls(flags: Mapping[str, str | os.PathLike[str] | None],
                       env: Mapping[str, str] | None = None) -> ClientTLS | None:
    """Client settings from ``flags`` (keys ``ca``, ``cert``, ``key``, ``server_name``), each falling back to
    its ``TLT_TLS_*`` variable in ``env`` when ``env`` is given. None (plaintext) without a CA."""
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    for name, flag in CLIENT_FLAGS.items():
        given, variable = flags.get(name), CLIENT_ENV[name]
        if given:
            values[name], sources[name] = str(given), flag
        elif env is not None and env.get(variable, "").strip():
            values[name], sources[name] = env[variable].strip(), variable
    def wanted(name: str) -> str:
        return CLIENT_FLAGS[name] + ("" if env is None else f" (or {CLIENT_ENV[name]})")

    if "ca" not in values:
        if values:
            named = " and ".join(sources[n] for n in values)
            raise ConfigError(f"{named} need{'s' if len(values) == 1 else ''} {wanted('ca')}: the CA certificate "
                              f"that signed the services' certificates, which turns TLS on")
        return None
    if ("cert" in values) != ("key" in values):
        given, missing = ("cert", "key") if "cert" in values else ("key", "cert")
        raise ConfigError(f"{sources[given]} needs {wanted(missing)}: a client certificate goes with its private key")
    ca = read_pem(values["ca"], sources["ca"], "certificate")
    _check_ca(ca, values["ca"], sources["ca"])
    chain = key = None
    if "cert" in values:
        chain = read_pem(values["cert"], sources["cert"], "certificate")
        key = read_pem(values["key"], sources["key"], "private key")
        _check_pair(values["cert"], values["key"], sources["cert"], sources["key"])
    server_name = values.get("server_name")
    if server_name is not None and not _SERVER_NAME.fullmatch(server_name):
        raise ConfigError(f"{sources['server_name']} {server_name!r}: not a host name; give the DNS name the "
                          f"servers' certificates carry, e.g. tlt-grpc")
    return ClientTLS(ca, chain, key, server_name, (values["ca"], values.get("cert"), values.get("key")))
