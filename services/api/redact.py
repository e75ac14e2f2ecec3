"""Keep secrets out of responses and logs.

The status page echoes strings other processes wrote (last errors, heartbeat info, state
fields); any of them may carry a Redis URL with a password or, by accident, a token. Every such
string passes through ``redact``: URL user-info is masked, and the literal secrets this process
knows (its bearer token, its Redis password) are replaced wherever they appear.
"""

from __future__ import annotations

import re
import threading
from typing import Any

_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]{0,20}://)[^/@\s]{1,512}@")
# A name is secret-looking when one of its words is: "api_token" and "redis-password" are,
# "tokens_per_s" and "max_tokens" (counts of model tokens) are not.
_SECRET_NAMES = re.compile(
    r"(?i)(^|[_\-.])(token|password|passwd|secret|api[_-]?key|authorization)($|[_\-.])"
)
_lock = threading.Lock()
_secrets: set[str] = set()
MASK = "***"


def register_secret(value: str | None) -> None:
    """Remember a secret so that ``redact`` masks it (process-wide, never removed)."""
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(value)


def redact(value: Any) -> str:
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", str(value))
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAMES.search(name))


def redact_mapping(values: dict[str, Any]) -> dict[str, Any]:
    """Mask values whose key names a secret; redact the other string values."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if is_secret_name(key):
            out[key] = MASK
        elif isinstance(value, str):
            out[key] = redact(value)
        else:
            out[key] = value
    return out
