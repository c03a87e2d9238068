"""Registry authentication, pure parts: WWW-Authenticate challenges and credentials
(distribution spec "Token Authentication Specification"; RFC 7235 challenge syntax)."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

_PARAM = re.compile(r'\s*([A-Za-z][\w.-]*)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^,\s]*))?\s*(,?)')


@dataclass(frozen=True, slots=True)
class Challenge:
    """One authentication challenge: a scheme ('bearer', 'basic') and its parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(header: str) -> list[Challenge]:
    """Returns the challenges of a WWW-Authenticate value, scheme lower-cased.

    `Bearer realm="https://auth/token",service="reg",scope="repository:a:pull"` gives one
    bearer challenge with three parameters. Several challenges may share one header.
    """
    challenges: list[Challenge] = []
    position = 0
    while position < len(header):
        match = _PARAM.match(header, position)
        if not match or match.end() == position:
            break
        position = match.end()
        name, value = match[1], match[2]
        if value is None:  # a bare token starts a new challenge
            challenges.append(Challenge(name.lower(), {}))
        elif challenges:
            challenges[-1].params[name.lower()] = _unquote(value)
    return challenges


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


@dataclass(frozen=True, slots=True)
class Credentials:
    """A username and secret. The secret never shows in repr() or str()."""

    username: str
    password: str = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> Credentials:
        """Returns `USER[:PASS]` as credentials (skopeo's --creds spelling)."""
        username, _, password = text.partition(":")
        return cls(username, password)

    def basic_header(self) -> str:
        """Returns the value of an `Authorization: Basic` header."""
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def __str__(self) -> str:
        return f"{self.username}:***"
