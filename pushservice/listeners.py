"""
The listening sockets of ``--workers N``: bound once by the parent (before
twistd drops privileges, with every option of the endpoint string), handed
to each worker as a file descriptor, and adopted there, so the kernel hands
each new connection to whichever worker accepts it first.

The parent never accepts: its ports stop reading at once and only keep the
sockets (and a unix socket's path) alive for as long as the parent runs.
What an endpoint kind needs in the worker:
  - tcp, tcp6, unix, systemd: the socket itself;
  - ssl: the key and certificates too (read by the parent, sent over the
    handoff pipe), each worker making its own TLS context;
  - haproxy:tcp/tcp6/unix: the PROXY protocol wrapper around the rest.
The SNI endpoint ``tls:`` (certificates reloaded from a directory) cannot be
shared; ssl: with ``dhParameters=`` or ``sslmethod=``, or under haproxy:, neither.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import protocol
from twisted.logger import Logger

from ._internals import parse_server_endpoint
from .config import Config
from .handoff import FIRST_SOCKET_FD, Socket, TLSMaterial

__all__ = ["Bound", "adopt", "bind", "unshareable"]

_log = Logger()


def _layers(description: str) -> tuple[str, bool]:
    """The endpoint kind under any ``haproxy:`` prefix, and whether there was one."""
    kind = description.split(":", 1)[0]
    if kind == "haproxy":
        return description.split(":", 2)[1], True
    return kind, False


def unshareable(description: str) -> str | None:
    """Why C{description} cannot be served by several workers, or None when it can."""
    kind, haproxy = _layers(description)
    if kind == "tls":
        return "the tls: endpoint cannot be shared by workers; use ssl:PORT:privateKey=...:certKey=..."
    if kind == "ssl" and any(f":{name}=" in description for name in ("dhParameters", "sslmethod")):
        return "with --workers, ssl: endpoints take privateKey, certKey and extraCertChain only"
    if kind == "ssl" and haproxy:
        return "haproxy:ssl: cannot be shared by workers; terminate TLS in the proxy, or use haproxy:tcp:"
    return None


class _NoAccept(protocol.ServerFactory):
    """The parent's factory: its ports never accept (they stop reading at once)."""

    noisy = False


class Bound:
    """One endpoint bound by the parent: its (non-accepting) port and what a worker needs to adopt it."""

    def __init__(self, port: Any, description: str, tls: TLSMaterial | None, haproxy: bool) -> None:
        self.port = port
        self.description = description
        self.tls = tls
        self.haproxy = haproxy

    def fileno(self) -> int:
        return int(self.port.fileno())

    def for_worker(self, index: int) -> Socket:
        """How the worker finds it: at fd FIRST_SOCKET_FD + C{index} (the parent maps it there)."""
        family = int(self.port.socket.family)
        return Socket(FIRST_SOCKET_FD + index, family, self.description, self.tls, self.haproxy)


def _tls_material(description: str) -> TLSMaterial:
    """The PEM key and certificates of an ssl: endpoint, read (as the parent may) from its files."""
    from cryptography.hazmat.primitives import serialization

    _, args, _ = parse_server_endpoint(description.removeprefix("haproxy:"))
    options = args[2]
    pem = serialization.Encoding.PEM
    key = options.privateKey.to_cryptography_key().private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chain = tuple(c.to_cryptography().public_bytes(pem).decode() for c in options.extraCertChain or ())
    return TLSMaterial(key.decode(), options.certificate.to_cryptography().public_bytes(pem).decode(), chain)


def bind(reactor: Any, config: Config) -> list[Bound]:
    """Bind every --listen endpoint, accepting nothing; a port in use raises (twistd then fails at start)."""
    from twisted.internet import endpoints

    from .service import _with_backlog

    bound: list[Bound] = []
    for description in config.listen:
        kind, haproxy = _layers(description)
        failures: list[Any] = []
        endpoint = endpoints.serverFromString(reactor, _with_backlog(description, config.backlog))
        ports: list[Any] = []
        endpoint.listen(_NoAccept()).addCallbacks(ports.append, failures.append)
        if failures:
            for done in bound:
                done.port.stopListening()
            failures[0].raiseException()
        ports[0].stopReading()  # the workers accept, never the parent
        tls = _tls_material(description) if kind == "ssl" else None
        bound.append(Bound(ports[0], description, tls, haproxy))
        _log.info("listening on {address} for {n} workers", address=ports[0].getHost(), n=config.workers)
    return bound


class _SharedUnixPort:
    """An adopted unix port that stops accepting without removing its path: the parent owns the path."""

    def __init__(self, port: Any) -> None:
        self._port = port

    def getHost(self) -> Any:
        return self._port.getHost()

    def stopListening(self) -> None:
        self._port.stopReading()
        self._port.factory.doStop()


def _tls_options(material: TLSMaterial) -> Any:
    from twisted.internet import ssl

    identity = ssl.PrivateCertificate.loadPEM((material.certificate + "\n" + material.key).encode())
    return ssl.CertificateOptions(
        privateKey=identity.privateKey.original,
        certificate=identity.original,
        extraCertChain=[ssl.Certificate.loadPEM(c.encode()).original for c in material.chain] or None,
    )


def adopt(reactor: Any, sockets: tuple[Socket, ...], factory: Any) -> list[Any]:
    """In a worker: serve C{factory} on the sockets the parent handed over (closing those fds); their ports."""
    from twisted.internet.endpoints import AdoptedStreamServerEndpoint
    from twisted.protocols.haproxy import proxyEndpoint
    from twisted.protocols.tls import TLSMemoryBIOFactory

    ports: list[Any] = []
    for shared in sockets:
        endpoint: Any = AdoptedStreamServerEndpoint(reactor, shared.fd, shared.family)
        if shared.haproxy:
            endpoint = proxyEndpoint(endpoint)
        wrapped = factory if shared.tls is None else TLSMemoryBIOFactory(_tls_options(shared.tls), False, factory)
        adopted: list[Any] = []
        endpoint.listen(wrapped).addCallback(adopted.append)  # synchronous: adoptStreamPort
        port = adopted[0]
        ports.append(_SharedUnixPort(port) if shared.family == socket.AF_UNIX else port)
    return ports
