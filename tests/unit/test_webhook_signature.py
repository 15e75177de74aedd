"""The webhook signature of SPEC section 3, against a vector computed outside Python."""

from __future__ import annotations

from service.events import webhooks

# printf '1700000000.{"id":"evt_1"}' | openssl dgst -sha256 -hmac whsec-test-0123456789abcdef
OPENSSL_VECTOR = "d2862aed4a65b135bcc94da62c06b132479f175f9f0a6d8b52f0a70793aba0e6"


def test_the_signature_is_hmac_sha256_of_time_dot_body() -> None:
    """sign() is t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>"> with the secret as key."""
    assert "t=1700000000,v1=" + OPENSSL_VECTOR == webhooks.sign(
        "whsec-test-0123456789abcdef", 1700000000, b'{"id":"evt_1"}'
    )
