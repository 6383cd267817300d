"""Where Redis is: the parsed form of a redis://, rediss://, unix:// or redis+sentinel:// URL."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["RedisAddress", "parse_redis_url"]


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is: TCP (optionally TLS, certificate checked) or a unix socket."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    unix_path: str | None = None
    tls: bool = False
    tls_ca_file: str | None = None
    #: Sentinel addresses and the monitored master's name (redis+sentinel://).
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None

    def describe(self) -> str:
        """A printable form with the password left out."""
        if self.sentinels:
            hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"redis+sentinel://{hosts}/{self.service}/{self.db}"
        if self.unix_path:
            return f"unix://{self.unix_path}?db={self.db}"
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """
    Parse ``redis://[user:pass@]host[:port][/db]``, ``rediss://...`` (TLS; the
    query ``ca=/path/ca.pem`` names a private CA), ``unix:///path.sock[?db=N]``
    or ``redis+sentinel://[user:pass@]host:port[,host:port...]/master[/db]``.

    @raise ValueError: with a message that says what is wrong.
    """
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    try:
        db = int(query.get("db", "0"))
    except ValueError:
        raise ValueError(f"db must be a number in {url!r}") from None
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"no socket path in {url!r}: use unix:///path/to/redis.sock")
        return RedisAddress(
            unix_path=parts.path,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )
    if parts.scheme == "redis+sentinel":
        return _parse_sentinel_url(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(
            f"unsupported Redis URL {url!r}: use redis://host:port/db, rediss://host:port/db or unix:///path.sock"
        )
    path = parts.path.strip("/")
    if path:
        if not path.isdigit():
            raise ValueError(f"the database in {url!r} must be a number, like redis://host:6379/0")
        db = int(path)
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    return RedisAddress(
        host=parts.hostname or "127.0.0.1",
        port=port,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=parts.scheme == "rediss",
        tls_ca_file=query.get("ca"),
    )


def _parse_sentinel_url(url: str) -> RedisAddress:
    rest = url.split("://", 1)[1]
    credentials, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    names = [p for p in path.split("/") if p]
    if not names:
        raise ValueError(f"name the master in {url!r}: redis+sentinel://host:26379/mymaster/0")
    if len(names) > 2 or (len(names) == 2 and not names[1].isdigit()):
        raise ValueError(f"expected /master[/db] after the sentinels in {url!r}")
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "26379")
        if not name or not port.isdigit():
            raise ValueError(f"bad sentinel address {host!r} in {url!r}: use host:port")
        sentinels.append((name, int(port)))
    user, _, password = credentials.partition(":")
    return RedisAddress(
        host=sentinels[0][0],
        port=sentinels[0][1],
        db=int(names[1]) if len(names) == 2 else 0,
        username=unquote(user) or None,
        password=unquote(password) or None,
        sentinels=tuple(sentinels),
        service=names[0],
    )
