"""A local PostgreSQL server for `fleet-payouts dev` and the test suite.

The service depends on real PostgreSQL behaviour (row locks, advisory locks,
procrastinate's LISTEN/NOTIFY), so neither dev nor tests fake the database: they
run the real server binaries against a private data directory instead.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import psycopg

from fleet_payouts_devkit.processes import free_port, port_is_free

logger = logging.getLogger(__name__)

# sun_path is 108 bytes including the NUL; the socket file is "<dir>/.s.PGSQL.<port>".
_MAX_SOCKET_PATH = 107
_SOCKET_SUFFIX = "/.s.PGSQL.65535"
_PORT_FILE = "fleet-port"
_CONF_FILE = "fleet.conf"
_INCLUDE_LINE = f"include_if_exists = '{_CONF_FILE}'"
_READY_TIMEOUT_S = 30.0


class EmbeddedPostgresError(RuntimeError):
    """The local server could not be set up, started or stopped."""


def find_pg_bindir() -> Path | None:
    """Where the system's server programs live: PATH first, so a developer can pick a version."""
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).resolve().parent
    # Debian/Ubuntu keep the server programs off PATH, one directory per major version.
    candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "pg_ctl").is_file()]
    candidates.sort(key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)] or [0])
    return candidates[-1] if candidates else None


def _pgserver_bindir() -> Path | None:
    """Binaries from the optional `pgserver` wheel, for machines without a system PostgreSQL."""
    try:
        pgserver = importlib.import_module("pgserver")
    except ImportError:
        return None
    try:
        return Path(importlib.import_module("pgserver._commands").POSTGRES_BIN_PATH)
    except (ImportError, AttributeError):  # older/newer layouts: look where the wheel puts them
        bindir = Path(pgserver.__file__ or ".").parent / "pginstall" / "bin"
        return bindir if (bindir / "pg_ctl").is_file() else None


def reachable_by_server(path: Path) -> bool:
    """Whether the account that runs PostgreSQL can reach `path` (always, unless we are root)."""
    if os.geteuid() != 0:
        return True
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.resolve().parents)


def _conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class EmbeddedPostgres:
    """One PostgreSQL server over one data directory, created on first start.

    The data directory is kept between runs (dev keeps its data); tests pass a
    fresh directory and `fast_unsafe=True`, trading crash safety for speed.
    """

    def __init__(
        self, data_dir: Path, port: int | None = None, *, fast_unsafe: bool = False
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.fast_unsafe = fast_unsafe
        self._requested_port = port
        self._port: int | None = None
        bindir = find_pg_bindir() or _pgserver_bindir()
        if bindir is None:
            raise EmbeddedPostgresError(
                "PostgreSQL server programs (pg_ctl, initdb) not found: install PostgreSQL "
                "(e.g. apt-get install postgresql) or `pip install pgserver`"
            )
        self.bindir = bindir
        # PostgreSQL refuses to run as root, so root hands the server to the postgres account.
        self._owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return self.url_as("postgres")

    def url_as(self, user: str) -> str:
        """The URL for another role: local logins are trusted, no password needed."""
        if self._port is None:
            raise EmbeddedPostgresError("server not started")
        return f"postgresql://{user}@127.0.0.1:{self._port}/postgres"

    def start(self) -> str:
        """Initialise the data directory if needed, start (or reuse) the server, return its URL."""
        self._prepare_data_dir()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._ensure_include()
        running_port = self._running_port()
        if running_port is not None:
            # A previous `dev` left it running (or another process uses it): share it.
            logger.info("reusing PostgreSQL already running on %s", self.data_dir)
            if self._requested_port not in (None, running_port):
                logger.warning(
                    "asked for port %s but the running server uses %s",
                    self._requested_port,
                    running_port,
                )
            self._port = running_port
        else:
            self._port = self._choose_port()
            self._write_conf(self._port)
            log = self.data_dir / "server.log"
            pg_ctl = self._bin("pg_ctl")
            result = self._run(
                [pg_ctl, "-D", str(self.data_dir), "-l", str(log), "-w", "-t", "60", "start"]
            )
            if result.returncode != 0:
                raise EmbeddedPostgresError(
                    f"pg_ctl start failed ({result.returncode}): {result.stderr.strip()}\n"
                    f"--- tail of {log} ---\n{self._log_tail()}"
                )
            logger.info("PostgreSQL started on port %s (data in %s)", self._port, self.data_dir)
        self._wait_ready()
        return self.url

    def stop(self) -> None:
        """Stop the server if it runs; safe to call twice or on a never-started instance."""
        if self._is_running():
            pg_ctl = self._bin("pg_ctl")
            result = self._run([pg_ctl, "-D", str(self.data_dir), "-m", "fast", "-w", "stop"])
            if result.returncode != 0 and self._is_running():
                raise EmbeddedPostgresError(
                    f"pg_ctl stop failed: {result.stderr.strip()}\n{self._log_tail()}"
                )
            logger.info("PostgreSQL stopped (data in %s)", self.data_dir)
        socket_dir = self._socket_dir_path()
        if socket_dir != self.data_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- helpers ---------------------------------------------------------------

    def _bin(self, name: str) -> str:
        return str(self.bindir / name)

    def _run(self, args: list[str], *, as_server: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL program, as the postgres account when we are root."""
        if as_server and self._owner is not None:
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            args = [runuser, "-u", self._owner.pw_name, "--", *args]
        # cwd=/ because the postgres account may not be able to enter our working directory.
        # A new session: Ctrl-C in the terminal must not reach the postmaster,
        # whose owner stops it after everything that uses it has stopped.
        return subprocess.run(  # noqa: S603 - fixed program paths, no shell
            args, capture_output=True, text=True, cwd="/", check=False, start_new_session=True
        )

    def _chown(self, path: Path) -> None:
        if self._owner is not None:
            os.chown(path, self._owner.pw_uid, self._owner.pw_gid)

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text, encoding="utf-8")
        self._chown(path)

    def _prepare_data_dir(self) -> None:
        """Create the data dir and make sure the server account can reach and own it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._owner is None:
            return
        for parent in self.data_dir.parents:
            if not parent.stat().st_mode & stat.S_IXOTH:
                raise EmbeddedPostgresError(
                    f"{parent} is not traversable by the '{self._owner.pw_name}' account that "
                    f"runs PostgreSQL (running as root); use a data dir whose parents all have "
                    f"o+x (e.g. under /var/tmp), or `chmod o+x {parent}`"
                )
        if self.data_dir.stat().st_uid != self._owner.pw_uid:
            self._chown(self.data_dir)
            self.data_dir.chmod(0o700)

    def _initdb(self) -> None:
        base = [self._bin("initdb"), "-D", str(self.data_dir), "-U", "postgres"]
        base += ["--auth=trust", "-E", "UTF8"]
        if self.fast_unsafe:
            base.append("--no-sync")
        for locale in ("C.UTF-8", "C"):
            result = self._run([*base, f"--locale={locale}"])
            if result.returncode == 0:
                logger.info("initialised PostgreSQL data dir %s (locale %s)", self.data_dir, locale)
                return
            if "locale" not in result.stderr.lower():
                break
            logger.info("locale %s unavailable, retrying initdb with C", locale)
        raise EmbeddedPostgresError(f"initdb failed: {result.stderr.strip()}")

    def _ensure_include(self) -> None:
        """Include our settings file from postgresql.conf once; the file is rewritten per start."""
        conf = self.data_dir / "postgresql.conf"
        text = conf.read_text(encoding="utf-8")
        if _INCLUDE_LINE not in text:
            with conf.open("a", encoding="utf-8") as f:
                f.write(f"\n# fleet-payouts dev/test settings\n{_INCLUDE_LINE}\n")

    def _choose_port(self) -> int:
        """Keep a dev data dir on the same port across runs, so saved URLs keep working."""
        port_file = self.data_dir / _PORT_FILE
        port = self._requested_port
        if port is None:
            saved = port_file.read_text().strip() if port_file.exists() else ""
            port = int(saved) if saved.isdigit() and port_is_free(int(saved)) else free_port()
        self._write(port_file, f"{port}\n")
        return port

    def _write_conf(self, port: int) -> None:
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(port),
            "unix_socket_directories": _conf_quote(str(self._make_socket_dir())),
            "max_connections": "300",
        }
        sharedir = self._sharedir()
        if sharedir and (sharedir / "extension" / "pg_stat_statements.control").exists():
            settings["shared_preload_libraries"] = "'pg_stat_statements'"
            settings["pg_stat_statements.track"] = "'all'"
        else:
            logger.info("pg_stat_statements not installed; not preloading it")
        if self.fast_unsafe:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        lines = [f"# Rewritten by {__name__} on every start; do not edit."]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        self._write(self.data_dir / _CONF_FILE, "\n".join(lines) + "\n")

    def _sharedir(self) -> Path | None:
        pg_config = self.bindir / "pg_config"
        if pg_config.is_file():
            result = self._run([str(pg_config), "--sharedir"], as_server=False)
            if result.returncode == 0 and result.stdout.strip():
                return Path(result.stdout.strip())
        # Debian: /usr/lib/postgresql/15/bin -> /usr/share/postgresql/15; others: <prefix>/share.
        prefix = self.bindir.parent
        for candidate in (
            Path("/usr/share/postgresql") / prefix.name,
            prefix / "share" / "postgresql",
            prefix / "share",
        ):
            if (candidate / "extension").is_dir():
                return candidate
        return None

    def _socket_dir_path(self) -> Path:
        if len(str(self.data_dir)) + len(_SOCKET_SUFFIX) <= _MAX_SOCKET_PATH:
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return Path("/tmp") / f"fleet-pg-{digest}"  # noqa: S108 - private dir, ownership checked

    def _make_socket_dir(self) -> Path:
        """Unix socket paths are capped at 107 bytes, so deep data dirs get a short private dir."""
        path = self._socket_dir_path()
        if path == self.data_dir:
            return path
        try:
            path.mkdir(mode=0o700)
            self._chown(path)
        except FileExistsError:
            pass
        st = path.lstat()
        owner_uid = self._owner.pw_uid if self._owner is not None else os.geteuid()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != owner_uid:
            raise EmbeddedPostgresError(f"{path} exists but is not our private socket directory")
        return path

    def _is_running(self) -> bool:
        if not (self.data_dir / "PG_VERSION").exists():
            return False
        if self._run([self._bin("pg_ctl"), "-D", str(self.data_dir), "status"]).returncode != 0:
            return False
        return not self._postmaster_is_zombie()

    def _postmaster_is_zombie(self) -> bool:
        """A killed postmaster whose parent never reaps it still "exists" for pg_ctl and initdb.

        Containers whose PID 1 is not an init reap orphans late or never; then both
        `pg_ctl status` and the new postmaster's lock-file check see the dead one as alive.
        Wait briefly for the reaper, then drop the stale lock file ourselves (the server's
        shared-memory interlock still refuses to start if old backends linger).
        """
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = pid_file.read_text().split()[0]
        except (OSError, IndexError):
            return False
        proc_stat = Path(f"/proc/{pid}/stat")
        deadline = time.monotonic() + 5
        while True:
            try:
                state = proc_stat.read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                return True  # reaped while we waited: it was dead
            except (OSError, IndexError):
                return False  # no /proc: trust pg_ctl
            if state != "Z":
                return False
            if time.monotonic() > deadline:
                logger.warning("postmaster %s is dead but unreaped; removing %s", pid, pid_file)
                pid_file.unlink(missing_ok=True)
                return True
            time.sleep(0.1)

    def _running_port(self) -> int | None:
        """The port of a server already running on this data dir, from its postmaster.pid."""
        if not self._is_running():
            return None
        lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        return int(lines[3])

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = (self.data_dir / "server.log").read_text(errors="replace")
        except OSError:
            return "(no server.log)"
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self) -> None:
        """pg_ctl -w only proves the postmaster is up; wait until a real client gets in."""
        deadline = time.monotonic() + _READY_TIMEOUT_S
        delay = 0.02
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2) as conn:
                    conn.execute("select 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise EmbeddedPostgresError(
                        f"server on {self.url} not accepting connections: {exc}\n{self._log_tail()}"
                    ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


@contextmanager
def temporary_server(prefix: str, *, fast_unsafe: bool) -> Iterator[str]:
    """A throw-away server in a fresh directory under /tmp (tests, benchmarks); its URL."""
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix=prefix))
    base.chmod(0o755)  # the postgres account must reach the data dir when we are root
    pg = EmbeddedPostgres(base / "data", fast_unsafe=fast_unsafe)
    try:
        yield pg.start()
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)
