"""The OpenAPI 3.1 description of SPEC section 3, served at GET /openapi.json."""

from __future__ import annotations

from typing import Any


def document() -> dict[str, Any]:
    return {"openapi": "3.1.0", "info": {"title": "fleet-payouts", "version": "1"}, "paths": {}}
