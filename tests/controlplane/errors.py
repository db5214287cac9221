"""metav1.Status errors, with the reasons and messages the real API server uses."""

from __future__ import annotations

from typing import Any

_REASON_CODES = {
    "BadRequest": 400, "Unauthorized": 401, "Forbidden": 403, "NotFound": 404,
    "MethodNotAllowed": 405, "NotAcceptable": 406, "AlreadyExists": 409, "Conflict": 409,
    "Gone": 410, "Expired": 410, "RequestEntityTooLarge": 413, "UnsupportedMediaType": 415,
    "Invalid": 422, "TooManyRequests": 429, "InternalError": 500, "ServiceUnavailable": 503,
    "Timeout": 504,
}


class ApiStatusError(Exception):
    def __init__(self, reason: str, message: str, *, code: int | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.code = code if code is not None else _REASON_CODES[reason]
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _qualified(group: str, plural: str) -> str:
    return f"{plural}.{group}" if group else plural


def not_found(group: str, plural: str, name: str) -> ApiStatusError:
    return ApiStatusError("NotFound", f'{_qualified(group, plural)} "{name}" not found',
                          details={"name": name, "group": group, "kind": plural})


def already_exists(group: str, plural: str, name: str) -> ApiStatusError:
    return ApiStatusError("AlreadyExists", f'{_qualified(group, plural)} "{name}" already exists',
                          details={"name": name, "group": group, "kind": plural})


def conflict(group: str, plural: str, name: str, why: str) -> ApiStatusError:
    return ApiStatusError("Conflict",
                          f'Operation cannot be fulfilled on {_qualified(group, plural)} "{name}": {why}',
                          details={"name": name, "group": group, "kind": plural})


STALE_OBJECT = ("the object has been modified; please apply your changes to the latest "
                "version and try again")


def invalid(group: str, kind: str, name: str, causes: list[tuple[str, str, str]]) -> ApiStatusError:
    """causes: (field, reason type e.g. FieldValueRequired, message)."""
    text = "; ".join(f"{f}: {m}" for f, _, m in causes)
    return ApiStatusError(
        "Invalid", f'{kind} "{name}" is invalid: {text}',
        details={"name": name, "group": group, "kind": kind,
                 "causes": [{"reason": r, "message": m, "field": f} for f, r, m in causes]},
    )


def bad_request(message: str) -> ApiStatusError:
    return ApiStatusError("BadRequest", message)


def forbidden(user: str, verb: str, group: str, plural: str, namespace: str | None,
              name: str | None = None, subresource: str | None = None) -> ApiStatusError:
    resource = plural + (f"/{subresource}" if subresource else "")
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    what = f'{_qualified(group, plural)} "{name}"' if name else _qualified(group, plural)
    return ApiStatusError(
        "Forbidden",
        f'{what} is forbidden: User "{user}" cannot {verb} resource "{resource}" '
        f'in API group "{group}" {scope}',
        details={"name": name or "", "group": group, "kind": plural},
    )


def expired(message: str) -> ApiStatusError:
    return ApiStatusError("Expired", message, code=410)
