"""A throwaway PKI for the TLS tests (the ``cryptography`` package): a CA, a server certificate that also
serves as client certificate (like a cert-manager ``kubernetes.io/tls`` Secret), a client certificate, a
second CA with an intruder certificate, and broken files for the flag checks."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME = "tlt-grpc"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, dns: tuple[str, ...] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:  # one certificate serves and identifies a pod: both usages
        builder = builder.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        if dns:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]),
                                            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> Path:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _issue(directory: Path, prefix: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
           dns: tuple[str, ...] = ()) -> tuple[Path, Path]:
    key = _key()
    cert = _certificate(prefix, key, ca_cert.subject, ca_key, ca=False, dns=dns)
    return _write_cert(directory / f"{prefix}.crt", cert), _write_key(directory / f"{prefix}.key", key)


def make_pki(directory: Path) -> dict[str, Path]:
    """Files under ``directory``: ``ca`` (trusted), server ``cert``/``key`` for localhost and ``SERVER_NAME``, a
    ``client_cert``/``client_key`` from the same CA, an ``other_ca`` and its ``intruder_cert``/``intruder_key`` and
    ``renewed_cert``/``renewed_key`` (for localhost and ``SERVER_NAME``),
    an ``encrypted_key``, a ``not_pem`` file and a ``bad_ca`` (a PEM block that is no certificate)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, other_key = _key(), _key()
    ca = _certificate("TLT test CA", ca_key, _name("TLT test CA"), ca_key, ca=True)
    other = _certificate("Other CA", other_key, _name("Other CA"), other_key, ca=True)
    files = {"ca": _write_cert(directory / "ca.crt", ca), "other_ca": _write_cert(directory / "other-ca.crt", other)}
    files["cert"], files["key"] = _issue(directory, "server", ca, ca_key, dns=("localhost", SERVER_NAME))
    files["client_cert"], files["client_key"] = _issue(directory, "client", ca, ca_key)
    files["intruder_cert"], files["intruder_key"] = _issue(directory, "intruder", other, other_key)
    # a renewed server certificate from the other CA (to see which one a server serves after a rotation)
    files["renewed_cert"], files["renewed_key"] = _issue(directory, "renewed", other, other_key,
                                                         dns=("localhost", SERVER_NAME))
    files["encrypted_key"] = _write_key(directory / "encrypted.key", _key(), password=b"secret")
    files["not_pem"] = directory / "not-pem.txt"
    files["not_pem"].write_text("hello\n")
    files["bad_ca"] = directory / "bad-ca.crt"
    files["bad_ca"].write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    return files


def write_tls_secret(directory: Path, pki: dict[str, Path]) -> Path:
    """``directory`` laid out like a mounted ``kubernetes.io/tls`` Secret (tls.crt, tls.key, ca.crt)."""
    directory.mkdir(parents=True, exist_ok=True)
    for key, name in (("cert", "tls.crt"), ("key", "tls.key"), ("ca", "ca.crt")):
        (directory / name).write_bytes(pki[key].read_bytes())
    return directory
