import contextlib
import ipaddress
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server import certs


def _load(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_ca_signs_server_cert_with_loopback_sans(tmp_path):
    files = certs.ensure_tls(tmp_path)
    ca, srv = _load(files.ca_cert), _load(files.server_cert)
    srv.verify_directly_issued_by(ca)      # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    key = serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == srv.public_key().public_numbers()
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.ca_cert.with_suffix(".key").stat().st_mode) == 0o600


def test_tls_handshake_verifies_by_ip_and_by_name(tmp_path):
    """The files work with a standard verifying TLS client, not just with our own checks."""
    files = certs.ensure_tls(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(n):
        for _ in range(n):
            conn, _ = listener.accept()
            with contextlib.suppress(ssl.SSLError, OSError):
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)

    thread = threading.Thread(target=serve, args=(3,), daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    for host in ("127.0.0.1", "localhost"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=host) as tls:
                assert tls.version() is not None
                tls.sendall(b"x")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):   # a name not in the SANs
            client_ctx.wrap_socket(raw, server_hostname="example.org")
    thread.join(5)
    listener.close()


def test_tls_files_are_reused_and_renewed_for_new_hosts(tmp_path):
    first = certs.ensure_tls(tmp_path)
    ca_bytes, srv_bytes = first.ca_cert.read_bytes(), first.server_cert.read_bytes()
    again = certs.ensure_tls(tmp_path)
    assert again.ca_cert.read_bytes() == ca_bytes
    assert again.server_cert.read_bytes() == srv_bytes
    wider = certs.ensure_tls(tmp_path, hosts=("localhost", "127.0.0.1", "10.1.2.3", "link.example"))
    assert wider.ca_cert.read_bytes() == ca_bytes          # same CA: nodes keep their ca.crt
    srv = _load(wider.server_cert)
    assert srv.public_bytes(serialization.Encoding.PEM) != srv_bytes
    assert certs.san_hosts(srv) == {"localhost", "127.0.0.1", "10.1.2.3", "link.example"}
    srv.verify_directly_issued_by(_load(wider.ca_cert))


def test_server_key_not_matching_the_cert_is_replaced(tmp_path):
    files = certs.ensure_tls(tmp_path)
    other_key, _ = certs.make_ca()
    files.server_key.write_bytes(other_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    fresh = certs.ensure_tls(tmp_path)
    key = serialization.load_pem_private_key(fresh.server_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == _load(fresh.server_cert).public_key().public_numbers()
    files.server_key.write_text("garbage")
    certs.ensure_tls(tmp_path)
    serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)


def test_server_cert_from_another_ca_is_reissued(tmp_path):
    files = certs.ensure_tls(tmp_path)
    ca_key, ca = certs.make_ca("other")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.ca_cert.with_suffix(".key").write_bytes(ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    fresh = certs.ensure_tls(tmp_path)
    assert _load(fresh.ca_cert).subject == ca.subject
    _load(fresh.server_cert).verify_directly_issued_by(ca)


def test_corrupt_ca_is_replaced(tmp_path):
    files = certs.ensure_tls(tmp_path)
    files.ca_cert.write_text("not a certificate")
    fresh = certs.ensure_tls(tmp_path)
    _load(fresh.server_cert).verify_directly_issued_by(_load(fresh.ca_cert))


def test_node_keys_are_openssh_secp384r1_and_stable(tmp_path):
    keys = certs.ensure_node_keys(tmp_path, 2)
    assert [k.private.name for k in keys] == ["node0", "node1"]
    for k in keys:
        priv = serialization.load_ssh_private_key(k.private.read_bytes(), password=None)
        pub = serialization.load_ssh_public_key(k.public.read_bytes())
        assert isinstance(priv, ec.EllipticCurvePrivateKey)
        assert isinstance(priv.curve, ec.SECP384R1)
        assert priv.public_key().public_numbers() == pub.public_numbers()
        assert k.public_line().startswith("ecdsa-sha2-nistp384 ")
        assert stat.S_IMODE(k.private.stat().st_mode) == 0o600
    assert keys[0].public_line() != keys[1].public_line()
    before = [k.public_line() for k in keys]
    keys[1].public.write_text("garbage\n")                  # unreadable pair -> regenerated
    again = certs.ensure_node_keys(tmp_path, 3)
    assert again[0].public_line() == before[0]
    assert again[1].public_line() not in (before[1], "garbage")
    assert len({k.public_line() for k in again}) == 3


def test_server_cert_needs_a_host():
    ca_key, ca = certs.make_ca()
    with pytest.raises(ValueError, match="hosts"):
        certs.make_server_cert(ca_key, ca, [])


def test_cli_writes_everything(tmp_path, capsys):
    assert certs.main([str(tmp_path / "c"), "--hosts", "node.example", "192.0.2.7", "--nodes", "1"]) == 0
    srv = _load(tmp_path / "c" / "server.pem")
    assert certs.san_hosts(srv) == {"node.example", "192.0.2.7"}
    assert (tmp_path / "c" / "node0.pub").exists()
    assert "node0" in capsys.readouterr().out
