"""The retry policy by table, without a network: when a failed request is tried again."""

from __future__ import annotations

import email.utils

import pytest

from registry.retry import BACKOFF_CAP, Patience, RetryClock, backoff, next_delay, parse_retry_after

NOW = 1_700_000_000.0  # time.time() of the tables


def _highest(low: float, high: float) -> float:
    return high


def _lowest(low: float, high: float) -> float:
    return low


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        ("1", 1.0),
        (" 120 ", 120.0),
        ("1.5", 1.5),
        ("-3", None),
        ("nan", None),
        ("inf", None),
        ("soon", None),
        (email.utils.formatdate(NOW + 30, usegmt=True), 30.0),  # IMF-fixdate
        (email.utils.formatdate(NOW - 30, usegmt=True), 0.0),  # a date in the past: now
        ("Tuesday, 14-Nov-23 22:13:50 GMT", 30.0),  # RFC 850, obsolete but allowed
        ("Tue Nov 14 22:13:50 2023", 30.0),  # asctime
        ("Tue, 14 Nov 2023 22:13:50 -0000", 30.0),
        ("Tue, 32 Nov 2023 22:13:50 GMT", None),
    ],
)
def test_retry_after_in_seconds_or_as_an_http_date(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, NOW) == seconds


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [
        (0, 0.125, 0.25),
        (1, 0.25, 0.5),
        (2, 0.5, 1.0),
        (5, 4.0, 8.0),
        (6, 5.0, 10.0),
        (60, 5.0, 10.0),
        (10**6, 5.0, 10.0),
    ],
)
def test_backoff_doubles_up_to_a_cap_with_jitter(attempt: int, low: float, high: float) -> None:
    assert backoff(attempt, _lowest) == low and backoff(attempt, _highest) == high <= BACKOFF_CAP


@pytest.mark.parametrize(
    ("attempt", "retry_after", "remaining", "delay"),
    [
        (0, None, 100.0, 0.25),  # backoff
        (9, None, 100.0, 10.0),  # capped backoff
        (9, None, 3.0, 3.0),  # cut to the budget: one last try at its end
        (0, None, 0.0, None),  # budget spent
        (0, None, -1.0, None),
        (0, 1.0, 100.0, 1.0),  # Retry-After honoured, not the backoff
        (9, 1.0, 100.0, 1.0),  # however many tries came before
        (0, 30.0, 100.0, 30.0),  # longer than the backoff cap: still honoured
        (0, 100.0, 100.0, 100.0),
        (0, 101.0, 100.0, None),  # asks for more than is left: give up now
        (3, 0.0, 100.0, 2.0),  # "Retry-After: 0": the backoff, not a busy loop
        (3, 0.0, 0.5, 0.5),
        (0, 0.0, 0.0, None),
    ],
)
def test_next_delay(attempt: int, retry_after: float | None, remaining: float, delay: float | None) -> None:
    assert next_delay(attempt, retry_after, remaining, _highest) == delay


def _run(clock: RetryClock, failures: list[tuple[float, float, float | None, bool]]) -> list[float | None]:
    """Feeds (try started, failed at, Retry-After, progressed) to the clock; returns its answers."""
    return [clock.after_failure(start, now, after, moved, _highest) for start, now, after, moved in failures]


def test_a_burst_of_retry_after_answers_is_waited_out_however_many_it_takes() -> None:
    clock = RetryClock(Patience(20.0), started=0.0)
    burst = [(float(t), t + 0.01, 1.0, False) for t in range(0, 14, 1)]  # 14 answers "wait 1 s"
    assert _run(clock, burst) == [1.0] * 14
    assert clock.tries == 14


def test_a_registry_that_never_recovers_ends_within_the_budget() -> None:
    clock = RetryClock(Patience(10.0), started=100.0)
    now, delays = 100.0, []
    while (delay := clock.after_failure(now, now + 0.01, None, False, _highest)) is not None:
        delays.append(delay)
        now += 0.01 + delay
    assert delays[:4] == [0.25, 0.5, 1.0, 2.0]
    assert 109.0 < now <= 110.01  # the last try came at the end of the budget, not after it
    assert clock.gave_up(now).startswith(f"gave up after {clock.tries} tries in 10.0s")


def test_the_budget_counts_from_the_first_failed_try_and_progress_restarts_it() -> None:
    clock = RetryClock(Patience(10.0), started=0.0)
    # a try that hung for 8 s of silence, then one that stalled again: 16 s of failures
    assert _run(clock, [(0.0, 8.0, None, False), (8.25, 16.25, None, False)]) == [0.25, None]
    download = RetryClock(Patience(10.0), started=0.0)
    # three long tries that each moved the download on before the connection dropped
    answers = _run(download, [(0.0, 60.0, None, True), (60.25, 120.0, None, True), (120.5, 180.0, None, True)])
    assert answers == [0.25, 0.25, 0.25]  # each a fresh streak: a slow transfer is never cut for its length


def test_a_deadline_is_never_passed() -> None:
    clock = RetryClock(Patience(4.0, deadline=4.0), started=0.0)
    assert clock.remaining(1.0) == 3.0
    assert _run(clock, [(0.0, 2.0, None, False)]) == [0.25]  # then the next try is cut at the deadline
    assert _run(clock, [(2.25, 3.9, 1.0, False)]) == [None]  # Retry-After beyond the deadline
    assert "asked to wait 1s, beyond the budget" in clock.gave_up(3.9)
    progressed = RetryClock(Patience(4.0, deadline=4.0), started=0.0)
    assert _run(progressed, [(0.0, 3.5, 1.0, True)]) == [None]  # progress does not move a deadline
    assert RetryClock(Patience(4.0), started=0.0).remaining(1.0) is None
