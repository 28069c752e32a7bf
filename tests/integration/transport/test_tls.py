"""TLS, switched on by a Security object alone: a self-signed certificate made in the test."""

from __future__ import annotations

import datetime
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from downpour.errors import TransportError
from downpour.server import ServerShard
from downpour.transport import Security

pytestmark = pytest.mark.integration


def _with_cryptography() -> tuple[bytes, bytes]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def _with_openssl(folder: Path) -> tuple[bytes, bytes]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert.read_bytes(), key.read_bytes()


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory) -> tuple[bytes, bytes]:
    """PEM (certificate, key) for localhost and 127.0.0.1: cryptography, else openssl, else skip."""
    try:
        return _with_cryptography()
    except ImportError:
        pass
    if shutil.which("openssl") is None:
        pytest.skip("neither the cryptography package nor the openssl tool is available")
    return _with_openssl(tmp_path_factory.mktemp("tls"))


@pytest.mark.timeout(60)
def test_tls_round_trip(serve, connect, self_signed):
    certificate, key = self_signed
    shard = ServerShard(torch.randn(300_000), optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    server = serve(
        shard, security=Security.with_tls(certificate_chain=certificate, private_key=key)
    )
    assert server.tls
    client = connect(server.address, security=Security.with_tls(root_certificates=certificate))
    version, params = client.pull()
    assert torch.equal(params, shard.pull()[1])
    grad = torch.randn(300_000)
    assert client.push(0, version, grad).applied
    assert torch.equal(client.pull()[1], params - grad)


@pytest.mark.timeout(60)
def test_tls_by_name_and_from_files(serve, connect, self_signed, tmp_path):
    certificate, key = self_signed
    (tmp_path / "cert.pem").write_bytes(certificate)
    (tmp_path / "key.pem").write_bytes(key)
    server_security = Security.from_files(
        certificate_chain=tmp_path / "cert.pem", private_key=tmp_path / "key.pem"
    )
    server = serve(ServerShard(torch.zeros(4)), security=server_security)
    client = connect(
        f"localhost:{server.port}",
        security=Security.from_files(
            root_certificates=tmp_path / "cert.pem", target_name="localhost"
        ),
    )
    assert client.pull()[0] == 0


@pytest.mark.timeout(60)
def test_plaintext_client_cannot_talk_to_a_tls_server(serve, connect, self_signed):
    certificate, key = self_signed
    server = serve(
        ServerShard(torch.zeros(4)),
        security=Security.with_tls(certificate_chain=certificate, private_key=key),
    )
    client = connect(server.address, timeout=3)
    with pytest.raises(TransportError):
        client.pull()


def test_security_is_validated():
    with pytest.raises(ValueError, match="tls=False"):
        Security(root_certificates=b"x")
    with pytest.raises(ValueError, match="private_key"):
        Security.with_tls(certificate_chain=b"x")
    with pytest.raises(ValueError, match="needs certificate_chain"):
        Security.with_tls(root_certificates=b"x").server_credentials()
    assert Security().server_credentials() is None and Security().channel_credentials() is None
