"""Benchmark: the worker's HTTP client's CPU per Billing order, against a bare one.

    .venv/bin/python -m tests.bench.http_client [--posts 1500]

One keep-alive connection to the Billing emulator, the same POST /v1/payouts again and
again (one key: Billing answers each copy alike), the caller's process CPU time per call:
httpx (what BillingClient ships) beside a bare asyncio + h11 client (no pool, no
timeouts, no redirects: the floor any client could reach). Issue 21: choose a client by
this before anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import h11
import httpx

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


def main(argv: Sequence[str] | None = None) -> int:
    """Print both clients' CPU per POST, twice, interleaved; 0 when measured."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.http_client")
    parser.add_argument("--posts", type=int, default=1500, help="calls per client per round")
    args = parser.parse_args(argv)
    with run_emulator() as url:
        balance = {"available": "1000000.00", "currency": "RUB"}
        httpx.put(f"{url}/admin/balances/bench-http", json=balance).raise_for_status()
        print(f"http client bench: {args.posts} POST /v1/payouts per client per round")
        for round_ in (1, 2):
            a = asyncio.run(with_httpx(url, args.posts))
            b = asyncio.run(with_h11(url, args.posts))
            print(
                f"  round {round_}: httpx {1000 * a:.3f} ms CPU per POST; bare h11 "
                f"{1000 * b:.3f} ms (httpx / bare = {a / b:.2f})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
