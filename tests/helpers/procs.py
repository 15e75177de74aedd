"""Start the service's own processes (API, worker) for end-to-end tests.

Each process writes its log to a file under the test's directory; on a
failure the tail of every log is printed, which is usually the whole story.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from fleet_payouts_devkit.processes import free_port

from tests.helpers.emulator import REPO_ROOT


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except AssertionError:
            raise  # the condition itself decided the wait is hopeless
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what or condition}: {last_exc!r}"
    )


class Proc:
    """One `python -m service ...` child with its log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = args
        self.log = log
        self._log_file = log.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "service", *args],
            env=env,
            cwd=REPO_ROOT,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._terminated = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (a host dying)."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)

    def terminate(self) -> None:
        """SIGTERM, once (a second one would stop the process at once, not gracefully)."""
        if self.alive() and not self._terminated:
            self.popen.send_signal(signal.SIGTERM)
        self._terminated = True

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (unless `terminate` sent it), then SIGKILL if still running after `timeout`."""
        self.terminate()
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._log_file.close()

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class Cluster:
    """The API and workers of one test, all stopped (and their logs shown) at the end."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self.api_url: str | None = None

    def api(self, **env: str) -> str:
        port = free_port()
        proc = self._spawn(["serve", "--port", str(port)], f"api-{port}", env)
        url = f"http://127.0.0.1:{port}"
        wait_for(
            lambda: (
                (proc.alive() and httpx.get(f"{url}/ping", timeout=1).status_code == 200)
                or _dead(proc)
            ),
            what=f"API on {url}",
        )
        self.api_url = url
        return url

    def worker(self, concurrency: int = 10, metrics_port: int | None = None, **env: str) -> Proc:
        index = sum(1 for p in self.procs if p.args[0] == "worker")
        args = ["worker", "--concurrency", str(concurrency)]
        if metrics_port is not None:
            args += ["--metrics-port", str(metrics_port)]
        return self._spawn(args, f"worker-{index}", env)

    def _spawn(self, args: list[str], name: str, env: dict[str, str]) -> Proc:
        proc = Proc(args, {**self.env, **env}, self.log_dir / f"{name}.log")
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """SIGTERM to every process at once, then wait for each: they stop side by side."""
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name} ---\n{p.tail()}" for p in self.procs)


def _dead(proc: Proc) -> bool:
    if not proc.alive():
        raise AssertionError(f"{proc.args} exited with {proc.popen.returncode}:\n{proc.tail()}")
    return False


@contextlib.contextmanager
def cluster(env: dict[str, str], log_dir: Path) -> Iterator[Cluster]:
    c = Cluster(env, log_dir)
    try:
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()
