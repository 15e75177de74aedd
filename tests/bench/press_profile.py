"""Profile one API process under the bench's press load, on pinned cores.

    python -m tests.bench.press_profile [--seconds 10] [--spy out.txt] [--api-core 1]

The API runs alone on one core (`taskset`); wrk, PostgreSQL's backends and py-spy
share the other, so the API's CPU time and its profile are its own (an unpinned
profile on two shared cores misattributes time). Prints presses/s, the API's CPU
per accepted press, its share of its core, and wrk's latency; with --spy, py-spy's
collapsed stacks (sampled without stopping the process) and a summary by module and
by function. Needs Linux, taskset and wrk; py-spy only for --spy.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.bench import service as bench

PIN = shutil.which("taskset") or "taskset"


def _ports_from(first: int, last: int) -> None:
    """Take every port (PostgreSQL, emulator, API) from first..last (PROFILE_PORTS=a-b)."""
    from fleet_payouts_devkit import postgres
    from fleet_payouts_devkit.processes import port_is_free

    candidates = iter(range(first, last + 1))

    def take() -> int:
        for port in candidates:
            if port_is_free(port):
                return port
        raise RuntimeError(f"no free port left in {first}-{last}")

    bench.free_port = take  # type: ignore[attr-defined]
    postgres.free_port = take  # type: ignore[attr-defined]


def _pinned_wrk(workdir: Path, core: int) -> str:
    """A wrk that runs on `core` only (the bench's _wrk_press takes a program path)."""
    wrapper = workdir / "wrk-pinned"
    wrapper.write_text(f'#!/bin/sh\nexec {PIN} -c {core} {shutil.which("wrk")} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def pg_cpu(data_dir: Path, before: dict[int, float]) -> tuple[float, dict[int, float]]:
    """CPU the server used since `before`, and the new reading."""
    return bench.pg_cpu_since(data_dir, before) or 0.0, bench.pg_processes(data_dir)


async def _sample_waits(url: str, seconds: float) -> collections.Counter[str]:
    """What the API's backends are doing, sampled every 5 ms: state and wait event."""
    found: collections.Counter[str] = collections.Counter()
    async with await bench._connect(url) as conn:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            cur = await conn.execute(
                "SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
                "WHERE application_name = 'fleet-payouts-api' AND pid <> pg_backend_pid()"
            )
            for state, kind, event in await cur.fetchall():
                found[f"{state}/{kind}/{event}" if kind else f"{state}/on CPU"] += 1
            await asyncio.sleep(0.005)
    return found


def _app_durations(log: Path) -> list[float]:
    """duration_ms of every press's access line in an API log, in order."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if '"route": "/v1/payouts/instant"' in line:
            with contextlib.suppress(ValueError, KeyError):
                found.append(float(json.loads(line)["duration_ms"]))
    return found


def summarize(collapsed: Path, top: int = 25) -> str:
    """Self and inclusive sample shares of py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    modules: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
        # The innermost frame's file: where the CPU went, by library.
        where = frames[-1].rpartition("(")[2].rstrip(")")
        module = where.split("site-packages/")[-1].split(":")[0]
        modules[module.split("/")[0] if "site-packages" in where else module] += n
    if not total:
        return "no samples"
    lines = [f"{total} samples", "-- self, by file or package --"]
    lines += [f"{100 * n / total:5.1f}%  {m}" for m, n in modules.most_common(top)]
    lines += ["-- self, by function --"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["-- inclusive, by function --"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top * 2)]
    return "\n".join(lines)


async def run(args: argparse.Namespace, server_url: str, workdir: Path) -> None:
    b = bench.Bench(server_url, workdir, 1.0, False)
    try:
        await b.setup()
        url = await b.create_db("profile")
        parks = 3000 * (args.seconds + 3)
        async with await bench._connect(url) as conn:
            await conn.execute(
                "INSERT INTO parks (park_id, instant_payouts_enabled) "
                "SELECT 'svc-' || g, true FROM generate_series(1, %s) g",
                (parks,),
            )
            await conn.execute("ANALYZE")
        pin = [PIN, "-c", str(args.api_core)] if args.api_core >= 0 else []
        apis: list[tuple[bench.Child, str]] = []
        for _ in range(args.apis):
            port = bench.free_port()  # type: ignore[attr-defined]  # patched by _ports_from
            api = await b.spawn(
                f"api-{port}",
                [*pin, sys.executable]
                + (["-m", "cProfile", "-o", args.cprofile] if args.cprofile else [])
                + ["-m", "service", "serve", "--port", str(port)],
                b.child_env(url, **dict(kv.split("=", 1) for kv in args.env)),
            )
            apis.append((api, f"http://127.0.0.1:{port}"))
        for api, api_url in apis:
            await b._wait_http(api, f"{api_url}/ready")
        wrk = _pinned_wrk(workdir, args.other_core) if args.other_core >= 0 else "wrk"
        lua = workdir / "instant.lua"
        lua.write_text(bench.WRK_LUA)
        # Each API gets its share of the clients, and parks of its own.
        bench.CLIENTS = max(1, args.clients // args.apis)
        share = parks // args.apis
        warm = 1000 * 2

        async def load(first: int, seconds: int) -> list[bench.WrkPresses]:
            return list(
                await asyncio.gather(
                    *(
                        bench._wrk_press(
                            wrk,
                            lua,
                            u,
                            first=first + i * share,
                            parks=share - warm,
                            seconds=seconds,
                        )
                        for i, (_, u) in enumerate(apis)
                    )
                )
            )

        await load(1, 1)
        api = apis[0][0]
        spy = None
        if args.spy:
            spy = await asyncio.create_subprocess_exec(
                *([PIN, "-c", str(args.other_core)] if args.other_core >= 0 else []),
                shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--nonblocking",
                "-r",
                "250",
                "-f",
                "raw",
                "-d",
                str(args.seconds),
                "-o",
                args.spy,
                "-p",
                str(api.proc.pid),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        pg_dir = workdir / "pg"
        if args.pg_core is not None:
            # Backends forked later inherit the postmaster's affinity.
            for pid in bench.pg_processes(pg_dir):
                os.sched_setaffinity(pid, {args.pg_core})
        _, pg_before = pg_cpu(pg_dir, {})
        sampler = asyncio.create_task(_sample_waits(url, args.seconds))
        cpu_before = sum(a.cpu_seconds() for a, _ in apis)
        runs = await load(warm + 1, args.seconds)
        api_cpu = sum(a.cpu_seconds() for a, _ in apis) - cpu_before
        pg_used, _ = pg_cpu(pg_dir, pg_before)
        waits = await sampler
        if spy is not None:
            await spy.wait()
        await b.stop(*(a for a, _ in apis))
        accepted = sum(r.accepted for r in runs)
        seconds = max(r.seconds for r in runs)
        others: collections.Counter[int] = collections.Counter()
        for r in runs:
            others.update(r.others)
        print(
            f"presses: {accepted} accepted in {seconds:.1f} s = {accepted / seconds:.0f}/s "
            f"({args.apis} API process(es), {bench.CLIENTS} clients each); others {dict(others)}"
        )
        print(
            f"API CPU: {1000 * api_cpu / max(1, accepted):.3f} ms per press, "
            f"{100 * api_cpu / seconds / args.apis:.0f}% of a core per process; wrk p50 "
            + ", ".join(f"{r.p50_ms:.2f}" for r in runs)
            + " ms, p99 "
            + ", ".join(f"{r.p99_ms:.2f}" for r in runs)
            + " ms"
        )
        wrk_cpu = sum(r.cpu_seconds for r in runs)
        print(
            f"PostgreSQL CPU: {1000 * pg_used / max(1, accepted):.3f} ms per press; "
            f"wrk CPU {1000 * wrk_cpu / max(1, accepted):.3f} ms per press"
        )
        total = sum(waits.values()) or 1
        print(
            "API backends' states (sampled): "
            + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in waits.most_common(8))
        )
        if args.keep_log:
            shutil.copy(api.log, args.keep_log)
        inside = _app_durations(api.log)[-runs[0].accepted :]
        if inside:
            inside.sort()
            print(
                f"inside the app (access line duration_ms): p50 {inside[len(inside) // 2]:.2f} ms "
                f"p99 {inside[int(len(inside) * 0.99)]:.2f} ms"
            )
        if args.pgbench:
            await _pgbench(b, url, pg_dir, args.seconds)
        if args.spy:
            print(summarize(Path(args.spy)))
    finally:
        await b.close()


async def _pgbench(b: bench.Bench, url: str, pg_dir: Path, seconds: int) -> None:
    """pgbench on the bench's five-statement transaction and on the one-call press."""
    settings = b.settings(url)
    scripts = {
        "five statements": bench.pgbench_script(settings.payout_max_amount),
        "one call": bench.pgbench_press_script(
            settings.payout_max_amount,
            settings.payout_min_amount,
            settings.instant_cooldown.total_seconds(),
        ),
    }
    for label, text in scripts.items():
        db_url = await b.create_db("pgb")
        async with await bench._connect(db_url) as conn:
            await conn.execute(
                "INSERT INTO parks (park_id, instant_payouts_enabled) "
                "SELECT 'pgb-' || (c::bigint * %s + g), true "
                "FROM generate_series(0, %s) c, generate_series(1, %s) g",
                (bench.PGB_STRIDE, bench.CLIENTS - 1, 2500 * (seconds + 1)),
            )
            await conn.execute("ANALYZE")
        script = b.workdir / "press.pgbench"
        script.write_text(text)
        _, before = pg_cpu(pg_dir, {})
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = await bench.run_pgbench(script, db_url, seconds)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        used, _ = pg_cpu(pg_dir, before)
        own = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime
        n = max(1, result.transactions)
        print(
            f"pgbench ({label}): {result.tps:.0f} tps, {result.failed} failed; "
            f"PostgreSQL CPU {1000 * used / n:.3f} ms per transaction, "
            f"pgbench's own {1000 * own / n:.3f} ms"
        )
        await b.drop_db(db_url)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--spy", help="write py-spy's collapsed stacks here")
    parser.add_argument("--api-core", type=int, default=1, help="-1: not pinned")
    parser.add_argument("--other-core", type=int, default=0, help="-1: wrk not pinned")
    parser.add_argument("--apis", type=int, default=1, help="API processes, one port each")
    parser.add_argument("--clients", type=int, default=bench.CLIENTS)
    parser.add_argument("--cprofile", help="run the API under cProfile, stats written here")
    parser.add_argument("--pg-core", type=int, help="pin PostgreSQL's processes to this core")
    parser.add_argument("--keep-log", help="copy the API's log here")
    parser.add_argument("--pgbench", action="store_true", help="pgbench baselines too")
    parser.add_argument("--env", action="append", default=[], help="NAME=value for the API")
    args = parser.parse_args()
    ports = os.environ.get("PROFILE_PORTS", "")
    if ports:
        first, _, last = ports.partition("-")
        _ports_from(int(first), int(last))
    workdir = Path(tempfile.mkdtemp(dir="/tmp", prefix="fp-press-"))
    workdir.chmod(0o755)
    try:
        with bench._server(workdir) as (url, _):
            asyncio.run(run(args, url, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
