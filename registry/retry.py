"""When a failed registry request is tried again: pure policy, no I/O, tested by table.

A request keeps trying while its failures in a row fit in a time budget (not a count of
tries): a burst of 429/503 answers is waited out, however many it takes, and a registry that
never recovers ends the request once the budget is spent. A try that moved a download
forward starts the count again, so a long transfer is never cut for its length. A request
that a reader is waiting for also has a deadline, which nothing runs past.
"""

from __future__ import annotations

import calendar
import email.utils
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

BACKOFF_FIRST = 0.25  # seconds before the second try
BACKOFF_CAP = 10.0  # the longest backoff between two tries (Retry-After may ask for more)
Uniform = Callable[[float, float], float]


@dataclass(frozen=True, slots=True)
class Patience:
    """How long one request keeps trying: `seconds` of failures in a row, and never past
    `deadline` (a time.monotonic() value) when someone is waiting for the answer."""

    seconds: float
    deadline: float | None = None


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Returns the seconds a Retry-After header asks to wait, from delta-seconds or an
    HTTP-date (RFC 9110, 10.2.3) read against `now` (time.time()); None if absent or unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        return _seconds_until_date(text, now)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _seconds_until_date(text: str, now: float) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # "-0000" and asctime dates parse naive; an HTTP-date is always GMT.
    seconds = when.timestamp() if when.tzinfo is not None else calendar.timegm(when.timetuple())
    return max(0.0, seconds - now)


def backoff(attempt: int, uniform: Uniform = random.uniform) -> float:
    """Returns the wait after failed try number `attempt` (0 for the first) of a streak:
    exponential, capped, with jitter, so clients that failed together do not retry together."""
    ceiling = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** min(attempt, 32))
    return uniform(ceiling / 2, ceiling)


def next_delay(
    attempt: int, retry_after: float | None, remaining: float, uniform: Uniform = random.uniform
) -> float | None:
    """Returns the seconds to wait before the next try, or None to give up now.

    Retry-After is honoured as given when it ends within the `remaining` budget, and means
    giving up when it does not (the server said not to come back sooner). "Retry-After: 0"
    says nothing about pacing, and taken literally would turn a sick registry's answers into
    a busy loop: the backoff applies then. A backoff is cut to what remains, so the last try
    comes at the end of the budget rather than never."""
    if remaining <= 0:
        return None
    if retry_after:
        return retry_after if retry_after <= remaining else None
    return min(backoff(attempt, uniform), remaining)


@dataclass(slots=True)
class RetryClock:
    """Follows one request's tries; says after each failure whether and when to try again."""

    patience: Patience
    started: float  # time.monotonic() when the first try began
    tries: int = 0
    streak: int = 0  # failures since the last progress
    failing_since: float | None = None
    refused_wait: float | None = None  # a Retry-After that asked for more than the budget left

    def remaining(self, now: float) -> float | None:
        """Returns the seconds left before the deadline, or None without one."""
        return None if self.patience.deadline is None else self.patience.deadline - now

    def after_failure(
        self, try_started: float, now: float, retry_after: float | None, progressed: bool = False,
        uniform: Uniform = random.uniform,
    ) -> float | None:  # fmt: skip
        """Returns the seconds to wait before the next try, or None to give up. The budget
        counts from the start of the first failed try of a streak; a try that `progressed`
        (received bytes) starts a new streak at `now`."""
        self.tries += 1
        if progressed:
            self.failing_since, self.streak = now, 0
        elif self.failing_since is None:
            self.failing_since = try_started
        end = self.failing_since + self.patience.seconds
        if self.patience.deadline is not None:
            end = min(end, self.patience.deadline)
        delay = next_delay(self.streak, retry_after, end - now, uniform)
        self.streak += 1
        if delay is None and retry_after is not None and retry_after > end - now:
            self.refused_wait = retry_after
        return delay

    def gave_up(self, now: float) -> str:
        """Returns how the request ended, for its one error line."""
        tries = f"{self.tries} {'try' if self.tries == 1 else 'tries'}"
        why = "" if self.refused_wait is None else f"; it asked to wait {self.refused_wait:g}s, beyond the budget"
        return f"gave up after {tries} in {now - self.started:.1f}s{why}"
