"""Connection security, one object handed to servers and clients alike.

Strategies pass a :class:`Security` through without looking inside, so
switching TLS on never touches them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

import grpc

PemKind = Literal["certificate", "private key"]

_BEGIN: dict[PemKind, re.Pattern[bytes]] = {
    "certificate": re.compile(rb"-----BEGIN (?:TRUSTED )?CERTIFICATE-----"),
    "private key": re.compile(rb"-----BEGIN (?:RSA |EC )?PRIVATE KEY-----"),
}
_ENCRYPTED_KEY = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


def check_pem(data: bytes, kind: PemKind) -> None:
    """Raise ``ValueError`` unless ``data`` holds a PEM block of ``kind``.

    gRPC reports bad PEM only when a connection fails, as a handshake error
    that names neither the file nor the flag; this catches the usual mistakes
    (a key for a certificate, a DER file, an encrypted key) up front.

    Example:
        >>> check_pem(b"-----BEGIN CERTIFICATE-----\\n...", "certificate")
        >>> check_pem(b"-----BEGIN CERTIFICATE-----\\n...", "private key")
        Traceback (most recent call last):
        ...
        ValueError: not a PEM private key (no '-----BEGIN PRIVATE KEY-----' block)
    """
    if kind == "private key" and _ENCRYPTED_KEY in data:
        raise ValueError("the private key is encrypted; gRPC needs it unencrypted "
                         "(e.g. `openssl pkey -in KEY -out PLAIN`)")
    if _BEGIN[kind].search(data) is None:
        marker = "CERTIFICATE" if kind == "certificate" else "PRIVATE KEY"
        raise ValueError(f"not a PEM {kind} (no '-----BEGIN {marker}-----' block)")


@overload
def read_pem(path: str | Path, kind: PemKind, name: str = ...) -> bytes: ...
@overload
def read_pem(path: None, kind: PemKind, name: str = ...) -> None: ...
def read_pem(path: str | Path | None, kind: PemKind, name: str = "") -> bytes | None:
    """The bytes of the PEM file ``path``, checked to hold a ``kind`` (see :func:`check_pem`); None for None.

    Errors name the file, after ``name`` (the flag or argument that gave it)
    when given: ``FileNotFoundError`` when it is missing, ``ValueError`` when
    it cannot be read or is not PEM of that kind.
    """
    if path is None:
        return None
    path = Path(path)
    where = f"{name}: " if name else ""
    if not path.is_file():
        raise FileNotFoundError(f"{where}{path} does not exist or is not a file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"{where}cannot read {path}: {error.strerror or error}") from None
    try:
        check_pem(data, kind)
    except ValueError as error:
        raise ValueError(f"{where}{path}: {error}") from None
    return data


@dataclass(frozen=True, kw_only=True)
class Security:
    """Plaintext (the default), TLS, or mutual TLS for the parameter-server connections.

    Every call also carries the run's token, so plaintext is meant for
    127.0.0.1 and trusted networks; use TLS elsewhere (the token then travels
    encrypted too). With mutual TLS a server also demands a certificate from
    every client and checks it against its ``root_certificates``, so only
    holders of a key the run's CA signed get as far as the token check.

    One object means the same on both sides:

    ==================  =====================================  ==================================
    field               on a server                            on a client
    ==================  =====================================  ==================================
    certificate_chain   the certificate it presents            its certificate (mutual TLS)
    private_key         that certificate's key                 that certificate's key
    root_certificates   the CA of the clients' certificates    the CAs it trusts (None: the
                        (with ``require_client_auth``)         system's)
    ==================  =====================================  ==================================

    Args:
        tls: encrypt connections.
        certificate_chain: PEM certificate chain this side presents.
        private_key: PEM private key of that certificate.
        root_certificates: PEM certificates this side checks the other's against.
        target_name: the name the client expects in the server's
            certificate, when it is not the host it dials.
        require_client_auth: servers only: refuse clients without a
            certificate signed by ``root_certificates`` (mutual TLS).

    Example:
        >>> Security().tls
        False
        >>> Security.with_tls(root_certificates=b"-----BEGIN CERTIFICATE-----...").tls
        True
    """

    tls: bool = False
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    root_certificates: bytes | None = None
    target_name: str | None = None
    require_client_auth: bool = False

    def __post_init__(self) -> None:
        given = [self.certificate_chain, self.private_key, self.root_certificates, self.target_name]
        if not self.tls and (any(item is not None for item in given) or self.require_client_auth):
            raise ValueError(
                "certificates given but tls=False; build it with Security.with_tls(...)"
            )
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError(
                "a certificate_chain needs its private_key, and vice versa "
                "(a server's own certificate, or a client's for mutual TLS)"
            )
        if self.require_client_auth and self.root_certificates is None:
            raise ValueError(
                "require_client_auth needs root_certificates: the CA that signed the clients' certificates"
            )
        if self.require_client_auth and self.certificate_chain is None:
            raise ValueError(
                "require_client_auth is for servers, which need certificate_chain and private_key too"
            )
        pems: tuple[tuple[str, bytes | None, PemKind], ...] = (
            ("certificate_chain", self.certificate_chain, "certificate"),
            ("private_key", self.private_key, "private key"),
            ("root_certificates", self.root_certificates, "certificate"),
        )
        for name, data, kind in pems:
            if data is not None:
                try:
                    check_pem(data, kind)
                except ValueError as error:
                    raise ValueError(f"{name}: {error}") from None

    @classmethod
    def with_tls(
        cls,
        *,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        root_certificates: bytes | None = None,
        target_name: str | None = None,
        require_client_auth: bool = False,
    ) -> Security:
        """TLS with the given PEM material.

        Servers give chain and key (and roots with ``require_client_auth``
        for mutual TLS); clients give roots (and their own chain and key
        when the server wants client certificates).
        """
        return cls(
            tls=True,
            certificate_chain=certificate_chain,
            private_key=private_key,
            root_certificates=root_certificates,
            target_name=target_name,
            require_client_auth=require_client_auth,
        )

    @classmethod
    def from_files(
        cls,
        *,
        certificate_chain: str | Path | None = None,
        private_key: str | Path | None = None,
        root_certificates: str | Path | None = None,
        target_name: str | None = None,
        require_client_auth: bool = False,
    ) -> Security:
        """TLS with PEM material read from files; errors name the argument and the file."""

        return cls.with_tls(
            certificate_chain=read_pem(certificate_chain, "certificate", "certificate_chain"),
            private_key=read_pem(private_key, "private key", "private_key"),
            root_certificates=read_pem(root_certificates, "certificate", "root_certificates"),
            target_name=target_name,
            require_client_auth=require_client_auth,
        )

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """Credentials for ``add_secure_port``, or None for plaintext."""
        if not self.tls:
            return None
        if self.certificate_chain is None or self.private_key is None:
            raise ValueError("a TLS server needs certificate_chain and private_key")
        pairs = [(self.private_key, self.certificate_chain)]
        if self.require_client_auth:
            return grpc.ssl_server_credentials(
                pairs, root_certificates=self.root_certificates, require_client_auth=True
            )
        return grpc.ssl_server_credentials(pairs)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """Credentials for ``secure_channel`` (with a client certificate if given), or None for plaintext."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        """Extra channel options: the expected server name when ``target_name`` is set."""
        if self.tls and self.target_name is not None:
            return [("grpc.ssl_target_name_override", self.target_name)]
        return []
