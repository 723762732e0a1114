"""The API key: `Authorization: Bearer KEY` (OpenAI's clients), or HTTP Basic with the key as password (what
AUTOMATIC1111's `--api-auth` clients such as `webuiapi.set_auth` send; the user name is not checked). Compared in
constant time, so response timing tells nothing about the key."""
from __future__ import annotations

import base64
import binascii
import hmac

from diffrt.serve.jobs import ServeError


def presented_key(authorization: str | None) -> str | None:
    """The key in an Authorization header, or None."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


def check_key(expected: str | None, authorization: str | None) -> None:
    """ServeError 401 unless the header carries `expected` (no check when the server has no key)."""
    if expected is None:
        return
    given = presented_key(authorization)
    if given is None or not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        raise ServeError(401, "a valid API key is required: send `Authorization: Bearer KEY` (or HTTP Basic with "
                         "the key as password)", code="invalid_api_key", kind="authentication_error",
                         headers={"WWW-Authenticate": 'Bearer, Basic realm="diffrt"'})
