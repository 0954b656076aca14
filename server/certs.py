"""Certificates and keys for a TLS, node-authenticated Flower deployment.

A throwaway local CA signs the SuperLink's server certificate, so SuperNodes and the ``flwr``
CLI can verify the SuperLink with ``--root-certificates ca.crt`` instead of trusting any
certificate. The server certificate names every host the SuperLink is reached by in its
subjectAltName (TLS clients check SANs, not the common name). SuperNode identities are
ECDSA SECP384R1 keys in OpenSSH format, the format ``flwr supernode register`` and
``flower-supernode --auth-supernode-private-key`` read.

Files are reused when still valid, so re-running a deployment keeps node identities stable
(a SuperLink with a persistent database keeps recognising the registered keys).

For a multi-host setup run ``python -m server.certs DIR --hosts <name> <ip> --nodes N`` on the
SuperLink host and copy ``ca.crt`` plus each ``nodeI`` key to the SuperNode hosts.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
VALID_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=1)   # regenerate instead of failing mid-run


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    private: Path
    public: Path

    def public_line(self) -> str:
        return self.public.read_text().strip()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_private(path: Path, data: bytes) -> None:
    """Private keys are created owner-only from the start (no world-readable window)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(common_name: str = "fedmeta-local-ca", days: int = VALID_DAYS):
    """A self-signed CA: (private key, certificate)."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(_name(common_name))
            .issuer_name(_name(common_name)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_server_cert(ca_key, ca_cert: x509.Certificate, hosts: Sequence[str] = DEFAULT_HOSTS,
                     days: int = VALID_DAYS):
    """A server certificate for ``hosts`` (DNS names or IPs), signed by the CA."""
    if not hosts:
        raise ValueError("hosts: the server certificate needs at least one host name or IP")
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([_san_entry(h) for h in hosts]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def make_node_key() -> tuple[bytes, bytes]:
    """A SuperNode identity: (OpenSSH private key, one-line OpenSSH public key)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def san_hosts(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return ({str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
            | set(san.get_values_for_type(x509.DNSName)))


def _fresh(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc - RENEW_BEFORE > _now()


def _load_reusable(files: TlsFiles, hosts: Sequence[str]):
    """The existing CA (key, cert) and whether the server cert still fits, or None."""
    ca_key_path = files.ca_cert.with_suffix(".key")
    if not (files.ca_cert.exists() and ca_key_path.exists()):
        return None
    try:
        ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        log.warning("unreadable CA in %s (%s): generating a new one", files.ca_cert.parent, err)
        return None
    if not _fresh(ca_cert):
        return None
    server_ok = False
    if files.server_cert.exists() and files.server_key.exists():
        try:
            cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
            cert.verify_directly_issued_by(ca_cert)
            key = serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)
            server_ok = (_fresh(cert) and set(hosts) <= san_hosts(cert)
                         and _same_key(key.public_key(), cert.public_key()))
        except (ValueError, TypeError, InvalidSignature) as err:
            log.warning("server certificate %s not reusable: %s", files.server_cert, err)
    return ca_key, ca_cert, server_ok


def _same_key(a, b) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def ensure_tls(directory: str | Path, hosts: Sequence[str] = DEFAULT_HOSTS) -> TlsFiles:
    """CA + server certificate in ``directory``, reusing valid ones that cover ``hosts``."""
    d = Path(directory)
    files = TlsFiles(d / "ca.crt", d / "server.pem", d / "server.key")
    reuse = _load_reusable(files, hosts)
    if reuse is None:
        ca_key, ca_cert = make_ca()
        _write_private(files.ca_cert.with_suffix(".key"), _pem_key(ca_key))
        files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        server_ok = False
        log.info("new local CA in %s", d)
    else:
        ca_key, ca_cert, server_ok = reuse
    if not server_ok:
        key, cert = make_server_cert(ca_key, ca_cert, list(hosts))
        _write_private(files.server_key, _pem_key(key))
        files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        log.info("new server certificate for %s in %s", ", ".join(hosts), d)
    return files


def ensure_node_keys(directory: str | Path, n: int) -> list[NodeKey]:
    """``node0 .. node{n-1}`` key pairs, keeping existing readable ones."""
    d = Path(directory)
    keys = []
    for i in range(n):
        key = NodeKey(d / f"node{i}", d / f"node{i}.pub")
        if not _node_key_ok(key):
            private, public = make_node_key()
            _write_private(key.private, private)
            key.public.write_bytes(public)
        keys.append(key)
    return keys


def _node_key_ok(key: NodeKey) -> bool:
    if not (key.private.exists() and key.public.exists()):
        return False
    try:
        priv = serialization.load_ssh_private_key(key.private.read_bytes(), password=None)
        pub = serialization.load_ssh_public_key(key.public.read_bytes())
    except (ValueError, TypeError):
        return False
    fmt = (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return priv.public_key().public_bytes(*fmt) == pub.public_bytes(*fmt)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.certs",
                                     description="Create or reuse a local CA, a SuperLink server "
                                                 "certificate and SuperNode keys.")
    parser.add_argument("directory")
    parser.add_argument("--hosts", nargs="+", default=list(DEFAULT_HOSTS),
                        help="names/IPs the SuperLink is reached by (go into the SAN)")
    parser.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to create")
    args = parser.parse_args(argv)
    if args.nodes < 0:
        parser.error("--nodes must be >= 0")
    files = ensure_tls(args.directory, args.hosts)
    keys = ensure_node_keys(args.directory, args.nodes)
    print(f"CA: {files.ca_cert}\nserver: {files.server_cert} ({', '.join(args.hosts)})")
    for k in keys:
        print(f"node key: {k.private} (public: {k.public})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
