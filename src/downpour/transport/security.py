"""Connection security, one object handed to servers and clients alike.

Strategies pass a :class:`Security` through without looking inside, so
switching TLS on never touches them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True, kw_only=True)
class Security:
    """Plaintext (the default) or TLS for the parameter-server connections.

    Every call also carries the run's token, so plaintext is meant for
    127.0.0.1 and trusted networks; use TLS elsewhere (the token then travels
    encrypted too).

    Args:
        tls: encrypt connections.
        certificate_chain: PEM certificate chain a server presents.
        private_key: PEM private key of that certificate (servers only).
        root_certificates: PEM certificates a client trusts (None: the system's).
        target_name: the name the client expects in the server's
            certificate, when it is not the host it dials.

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

    def __post_init__(self) -> None:
        given = [self.certificate_chain, self.private_key, self.root_certificates, self.target_name]
        if not self.tls and any(item is not None for item in given):
            raise ValueError(
                "certificates given but tls=False; build it with Security.with_tls(...)"
            )
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a server certificate_chain needs its private_key, and vice versa")

    @classmethod
    def with_tls(
        cls,
        *,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        root_certificates: bytes | None = None,
        target_name: str | None = None,
    ) -> Security:
        """TLS with the given PEM material (servers: chain and key; clients: roots)."""
        return cls(
            tls=True,
            certificate_chain=certificate_chain,
            private_key=private_key,
            root_certificates=root_certificates,
            target_name=target_name,
        )

    @classmethod
    def from_files(
        cls,
        *,
        certificate_chain: str | Path | None = None,
        private_key: str | Path | None = None,
        root_certificates: str | Path | None = None,
        target_name: str | None = None,
    ) -> Security:
        """TLS with PEM material read from files."""

        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls.with_tls(
            certificate_chain=read(certificate_chain),
            private_key=read(private_key),
            root_certificates=read(root_certificates),
            target_name=target_name,
        )

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """Credentials for ``add_secure_port``, or None for plaintext."""
        if not self.tls:
            return None
        if self.certificate_chain is None or self.private_key is None:
            raise ValueError("a TLS server needs certificate_chain and private_key")
        return grpc.ssl_server_credentials([(self.private_key, self.certificate_chain)])

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """Credentials for ``secure_channel``, or None for plaintext."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)

    def channel_options(self) -> list[tuple[str, str]]:
        if self.tls and self.target_name is not None:
            return [("grpc.ssl_target_name_override", self.target_name)]
        return []
