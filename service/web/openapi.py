"""The OpenAPI 3.1 description of SPEC section 3, served at GET /openapi.json.

Written by hand from the SPEC, not derived from the handlers: it is the
contract the handlers are held to. tests/integration/test_openapi.py keeps
it in step with the routes (every route described, every described
operation routed), and the fuzz test checks every answer against it.
"""

from __future__ import annotations

import functools
from typing import Any

from service.core.codes import Code
from service.payouts import wire
from service.payouts.model import EVENT_TYPES, Kind, Status
from service.web.errors import STATUS
from service.web.params import HOLD_REASON_PATTERN

# --- reusable pieces -----------------------------------------------------------------

PARK_ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$", "examples": ["park-alpha"]}
VISIBLE_ASCII = {"type": "string", "pattern": "^[!-~]{1,128}$"}
MONEY = {"type": "string", "pattern": r"^[0-9]+\.[0-9]{2}$", "examples": ["1500.00"]}
TIMESTAMP = {"type": "string", "format": "date-time"}
# What service.payouts.model.parse_money takes: above zero, at most 2 fractional digits.
POSITIVE_AMOUNT = {
    "type": "string",
    "pattern": r"^([1-9][0-9]{0,15}(\.[0-9]{1,2})?|0\.(0[1-9]|[1-9][0-9]?))$",
    "examples": ["100.00"],
}
# No NUL (PostgreSQL's text and jsonb cannot hold it), in keys and strings at any depth.
NO_NUL = r"^[^\u0000]*$"
KINDS = tuple(str(k) for k in Kind)
# What service.parks.fees.parse_fee_percent / parse_fee_fixed take: 0-100, and zero or more.
PERCENT = {
    "type": "string",
    "pattern": r"^(100(\.0{1,2})?|(0|[1-9][0-9]?)(\.[0-9]{1,2})?)$",
    "examples": ["1.00"],
}
FEE_MONEY = {
    "type": "string",
    "pattern": r"^(0|[1-9][0-9]{0,15})(\.[0-9]{1,2})?$",
    "examples": ["0.00"],
}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(properties: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required else [],
        "additionalProperties": False,
    }


STORABLE_OBJECT = {
    "type": "object",
    "propertyNames": {"pattern": NO_NUL},
    "additionalProperties": {"$ref": "#/components/schemas/StorableJson"},
}
FEE = _object({"percent": PERCENT, "fixed": FEE_MONEY})


def _wire(field: wire.Field) -> dict[str, Any]:
    """A payout field's schema, by its wire type (service/payouts/wire.py)."""
    if field.type is wire.Type.APPROVAL:
        schema = _object({f.name: _wire(f) for f in wire.APPROVAL_FIELDS})
    else:
        by_type: dict[wire.Type, dict[str, Any]] = {
            wire.Type.UUID: {"type": "string", "format": "uuid"},
            wire.Type.PARK_ID: PARK_ID,
            wire.Type.KIND: {"type": "string", "enum": list(KINDS)},
            # The statuses are model.Status's: one list for the API, the enum
            # and (by a test) the database.
            wire.Type.STATUS: {"type": "string", "enum": [str(s) for s in Status]},
            wire.Type.MONEY: MONEY,
            wire.Type.TEXT: {"type": "string"},
            wire.Type.TIMESTAMP: TIMESTAMP,
        }
        schema = by_type[field.type]
    schema = _nullable(schema) if field.nullable else schema
    return {**schema, "description": field.description} if field.description else schema


# The payout object, field by field as service/payouts/wire.py defines it.
PAYOUT = _object({f.name: _wire(f) for f in wire.PAYOUT_FIELDS})

SCHEMAS: dict[str, Any] = {
    "StorableJson": {
        "description": "Any JSON value PostgreSQL can store: no NUL in a string or a key.",
        "anyOf": [
            {"type": "string", "pattern": NO_NUL},
            {"type": ["number", "boolean", "null"]},
            {"type": "array", "items": {"$ref": "#/components/schemas/StorableJson"}},
            STORABLE_OBJECT,
        ],
    },
    "Error": {
        "type": "object",
        "description": "The one error shape; `code` is stable, `message` is for people.",
        "properties": {
            "code": {"type": "string", "enum": sorted(STATUS)},
            "message": {"type": "string"},
            "details": {"type": "object"},
        },
        "required": ["code", "message", "details"],
        "additionalProperties": False,
    },
    "Payout": PAYOUT,
    "Event": _object(
        {
            "id": {"type": "string", "description": "Opaque; consumers dedupe by it."},
            "type": {
                "type": "string",
                "enum": list(EVENT_TYPES),
            },
            "created_at": TIMESTAMP,
            "payout": {"$ref": "#/components/schemas/Payout"},
        }
    ),
    "EventPage": _object(
        {
            "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
            "next_cursor": {
                "type": "string",
                "description": "Always given: pass it back as `after` for what commits next.",
            },
        }
    ),
    "PayoutPage": _object(
        {
            "payouts": {"type": "array", "items": {"$ref": "#/components/schemas/Payout"}},
            "next_cursor": _nullable({"type": "string"}),
        }
    ),
    "InstantRequest": {
        **_object({"amount": POSITIVE_AMOUNT}, required=False),
        "description": "Empty, {}, or an amount: no amount pays all that is available, "
        "up to the limit.",
    },
    "Availability": _object(
        {
            "available": {"type": "boolean"},
            "reason": {
                "enum": [
                    None,
                    "cooldown_active",
                    "payout_in_progress",
                    "instant_payouts_disabled",
                    "park_on_hold",
                ]
            },
            "next_available_at": _nullable(TIMESTAMP),
            "max_amount": MONEY,
            "min_amount": MONEY,
            "cooldown_hours": {"type": "number"},
            "fee": _nullable(FEE),
            "details": {
                **_nullable(_object({"reason": {"enum": ["subscription_ended"]}})),
                "description": 'With reason instant_payouts_disabled: {"reason": '
                '"subscription_ended"} when the end date has passed, as the press says.',
            },
            "instant_payouts_until": _nullable(TIMESTAMP),
        }
    ),
    "Quote": _object(
        {
            "amount": MONEY,
            "fee_amount": _nullable(MONEY),
            "net_amount": _nullable(MONEY),
            "currency": {"type": "string"},
        }
    ),
    "ManualRequest": _object(
        {
            "park_id": PARK_ID,
            "amount": POSITIVE_AMOUNT,
            "reason": {
                "type": "string",
                "minLength": 1,
                "maxLength": 500,
                "pattern": HOLD_REASON_PATTERN,
            },
        }
    ),
    "Denial": _object(
        {
            "reason": {
                "type": "string",
                "minLength": 1,
                "maxLength": 500,
                "pattern": HOLD_REASON_PATTERN,
            }
        }
    ),
    "ParkUpdate": {
        **_object(
            {
                "instant_payouts_enabled": {"type": "boolean"},
                "periodic_payouts_enabled": {"type": "boolean"},
                "params": {
                    **STORABLE_OBJECT,
                    "description": "Passed through to Billing with each payout; JSON without "
                    "NUL characters, nested at most 32 levels.",
                },
                "hold": _nullable(
                    {
                        **_object(
                            {
                                "reason": {
                                    "type": "string",
                                    "minLength": 1,
                                    "maxLength": 500,
                                    "pattern": HOLD_REASON_PATTERN,
                                }
                            }
                        ),
                        "description": "Put the park on hold with a reason; null releases it.",
                    }
                ),
                "instant_fee": {
                    **_nullable(FEE),
                    "description": "The instant payout fee: percent (0-100) of the amount, "
                    "half-up to the cent, plus fixed; null: no fee.",
                },
                "instant_payouts_until": {
                    **_nullable(TIMESTAMP),
                    "description": "After it a press is refused (subscription_ended); null: never.",
                },
            },
            required=False,
        ),
        "description": "All fields optional; on update, what is left out stays as it is.",
    },
    "Park": _object(
        {
            "park_id": PARK_ID,
            "instant_payouts_enabled": {"type": "boolean"},
            "periodic_payouts_enabled": {"type": "boolean"},
            "params": {"type": "object"},
            "hold": _nullable(
                _object(
                    {
                        "reason": {"type": "string"},
                        "since": TIMESTAMP,
                        "by": _nullable({"type": "string"}),
                    }
                )
            ),
            "instant_fee": _nullable(FEE),
            "instant_payouts_until": _nullable(TIMESTAMP),
            "registered_at": TIMESTAMP,
            "last_payout_at": _nullable(TIMESTAMP),
            "next_periodic_payout_at": _nullable(TIMESTAMP),
        }
    ),
    "AuditEntry": _object(
        {
            "id": {"type": "integer"},
            "at": TIMESTAMP,
            "actor_type": {"type": "string", "enum": ["user", "admin", "system"]},
            "actor_id": _nullable({"type": "string"}),
            "park_id": _nullable({"type": "string"}),
            "action": {"type": "string"},
            "outcome": {"type": "string", "description": '"ok" or the refusal\'s error code'},
            "request_id": _nullable({"type": "string"}),
            "payout_id": _nullable({"type": "string", "format": "uuid"}),
            "details": {
                "type": "object",
                "description": 'What the action carried; user and admin actions add "client": '
                '{"ip", "user_agent"}.',
            },
        }
    ),
    "AuditPage": _object(
        {
            "entries": {"type": "array", "items": {"$ref": "#/components/schemas/AuditEntry"}},
            "next_cursor": _nullable({"type": "string"}),
        }
    ),
    "Status": _object({"status": {"type": "string"}}),
}

REQUEST_ID = {
    "name": "X-Request-Id",
    "in": "header",
    "required": False,
    "description": "Any value is accepted: echoed on the response when 1-128 visible ASCII "
    "characters, replaced by a generated id otherwise (a header cannot carry the rest back).",
    "schema": {"type": "string"},
}
PARK_HEADER = {
    "name": "X-Park-Id",
    "in": "header",
    "required": True,
    "description": "The park the Opteum user acts for.",
    "schema": PARK_ID,
}
USER_HEADER = {
    "name": "X-User-Id",
    "in": "header",
    "required": True,
    "description": "The acting user, for the audit log.",
    "schema": {**VISIBLE_ASCII, "examples": ["user-1"]},
}
KEY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": True,
    "schema": VISIBLE_ASCII,
}
LIMIT = {
    "name": "limit",
    "in": "query",
    "required": False,
    "schema": {"type": "integer", "minimum": 1, "maximum": 100},
}
CURSOR = {
    "name": "cursor",
    "in": "query",
    "required": False,
    "description": "A next_cursor this API issued; anything else is 400.",
    "schema": {"type": "string"},
}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _filter(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A filter of a listing: empty (`?park_id=`) is the same as absent, no filter."""
    either = {"anyOf": [schema, {"type": "string", "maxLength": 0}]}
    return {**_query(name, either), "description": "Empty or absent: no filter."}


def _path(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


RETRY_AFTER = {
    "description": "Seconds to wait before retrying.",
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}
X_REQUEST_ID_HEADER = {"description": "The request's id.", "schema": {"type": "string"}}


def _json(schema_name: str, description: str, **headers: Any) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"X-Request-Id": X_REQUEST_ID_HEADER, **headers},
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}
        },
    }


def _errors(*codes: Code) -> dict[str, Any]:
    """One response per status, its `code` restricted to the codes this operation answers."""
    by_status: dict[int, list[Code]] = {}
    for code in codes:
        by_status.setdefault(STATUS[code], []).append(code)
    responses: dict[str, Any] = {}
    for status, names in sorted(by_status.items()):
        headers = {"Retry-After": RETRY_AFTER} if status in (429, 503) else {}
        response = _json("Error", ", ".join(names), **headers)
        response["content"]["application/json"]["schema"] = {
            "allOf": [
                {"$ref": "#/components/schemas/Error"},
                {"properties": {"code": {"enum": names}}},
            ]
        }
        responses[str(status)] = response
    return responses


# Every authenticated operation can answer these; SPEC section 3.
AUTH_ERRORS = (Code.INVALID_REQUEST, Code.UNAUTHORIZED, Code.FORBIDDEN, Code.UNAVAILABLE)
API: list[dict[str, list[str]]] = [{"apiToken": []}]
ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]

PATHS: dict[str, Any] = {
    "/v1/payouts/instant": {
        "post": {
            "summary": "Pay out now: accept and queue an instant payout",
            "security": API,
            "parameters": [PARK_HEADER, USER_HEADER, KEY_HEADER, REQUEST_ID],
            "requestBody": {
                "required": False,
                "description": "At most 16 KiB.",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/InstantRequest"}}
                },
            },
            "responses": {
                "200": _json("Payout", "Replay of a payout that has moved on (same key, body)"),
                "202": _json("Payout", "Accepted and queued; or a replay still pending"),
                **_errors(
                    *AUTH_ERRORS,
                    Code.INSTANT_PAYOUTS_DISABLED,
                    Code.PARK_ON_HOLD,
                    Code.PARK_NOT_FOUND,
                    Code.PAYOUT_IN_PROGRESS,
                    Code.AMOUNT_ABOVE_LIMIT,
                    Code.AMOUNT_BELOW_MINIMUM,
                    Code.IDEMPOTENCY_KEY_REUSED,
                    Code.COOLDOWN_ACTIVE,
                ),
            },
        }
    },
    "/v1/payouts/instant/availability": {
        "get": {
            "summary": "Whether the park may press now, and until when it may not",
            "security": API,
            "parameters": [PARK_HEADER, REQUEST_ID],
            "responses": {
                "200": _json("Availability", "The button's state"),
                **_errors(*AUTH_ERRORS, Code.PARK_NOT_FOUND),
            },
        }
    },
    "/v1/payouts/instant/quote": {
        "get": {
            "summary": "What a press would order now: amount, fee and net for Billing's balance",
            "security": API,
            "parameters": [
                PARK_HEADER,
                _query("amount", POSITIVE_AMOUNT),
                REQUEST_ID,
            ],
            "responses": {
                "200": _json("Quote", "The split; nothing is created"),
                **_errors(*AUTH_ERRORS, Code.PARK_NOT_FOUND),
            },
        }
    },
    "/v1/payouts/{payout_id}": {
        "get": {
            "operationId": "getPayout",
            "summary": "One of the park's payouts",
            "security": API,
            "parameters": [
                _path("payout_id", {"type": "string", "format": "uuid"}),
                PARK_HEADER,
                REQUEST_ID,
            ],
            "responses": {
                "200": _json("Payout", "The payout"),
                **_errors(*AUTH_ERRORS, Code.PAYOUT_NOT_FOUND),
            },
        }
    },
    "/v1/payouts/{payout_id}/cancel": {
        "post": {
            "operationId": "cancelPayout",
            "summary": "Cancel a payout no worker has taken yet (audited)",
            "security": API,
            "parameters": [
                _path("payout_id", {"type": "string", "format": "uuid"}),
                PARK_HEADER,
                USER_HEADER,
                REQUEST_ID,
            ],
            "responses": {
                "200": _json("Payout", "Cancelled (also when it already was)"),
                **_errors(*AUTH_ERRORS, Code.PAYOUT_NOT_FOUND, Code.PAYOUT_NOT_CANCELLABLE),
            },
        }
    },
    "/v1/payouts": {
        "get": {
            "summary": "The park's payouts, newest first",
            "security": API,
            "parameters": [PARK_HEADER, LIMIT, CURSOR, REQUEST_ID],
            "responses": {
                "200": _json("PayoutPage", "A page of payouts"),
                **_errors(*AUTH_ERRORS),
            },
        }
    },
    "/v1/events": {
        "get": {
            "summary": "Payout events in commit order: one park's with X-Park-Id, else all",
            "security": API,
            "parameters": [
                {**PARK_HEADER, "required": False},
                {
                    "name": "after",
                    "in": "query",
                    "required": False,
                    "description": "A next_cursor this API issued; anything else is 400. "
                    "410 cursor_expired: events after it are no longer kept (or it is from "
                    "before a restore); resume from details.oldest_cursor.",
                    "schema": {"type": "string"},
                },
                LIMIT,
                REQUEST_ID,
            ],
            "responses": {
                "200": _json("EventPage", "Events committed after the cursor (maybe none)"),
                **_errors(*AUTH_ERRORS, Code.CURSOR_EXPIRED),
            },
        }
    },
    "/v1/parks/{park_id}": {
        "put": {
            "summary": "Register or update a park (audited)",
            "security": ADMIN,
            "parameters": [_path("park_id", PARK_ID), USER_HEADER, REQUEST_ID],
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ParkUpdate"}}
                },
            },
            "responses": {
                "200": _json("Park", "Updated"),
                "201": _json("Park", "Registered"),
                **_errors(*AUTH_ERRORS),
            },
        },
        "get": {
            "summary": "A registered park",
            "security": ADMIN,
            "parameters": [_path("park_id", PARK_ID), REQUEST_ID],
            "responses": {
                "200": _json("Park", "The park"),
                **_errors(*AUTH_ERRORS, Code.PARK_NOT_FOUND),
            },
        },
    },
    "/v1/admin/payouts": {
        "post": {
            "summary": "Request a manual payout; a second admin approves it (audited)",
            "security": ADMIN,
            "parameters": [USER_HEADER, KEY_HEADER, REQUEST_ID],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ManualRequest"}}
                },
            },
            "responses": {
                "200": _json("Payout", "Replay: same key and body"),
                "201": _json("Payout", "Created, awaiting approval"),
                **_errors(
                    *AUTH_ERRORS,
                    Code.PARK_NOT_FOUND,
                    Code.AMOUNT_ABOVE_LIMIT,
                    Code.AMOUNT_BELOW_MINIMUM,
                    Code.APPROVAL_PENDING,
                    Code.IDEMPOTENCY_KEY_REUSED,
                ),
            },
        },
        "get": {
            "summary": "Every park's payouts, newest first, filtered (the approvals queue)",
            "security": ADMIN,
            "parameters": [
                _filter("park_id", PARK_ID),
                _filter("status", {"type": "string", "enum": [str(s) for s in Status]}),
                _filter("kind", {"type": "string", "enum": list(KINDS)}),
                _filter("since", TIMESTAMP),
                _filter("until", TIMESTAMP),
                LIMIT,
                CURSOR,
                REQUEST_ID,
            ],
            "responses": {
                "200": _json("PayoutPage", "A page of payouts"),
                **_errors(*AUTH_ERRORS),
            },
        },
    },
    "/v1/admin/payouts/{payout_id}/approve": {
        "post": {
            "summary": "Approve a manual payout: pending, its job enqueued (another admin only)",
            "security": ADMIN,
            "parameters": [
                _path("payout_id", {"type": "string", "format": "uuid"}),
                USER_HEADER,
                REQUEST_ID,
            ],
            "responses": {
                "200": _json("Payout", "Approved"),
                **_errors(
                    *AUTH_ERRORS,
                    Code.PAYOUT_NOT_FOUND,
                    Code.SELF_APPROVAL_FORBIDDEN,
                    Code.PARK_ON_HOLD,
                    Code.PAYOUT_IN_PROGRESS,
                    Code.PAYOUT_NOT_PENDING_APPROVAL,
                    Code.AMOUNT_ABOVE_LIMIT,
                ),
            },
        }
    },
    "/v1/admin/payouts/{payout_id}/deny": {
        "post": {
            "summary": "Deny a manual payout, with a reason",
            "security": ADMIN,
            "parameters": [
                _path("payout_id", {"type": "string", "format": "uuid"}),
                USER_HEADER,
                REQUEST_ID,
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Denial"}}
                },
            },
            "responses": {
                "200": _json("Payout", "Denied"),
                **_errors(*AUTH_ERRORS, Code.PAYOUT_NOT_FOUND, Code.PAYOUT_NOT_PENDING_APPROVAL),
            },
        }
    },
    "/v1/audit": {
        "get": {
            "summary": "Audit entries, newest first, filtered",
            "security": ADMIN,
            "parameters": [
                _filter("park_id", PARK_ID),
                _filter("actor_id", VISIBLE_ASCII),
                _filter("action", VISIBLE_ASCII),
                _filter("since", TIMESTAMP),
                _filter("until", TIMESTAMP),
                {**LIMIT, "description": "1-100, default 50"},
                CURSOR,
                REQUEST_ID,
            ],
            "responses": {
                "200": _json("AuditPage", "A page of entries"),
                **_errors(*AUTH_ERRORS),
            },
        }
    },
    "/ping": {
        "get": {
            "summary": "200 while the process runs",
            "security": [],
            "responses": {"200": _json("Status", "Alive")},
        }
    },
    "/ready": {
        "get": {
            "summary": "200 when the database answers; 503 otherwise and from SIGTERM on",
            "security": [],
            "responses": {
                "200": _json("Status", "Ready"),
                **_errors(Code.UNAVAILABLE),
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus text format (SPEC section 6)",
            "security": [],
            "responses": {
                "200": {
                    "description": "Metrics",
                    "headers": {"X-Request-Id": X_REQUEST_ID_HEADER},
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This description",
            "security": [],
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "headers": {"X-Request-Id": X_REQUEST_ID_HEADER},
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    },
}


# What a client does next with a payout it was handed: read it, cancel it (for
# people, and for schemathesis's stateful phase, which follows links).
_PAYOUT_LINKS = {
    "GetPayout": {
        "operationId": "getPayout",
        "parameters": {
            "path.payout_id": "$response.body#/id",
            "header.X-Park-Id": "$response.body#/park_id",
        },
    },
    "CancelPayout": {
        "operationId": "cancelPayout",
        "parameters": {
            "path.payout_id": "$response.body#/id",
            "header.X-Park-Id": "$response.body#/park_id",
        },
    },
}
for _path_name, _method, _status in (
    ("/v1/payouts/instant", "post", "200"),
    ("/v1/payouts/instant", "post", "202"),
    ("/v1/payouts/{payout_id}", "get", "200"),
):
    PATHS[_path_name][_method]["responses"][_status]["links"] = _PAYOUT_LINKS


@functools.cache
def document() -> dict[str, Any]:
    """The whole description (built once; handlers must not mutate it)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fleet-payouts",
            "version": "1",
            "description": "Pays taxi fleet companies (parks) the money they earned in Billing, "
            "exactly once. Every response carries X-Request-Id; unknown routes answer "
            "404 not_found and a wrong method 405 method_not_allowed, in the error shape. "
            "A 503 unavailable changed nothing: retry it, with the same Idempotency-Key. "
            "Before any route, the HTTP edge answers 408 request_timeout (a head or body "
            "that does not arrive in time), 414 uri_too_long (a request line over 8 kB), "
            "431 headers_too_large (a head over 16 kB), 503 unavailable (too many "
            "connections) and 400 invalid_request (malformed HTTP), in the error shape.",
        },
        "security": API,
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "apiToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from API_TOKENS (Opteum): park-scoped endpoints.",
                },
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from ADMIN_TOKENS: admin endpoints.",
                },
            },
        },
    }
