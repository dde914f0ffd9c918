"""The one way to render URLs, settings and error text for humans: secrets are masked.

Passwords in a URL's user-info, API keys and tokens never reach an error message, a log line or a
status page; everything that prints a setting or an exception that may carry one goes through here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

#: Settings whose whole value is secret.
_SECRET_NAME = re.compile(r"(api_?key|password|passwd|secret|token)", re.IGNORECASE)
#: `scheme://user:password@` (also a malformed `scheme:/user:password@`): the password part.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*:/{0,3}[^\s/:@]*:)[^\s/]*(?=@)")
#: `password=...`, `api_key=...` in query strings and key=value DSNs.
_KEY_VALUE = re.compile(
    r"(?P<key>(?:api_?key|password|passwd|secret|token)\w*=)[^\s&;,'\"]+", re.IGNORECASE
)


def redact(text: str) -> str:
    """`text` with every URL password and `password=`-style value masked."""
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)
    return _KEY_VALUE.sub(lambda m: m.group("key") + MASK, text)


def redact_value(name: str, value: Any) -> str:
    """A setting's value as shown to humans: secrets masked entirely, URLs without passwords."""
    if value is None:
        return "None"
    if _SECRET_NAME.search(name):
        return MASK
    return redact(str(value))


def render_settings(values: Mapping[str, Any]) -> dict[str, str]:
    """Every setting by its environment name, safe to print or log."""
    return {name.upper(): redact_value(name, value) for name, value in values.items()}
