"""Benchmark: the worker's HTTP client's CPU per Billing order, against the alternatives.

    .venv/bin/python -m tests.bench.http_client [--posts 1500]

One keep-alive connection to the Billing emulator, the same POST /v1/payouts again and
again (one key: Billing answers each copy alike), the caller's process CPU time per call,
on uvloop (the worker's loop), each client with a timeout as BillingClient sets one:
httpx (what BillingClient ships), httpcore direct (httpx's own transport, without
httpx's request and response models), aiohttp (C HTTP parser; connection pool and
timeouts of its own), and a bare asyncio + h11 client (no pool, no timeouts, no
redirects: the floor any client could reach). Issue 21: choose a client by this.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import h11
import httpcore
import httpx
import uvloop

from tests.helpers.emulator import run_emulator

BODY = {"park_id": "bench-http", "amount": "10.00", "currency": "RUB", "params": {"iban": "X"}}
KEY = "bench-http-1"


async def cpu_per_call(call: Callable[[], Awaitable[Any]], n: int) -> float:
    """Process CPU seconds per call, after one warm-up call."""
    await call()
    started = time.process_time()
    for _ in range(n):
        await call()
    return (time.process_time() - started) / n


async def with_httpx(url: str, n: int) -> float:
    async with httpx.AsyncClient(base_url=url) as client:

        async def post() -> Any:
            r = await client.post("/v1/payouts", json=BODY, headers={"Idempotency-Key": KEY})
            return r.json()

        return await cpu_per_call(post, n)


async def with_httpcore(url: str, n: int) -> float:
    data = json.dumps(BODY).encode()
    headers = [
        (b"Content-Type", b"application/json"),
        (b"Content-Length", str(len(data)).encode()),
        (b"Idempotency-Key", KEY.encode()),
    ]
    timeouts = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}
    async with httpcore.AsyncConnectionPool(max_connections=50) as pool:

        async def post() -> Any:
            r = await pool.request(
                "POST",
                f"{url}/v1/payouts",
                headers=headers,
                content=data,
                extensions={"timeout": timeouts},
            )
            return json.loads(r.content)

        return await cpu_per_call(post, n)


async def with_aiohttp(url: str, n: int) -> float:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=5.0)
    connector = aiohttp.TCPConnector(limit=50)
    async with aiohttp.ClientSession(url, timeout=timeout, connector=connector) as session:

        async def post() -> Any:
            async with session.post(
                "/v1/payouts", json=BODY, headers={"Idempotency-Key": KEY}
            ) as r:
                return json.loads(await r.read())

        return await cpu_per_call(post, n)


async def with_h11(url: str, n: int) -> float:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    reader, writer = await asyncio.open_connection(host, port)
    conn = h11.Connection(h11.CLIENT)

    async def post() -> Any:
        data = json.dumps(BODY).encode()
        headers = [
            ("Host", host),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Idempotency-Key", KEY),
        ]
        request = h11.Request(method="POST", target="/v1/payouts", headers=headers)
        writer.write(
            conn.send(request) + conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage())
        )
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        conn.start_next_cycle()
        return json.loads(body)

    try:
        return await cpu_per_call(post, n)
    finally:
        writer.close()


CLIENTS: dict[str, Callable[[str, int], Coroutine[Any, Any, float]]] = {
    "httpx": with_httpx,
    "httpcore": with_httpcore,
    "aiohttp": with_aiohttp,
    "bare h11": with_h11,
}


def measure(url: str, posts: int) -> dict[str, float]:
    """CPU seconds per POST of each client, one after another on a fresh uvloop."""
    return {name: uvloop.run(client(url, posts)) for name, client in CLIENTS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Print every client's CPU per POST, twice, interleaved; 0 when measured."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.http_client")
    parser.add_argument("--posts", type=int, default=1500, help="calls per client per round")
    args = parser.parse_args(argv)
    with run_emulator() as url:
        balance = {"available": "1000000000.00", "currency": "RUB"}
        httpx.put(f"{url}/admin/balances/bench-http", json=balance).raise_for_status()
        print(f"http client bench: {args.posts} POST /v1/payouts per client per round (uvloop)")
        for round_ in (1, 2):
            cpu = measure(url, args.posts)
            floor = cpu["bare h11"]
            print(
                f"  round {round_}, ms CPU per POST: "
                + "; ".join(
                    f"{name} {1000 * s:.3f} ({s / floor:.1f}x bare)" for name, s in cpu.items()
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
