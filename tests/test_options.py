"""Plugin discovery, ``twistd pushservice`` options, the config file and Redis URLs (no servers; two run twistd --help)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from support.processes import TWISTD
from twisted.python import usage

from pushservice.config import FLAGS, OPTIONS, Config, RedisAddress, parse_redis_url
from pushservice.tap import Options


def parse(*args: str) -> Config:
    options = Options()
    options.parseOptions(list(args))
    assert options.config is not None
    return options.config


def usage_error(*args: str) -> str:
    with pytest.raises(usage.UsageError) as info:
        parse(*args)
    return str(info.value)


# -- plugin discovery ------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PUSHSERVICE_CONFIG")}


@pytest.mark.slow  # a twistd process
def test_installed_plugin_listed_by_twistd_help(tmp_path: Path) -> None:
    """`twistd --help` from the venv, outside the source tree and without PYTHONPATH, lists pushservice."""
    result = subprocess.run(
        [str(TWISTD), "--help"], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    commands = result.stdout.split("Commands:", 1)[-1]
    assert any(line.split()[:1] == ["pushservice"] for line in commands.splitlines()), result.stdout


@pytest.mark.slow  # a twistd process
def test_installed_plugin_options_help(tmp_path: Path) -> None:
    """`twistd pushservice --help` from the installed package documents --listen, --redis and --config."""
    result = subprocess.run(
        [str(TWISTD), "pushservice", "--help"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for option in ("--listen", "--redis", "--config", "--queue", "--shutdown-timeout"):
        assert option in result.stdout, option


def test_get_plugins_finds_pushservice() -> None:
    """twisted.plugin.getPlugins(IServiceMaker) yields a service maker with tapname "pushservice"."""
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "pushservice" in makers
    maker = makers["pushservice"]
    assert maker.description
    assert isinstance(maker.options(), Options)


def test_help_documents_every_option() -> None:
    """`twistd pushservice --help` names every parameter and flag, each with a description."""
    text = str(Options())
    for option in OPTIONS:
        assert f"--{option.name}=" in text, option.name
        assert option.help.strip()
    for name, _, _, doc in FLAGS:
        assert f"--{name}" in text, name
        assert doc.strip()
    assert "--listen=" in text and "--config=" in text


# -- option parsing ----------------------------------------------------------------


def test_defaults_give_the_documented_config() -> None:
    """No options: the default Config (listen tcp:8000, queue `messages`, 64 KiB messages, 1 MiB buffers...)."""
    config = parse()
    assert config == Config()
    assert config.listen == ("tcp:8000",)
    assert config.redis is None
    assert config.queue == "messages"
    assert config.max_message_size == 64 * 1024
    assert config.max_frame_size == 1024 * 1024
    assert config.slow_client_bytes == 256 * 1024
    assert config.max_item_size == 2 * 1024 * 1024
    assert (config.max_json_depth, config.max_number_length) == (64, 100)
    assert (config.history, config.log_maxlen, config.log_hard_maxlen) == (10000, 100000, 1000000)
    assert config.redis_timeout == 5.0
    assert config.shutdown_timeout == 10.0
    assert config.allowed_origins == ("*",)
    assert config.client_publish == "on"
    assert not config.require_token
    assert config.demo
    assert config.log_key == "messages:log" and config.dead_key == "messages:dead"


def test_values_are_coerced() -> None:
    """Every option given on the command line lands, typed, in the Config."""
    config = parse(
        "--listen",
        "tcp:9001:interface=127.0.0.1",
        "--redis",
        "redis://10.0.0.5:6380/2",
        "--queue",
        "jobs",
        "--max-message-size",
        "1k",
        "--max-frame-size",
        "2m",
        "--ping-interval",
        "1.5",
        "--ping-timeout",
        "3",
        "--handshake-timeout",
        "2",
        "--max-connections",
        "10",
        "--redis-timeout",
        "0.5",
        "--history",
        "7",
        "--history-bytes",
        "1m",
        "--log-maxlen",
        "99",
        "--batch",
        "3",
        "--max-subscriptions",
        "4",
        "--client-rate",
        "2.5",
        "--client-burst",
        "6",
        "--slow-client-bytes",
        "200k",
        "--slow-client-seconds",
        "4",
        "--shutdown-timeout",
        "3",
        "--allowed-origins",
        "https://a.example, https://b.example",
        "--client-publish",
        "off",
        "--auth-timeout",
        "2",
        "--trusted-proxies",
        "1",
        "--no-demo",
    )
    assert config == Config(
        listen=("tcp:9001:interface=127.0.0.1",),
        redis=RedisAddress(host="10.0.0.5", port=6380, db=2),
        queue="jobs",
        max_message_size=1024,
        max_frame_size=2 * 1024**2,
        ping_interval=1.5,
        ping_timeout=3.0,
        handshake_timeout=2.0,
        max_connections=10,
        redis_timeout=0.5,
        history=7,
        history_bytes=1024**2,
        log_maxlen=99,
        batch=3,
        max_subscriptions=4,
        client_rate=2.5,
        client_burst=6,
        slow_client_bytes=200 * 1024,
        slow_client_seconds=4.0,
        shutdown_timeout=3.0,
        allowed_origins=("https://a.example", "https://b.example"),
        client_publish="off",
        auth_timeout=2.0,
        trusted_proxies=1,
        demo=False,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("128k", 128 * 1024),
        ("1m", 1024**2),
        ("1M", 1024**2),
        ("1g", 1024**3),
        ("262144", 262144),
        ("128.5k", 131584),
        ("256KiB", 256 * 1024),
        ("2mb", 2 * 1024**2),
    ],
)
def test_size_suffixes(text: str, expected: int) -> None:
    """Sizes take k/m/g suffixes (powers of 1024, case-insensitive, optional `b`/`ib`)."""
    assert parse("--slow-client-bytes", text).slow_client_bytes == expected


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--max-message-size", "-1"], "--max-message-size"),
        (["--max-message-size", "0"], "--max-message-size"),
        (["--max-frame-size", "lots"], "--max-frame-size"),
        (["--slow-client-bytes", "-5k"], "--slow-client-bytes"),
        (["--slow-client-bytes", "64k"], "--slow-client-bytes"),
        (["--log-maxlen", "10", "--log-hard-maxlen", "9"], "--log-hard-maxlen"),
        (["--max-json-depth", "0"], "--max-json-depth"),
        (["--max-item-size", "0"], "--max-item-size"),
        (["--history-bytes", "1x"], "--history-bytes"),
        (["--history", "-3"], "--history"),
        (["--history", "ten"], "--history"),
        (["--max-connections", "0"], "--max-connections"),
        (["--batch", "2.5"], "--batch"),
        (["--redis-timeout", "0"], "--redis-timeout"),
        (["--redis-timeout", "soon"], "--redis-timeout"),
        (["--ping-interval", "-1"], "--ping-interval"),
        (["--shutdown-timeout", "nan"], "--shutdown-timeout"),
        (["--client-rate", "fast"], "--client-rate"),
        (["--trusted-proxies", "many"], "--trusted-proxies"),
        (["--redis", "http://127.0.0.1:6379/0"], "--redis"),
        (["--redis", "redis://127.0.0.1:6379/zero"], "--redis"),
        (["--redis", "redis://127.0.0.1:port/0"], "--redis"),
        (["--redis", "unix://"], "--redis"),
        (["--listen", "bogus:8000"], "--listen"),
        (["--listen", "tcp:http"], "--listen"),
        (["--listen", "8000"], "--listen"),
        (["--listen", "ssl:8443:privateKey=/nonexistent/key.pem"], "--listen"),
        (["--client-publish", "maybe"], "--client-publish"),
        (["--require-token"], "--require-token"),
        (["--client-publish", "token"], "--client-publish"),
        (["--token-secret-file", "/nonexistent/secret"], "--token-secret-file"),
        (["--max-message-size", "2m", "--max-frame-size", "1m"], "--max-message-size"),
        (["--queue", ""], "--queue"),
    ],
)
def test_bad_values_are_usage_errors(args: list[str], option: str) -> None:
    """Each bad value raises usage.UsageError whose message names the option."""
    assert option in usage_error(*args)


def test_require_token_with_secret_is_accepted(tmp_path: Path) -> None:
    """--require-token and --client-publish token are fine once a readable secret file is given."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret-s3cret-s3cret-s3cret-s3cret!")
    config = parse("--token-secret-file", str(secret), "--require-token", "--client-publish", "token")
    assert config.require_token and config.client_publish == "token"
    assert config.token_secret_file == str(secret)


def test_unknown_option_is_an_error() -> None:
    """An option the plugin does not know is a usage error naming it."""
    assert "--no-such-thing" in usage_error("--no-such-thing", "1")


def test_listen_twice_gives_two_endpoints() -> None:
    """--listen (or -l) is repeatable, in order."""
    config = parse("--listen", "tcp:8001", "-l", "unix:/tmp/ps.sock:mode=660", "--listen=tcp6:8002:interface=\\:\\:1")
    assert config.listen == ("tcp:8001", "unix:/tmp/ps.sock:mode=660", "tcp6:8002:interface=\\:\\:1")


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp:8000",
        "tcp:0:interface=127.0.0.1",
        "tcp6:8000:interface=\\:\\:",
        "unix:/run/ps.sock:mode=660:lockfile=0",
        "systemd:domain=INET6:name=pushservice",
        "systemd:domain=INET:index=0",
    ],
)
def test_good_endpoints_are_accepted(endpoint: str) -> None:
    """The documented endpoint kinds (tcp, tcp6, unix, systemd) parse."""
    assert parse("--listen", endpoint).listen == (endpoint,)


# -- the config file ---------------------------------------------------------------


def write_ini(path: Path, body: str) -> str:
    path.write_text(body)
    return str(path)


def test_config_file_values_used_and_command_line_wins(tmp_path: Path) -> None:
    """--config INI values are used; a value also given on the command line takes the command line's."""
    ini = write_ini(
        tmp_path / "ps.conf",
        "# comment\n[pushservice]\nlisten = tcp:9100:interface=127.0.0.1\n  tcp:9101\n"
        "redis = redis://127.0.0.1:7000/4\nqueue = from-file\nmax-message-size = 16k\n"
        "allowed-origins = https://x.example,\n  https://y.example\nno-demo = yes\nredis-timeout = 2\n"
        "\n[other]\nignored = 1\n",
    )
    config = parse("--config", ini)
    assert config.listen == ("tcp:9100:interface=127.0.0.1", "tcp:9101")
    assert config.redis == RedisAddress(host="127.0.0.1", port=7000, db=4)
    assert config.queue == "from-file"
    assert config.max_message_size == 16 * 1024
    assert config.allowed_origins == ("https://x.example", "https://y.example")
    assert config.demo is False
    assert config.redis_timeout == 2.0

    config = parse("--queue", "from-cli", "--config", ini, "--listen", "tcp:9200", "--redis-timeout=3")
    assert config.queue == "from-cli"
    assert config.listen == ("tcp:9200",)  # the command line's listens replace the file's
    assert config.redis_timeout == 3.0
    assert config.max_message_size == 16 * 1024  # still from the file

    assert parse("-c", ini).queue == "from-file"
    assert parse(f"--config={ini}").queue == "from-file"


def test_config_file_flag_off(tmp_path: Path) -> None:
    """A flag set to `no` in the file stays off."""
    ini = write_ini(tmp_path / "ps.conf", "[pushservice]\nno-demo = no\n")
    assert parse("--config", ini).demo is True


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("[pushservice]\nlisten-port = 8000\n", "listen-port"),
        ("[pushservice]\nredis_url = redis://x\n", "redis_url"),
        ("[pushservice]\nno-demo = perhaps\n", "no-demo"),
        ("[pushservice]\nmax-frame-size = -1\n", "--max-frame-size"),
        ("[pushservice]\nredis = ftp://x\n", "--redis"),
        ("[service]\nqueue = q\n", "[pushservice]"),
        ("not an ini file\n", "--config"),
    ],
)
def test_config_file_errors(tmp_path: Path, body: str, needle: str) -> None:
    """Unknown names, bad values, a missing section or a malformed file in --config are usage errors."""
    ini = write_ini(tmp_path / "ps.conf", body)
    message = usage_error("--config", ini)
    assert needle in message, message


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    """--config naming a file that does not exist is a usage error naming --config."""
    assert "--config" in usage_error("--config", str(tmp_path / "absent.conf"))


def test_shipped_example_config_parses() -> None:
    """etc/pushservice.conf is a valid config file."""
    config = parse("--config", str(Path(__file__).resolve().parent.parent / "etc" / "pushservice.conf"))
    assert config.listen == ("tcp:8000:interface=127.0.0.1",)
    assert config.redis == RedisAddress()


# -- parse_redis_url ----------------------------------------------------------------


def test_redis_url_full() -> None:
    """redis://user:pass@host:1234/3 gives user, password, host, port and db; describe() hides the password."""
    address = parse_redis_url("redis://user:pass@redis.example:1234/3")
    assert address == RedisAddress(host="redis.example", port=1234, db=3, username="user", password="pass")
    assert "pass" not in address.describe()
    assert address.describe() == "redis://redis.example:1234/3"


def test_redis_url_defaults_and_escapes() -> None:
    """Port defaults to 6379 and db to 0; percent-escapes in the password are decoded; a bare password works."""
    assert parse_redis_url("redis://cache") == RedisAddress(host="cache", port=6379, db=0)
    assert parse_redis_url("redis://cache:6380/") == RedisAddress(host="cache", port=6380, db=0)
    address = parse_redis_url("redis://:p%40ss%2Fw@cache:6379/1")
    assert address.password == "p@ss/w" and address.username is None and address.db == 1


def test_rediss_url_with_ca() -> None:
    """rediss:// turns TLS on; ?ca= names the CA file."""
    address = parse_redis_url("rediss://redis.example:6380/2?ca=/etc/ssl/redis-ca.pem")
    assert address == RedisAddress(host="redis.example", port=6380, db=2, tls=True, tls_ca_file="/etc/ssl/redis-ca.pem")
    assert address.describe().startswith("rediss://")
    assert parse_redis_url("rediss://r.example").tls_ca_file is None


def test_unix_url() -> None:
    """unix:///path?db=2 is a unix socket and a db."""
    address = parse_redis_url("unix:///var/run/redis/redis.sock?db=2")
    assert address.unix_path == "/var/run/redis/redis.sock" and address.db == 2 and not address.tls
    assert parse_redis_url("unix:///tmp/r.sock").db == 0
    assert "/tmp/r.sock" in parse_redis_url("unix:///tmp/r.sock").describe()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379",
        "localhost:6379",
        "127.0.0.1",
        "redis://h:notaport/0",
        "redis://h:99999/0",
        "redis://h:6379/db0",
        "redis://h/1/2",
        "unix://",
        "unix:///tmp/r.sock?db=two",
        "",
    ],
)
def test_bad_redis_urls(url: str) -> None:
    """Malformed Redis URLs raise ValueError with a message quoting the URL or naming the problem."""
    with pytest.raises(ValueError) as info:
        parse_redis_url(url)
    assert str(info.value)


def test_readme_documents_every_option() -> None:
    """README.rst's options table names every option twistd pushservice accepts."""
    readme = (Path(__file__).resolve().parent.parent / "README.rst").read_text()
    for name in [o.name for o in OPTIONS] + [n for n, *_ in FLAGS] + ["listen", "config"]:
        assert f"``--{name}``" in readme, name


def test_makeservice_tunes_the_collector_and_freezes_startup_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    """twistd's entry sets the young-generation threshold at once, and freezes once the reactor runs."""
    import gc

    from twisted.internet import reactor

    from pushservice import gctune, tap

    started: list[object] = []
    monkeypatch.setattr(reactor, "callWhenRunning", lambda f, *a, **kw: started.append(f))
    thresholds = gc.get_threshold()
    options = Options()
    options.parseOptions(["--redis", "redis://127.0.0.1:1/0"])
    try:
        tap.makeService(options)
        assert gc.get_threshold()[0] == gctune.YOUNG and len(started) == 1
        frozen = gc.get_freeze_count()
        started[0]()  # type: ignore[operator]
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
