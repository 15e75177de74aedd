"""WEBHOOK_URL and WEBHOOK_SECRET (SPEC section 5): off by default, the secret required with
the URL, refusals naming the variable and never echoing the secret."""

from __future__ import annotations

import pytest

from service.core.settings import ConfigError, Secret, load

BASE = {"DATABASE_URL": "postgresql://127.0.0.1/fleet", "BILLING_URL": "http://127.0.0.1:8081"}
SECRET = "whsec-0123456789abcdef"


def test_webhooks_are_off_by_default() -> None:
    """Without WEBHOOK_URL there is no webhook URL nor secret, even if a secret is set."""
    s = load({**BASE, "WEBHOOK_SECRET": SECRET})
    assert (None, None) == (s.webhook_url, s.webhook_secret)


def test_url_and_secret_are_read() -> None:
    """WEBHOOK_URL with a WEBHOOK_SECRET turns webhooks on; neither appears in repr."""
    s = load({**BASE, "WEBHOOK_URL": "https://opteum.example/hooks", "WEBHOOK_SECRET": SECRET})
    assert ("https://opteum.example/hooks", Secret(SECRET)) == (s.webhook_url, s.webhook_secret)
    assert SECRET not in repr(s)


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"WEBHOOK_URL": "ftp://opteum.example"}, "WEBHOOK_URL"),
        ({"WEBHOOK_URL": "http://"}, "WEBHOOK_URL"),
        ({"WEBHOOK_URL": "https://opteum.example/hooks"}, "WEBHOOK_SECRET"),
        (
            {"WEBHOOK_URL": "https://opteum.example/hooks", "WEBHOOK_SECRET": "short"},
            "WEBHOOK_SECRET",
        ),
    ],
    ids=["scheme", "no-host", "no-secret", "short-secret"],
)
def test_bad_webhook_settings_name_the_variable(values: dict[str, str], variable: str) -> None:
    """A bad URL, or a URL without a secret of 16+ characters, is a ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        load({**BASE, **values})
    assert variable == info.value.variable
    assert values.get("WEBHOOK_SECRET", "\0") not in str(info.value)
