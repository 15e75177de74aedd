"""The console's sign-in under abuse, against a real `serve` over TCP: what anyone who can
reach the port can do to it without a token (found by the attack on the merged service).

Sign-in is the one console action open to everyone, and each attempt writes a chained
audit entry; a flood of it must neither take the presses' connections nor get more
guesses than the limit.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.ops import roles
from service.web.console import pages
from tests.conftest import TEMPLATE, create_database, drop_database, service_env, with_user
from tests.helpers.api import park_headers
from tests.helpers.console import SECRET, csrf_of
from tests.helpers.procs import cluster, wait_for

pytestmark = pytest.mark.e2e

WRONG_TOKEN = "not-the-admin-token-0123456789"


@pytest.fixture
def api(pg_server_url: str, template_url: str, emulator_url: str, tmp_path: Path) -> Iterator[str]:
    """A real `serve` with the console on, on a database of its own (a fresh address count)."""
    url = create_database(pg_server_url, template=TEMPLATE)
    try:
        env = service_env(with_user(url, roles.ROLES.app), emulator_url, CONSOLE_SECRET=SECRET)
        with cluster(env, tmp_path) as c:
            yield c.api()
    finally:
        drop_database(pg_server_url, url)


def failed_sign_ins(
    api: str, attempts: int, codes: Counter[int], stop: threading.Event | None = None
) -> None:
    """`attempts` concurrent sign-ins with a wrong token from one address (each repeated
    until `stop` is set, when given), their answers' status codes counted in `codes`."""
    with httpx.Client(base_url=api, timeout=30) as first:
        form = first.get("/console/sign-in")
        csrf, cookies = csrf_of(form.text), dict(form.cookies)

    together = threading.Barrier(attempts)

    def attacker(i: int) -> None:
        with httpx.Client(base_url=api, timeout=30, cookies=cookies) as client:
            client.get("/ping")  # connected: the first attempts leave at once
            together.wait(timeout=60)
            while True:
                r = client.post(
                    "/console/sign-in",
                    data={"csrf": csrf, "user_id": f"mallory-{i}", "token": WRONG_TOKEN},
                )
                codes[r.status_code] += 1
                if stop is None or stop.is_set():
                    return

    threads = [threading.Thread(target=attacker, args=(i,)) for i in range(attempts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)


def test_concurrent_failed_sign_ins_get_no_more_guesses_than_the_limit(api: str) -> None:
    """Forty wrong-token sign-ins sent at once from one address are answered 401 exactly
    MAX_FAILED_SIGN_INS times and 429 for the rest (concurrent attempts each counted the
    failures before any was written, and 15 got a guess)."""
    codes: Counter[int] = Counter()
    failed_sign_ins(api, 40, codes)
    assert {401: pages.MAX_FAILED_SIGN_INS, 429: 40 - pages.MAX_FAILED_SIGN_INS} == dict(codes)


def test_a_sign_in_flood_leaves_the_presses_connections_alone(api: str) -> None:
    """While forty clients without a token keep sending failed sign-ins, park-scoped reads
    (the presses' pool) answer at once: each in under a second and none 503 (a locked-out
    attempt held a press connection through its one-second delay: reads waited 2 s, 503)."""
    stop = threading.Event()
    flood: Counter[int] = Counter()
    flooder = threading.Thread(target=failed_sign_ins, args=(api, 40, flood, stop))
    flooder.start()
    answers: list[tuple[int, float]] = []
    try:
        # Under way: the address is locked out and the attempts keep coming.
        wait_for(lambda: flood[429] >= 40, timeout=60, what="the flood locked out")
        with httpx.Client(base_url=api, timeout=30) as client:
            for _ in range(20):
                started = time.monotonic()
                r = client.get("/v1/payouts/instant/availability", headers=park_headers("p1"))
                answers.append((r.status_code, time.monotonic() - started))
    finally:
        stop.set()
        flooder.join(timeout=120)
    assert [] == [(s, t) for s, t in answers if s == 503 or t >= 1.0], answers
