"""TLS, switched on by a Security object alone: certificates made in the test.

A self-signed certificate for plain TLS, and for mutual TLS a small PKI made
with the ``cryptography`` package: a CA, a server and a client certificate it
signed, and an unrelated CA with a client certificate of its own.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from downpour.errors import TransportError
from downpour.server import ServerShard
from downpour.transport import Refused, Security
from downpour.transport.security import check_pem, read_pem

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


@dataclass(frozen=True)
class Pki:
    """PEM bytes of a test PKI: CA ``ca`` signed the server's and the client's certificates;
    ``other_ca`` (unrelated) signed ``other_cert``."""

    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes
    other_ca: bytes
    other_cert: bytes
    other_key: bytes

    def write(self, folder: Path) -> dict[str, Path]:
        """Every item as ``<name>.pem`` in ``folder``; returns the paths by name."""
        paths = {}
        for name, data in vars(self).items():
            paths[name] = folder / f"{name}.pem"
            paths[name].write_bytes(data)
        return paths


def make_pki() -> Pki:
    """A fresh :class:`Pki` (P-256 keys, valid for a day); needs the cryptography package."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def issue(name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
              usage: x509.ObjectIdentifier | None = None,
              names: list[x509.GeneralName] | None = None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        signer_cert, signer_key = issuer if issuer is not None else (None, key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(signer_cert.subject if signer_cert is not None else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        )
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer_key, hashes.SHA256()), key

    def pem(certificate: x509.Certificate) -> bytes:
        return certificate.public_bytes(serialization.Encoding.PEM)

    ca, other_ca = issue("downpour test CA", None), issue("another CA", None)
    server = issue("downpour server", ca, ExtendedKeyUsageOID.SERVER_AUTH,
                   [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = issue("downpour worker", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    other = issue("someone else", other_ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(ca=pem(ca[0]), server_cert=pem(server[0]), server_key=pem_key(server[1]),
               client_cert=pem(client[0]), client_key=pem_key(client[1]),
               other_ca=pem(other_ca[0]), other_cert=pem(other[0]), other_key=pem_key(other[1]))


@pytest.fixture(scope="module")
def pki() -> Pki:
    pytest.importorskip("cryptography")
    return make_pki()


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
    certificate, key = b"-----BEGIN CERTIFICATE-----\n", b"-----BEGIN PRIVATE KEY-----\n"
    with pytest.raises(ValueError, match="tls=False"):
        Security(root_certificates=b"x")
    with pytest.raises(ValueError, match="tls=False"):
        Security(require_client_auth=True)
    with pytest.raises(ValueError, match="private_key"):
        Security.with_tls(certificate_chain=b"x")
    with pytest.raises(ValueError, match="needs certificate_chain"):
        Security.with_tls(root_certificates=certificate).server_credentials()
    with pytest.raises(ValueError, match="require_client_auth needs root_certificates"):
        Security.with_tls(certificate_chain=certificate, private_key=key, require_client_auth=True)
    with pytest.raises(ValueError, match="require_client_auth is for servers"):
        Security.with_tls(root_certificates=certificate, require_client_auth=True)
    with pytest.raises(ValueError, match="private_key: not a PEM private key"):
        Security.with_tls(certificate_chain=certificate, private_key=certificate)
    with pytest.raises(ValueError, match="root_certificates: not a PEM certificate"):
        Security.with_tls(root_certificates=b"\x30\x82 DER bytes")
    with pytest.raises(ValueError, match="encrypted"):
        check_pem(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n", "private key")
    assert Security().server_credentials() is None and Security().channel_credentials() is None


def test_pem_files_are_checked_and_named(tmp_path):
    (tmp_path / "key.pem").write_bytes(b"-----BEGIN EC PRIVATE KEY-----\n")
    assert read_pem(tmp_path / "key.pem", "private key").startswith(b"-----BEGIN EC")
    with pytest.raises(FileNotFoundError, match=r"root_certificates: .*missing\.pem does not exist"):
        Security.from_files(root_certificates=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match=r"certificate_chain: .*key\.pem: not a PEM certificate"):
        Security.from_files(certificate_chain=tmp_path / "key.pem", private_key=tmp_path / "key.pem")


@pytest.mark.timeout(60)
def test_a_client_trusting_another_ca_is_refused(serve, connect, pki):
    server = serve(ServerShard(torch.zeros(4)),
                   security=Security.with_tls(certificate_chain=pki.server_cert, private_key=pki.server_key))
    assert connect(server.address, security=Security.with_tls(root_certificates=pki.ca)).pull()[0] == 0
    stranger = connect(server.address, timeout=3, security=Security.with_tls(root_certificates=pki.other_ca))
    with pytest.raises(TransportError, match=server.address):
        stranger.pull()


@pytest.fixture
def mutual_server(serve, pki):
    """A TLS server that demands client certificates signed by ``pki.ca``."""
    shard = ServerShard(torch.zeros(1000), optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    security = Security.with_tls(certificate_chain=pki.server_cert, private_key=pki.server_key,
                                 root_certificates=pki.ca, require_client_auth=True)
    return serve(shard, security=security)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("client", ["plaintext", "no certificate", "certificate of another CA"])
def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(mutual_server, connect, pki, client):
    security = {
        "plaintext": Security(),
        "no certificate": Security.with_tls(root_certificates=pki.ca),
        "certificate of another CA": Security.with_tls(
            root_certificates=pki.ca, certificate_chain=pki.other_cert, private_key=pki.other_key
        ),
    }[client]
    intruder = connect(mutual_server.address, timeout=3, security=security)
    with pytest.raises(TransportError, match=mutual_server.address):
        intruder.pull()
    with pytest.raises(TransportError):
        intruder.push(0, 0, torch.ones(1000))
    assert mutual_server.service.shard.pull()[0] == 0  # nothing reached the shard


@pytest.mark.timeout(60)
def test_mutual_tls_serves_a_client_with_a_certificate_of_its_ca(mutual_server, connect, pki, token):
    security = Security.with_tls(root_certificates=pki.ca, certificate_chain=pki.client_cert,
                                 private_key=pki.client_key)
    client = connect(mutual_server.address, security=security)
    version, params = client.pull()
    assert (version, torch.count_nonzero(params).item()) == (0, 0)
    assert client.push(0, version, torch.ones(1000)).applied
    assert torch.equal(client.pull()[1], -torch.ones(1000))
    impostor = connect(mutual_server.address, security=security, token=token + "x")  # TLS is no token
    with pytest.raises(Refused) as caught:
        impostor.pull()
    assert caught.value.reason == "BAD_TOKEN"
