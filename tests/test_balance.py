"""Upstream groups: server URLs, balancing, passive health, the retry rule.

Plain synchronous tests: ``_balance`` is sans-I/O and takes the time as an
argument, so every time below is exact and no test sleeps.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trioproxy._balance import (
    MAX_FAILS_LIMIT,
    Attempt,
    GroupSpec,
    ServerState,
    UpstreamGroup,
    UpstreamServer,
    may_retry_on_next_server,
)

URLS = ("http://127.0.0.1:9001", "http://127.0.0.1:9002", "https://10.0.0.9:443")


def group(count: int = 3, **settings: Any) -> UpstreamGroup:
    return UpstreamGroup.from_urls("api", URLS[:count], **settings)


def pick(g: UpstreamGroup, now: float = 0.0) -> Attempt:
    attempt = g.pick(now)
    assert attempt is not None
    return attempt


def take(g: UpstreamGroup, state: ServerState, now: float) -> Attempt:
    """Pick until the group hands out ``state`` (others are finished at once)."""
    for _ in g.states:
        attempt = pick(g, now)
        if attempt.state is state:
            return attempt
        g.finished(attempt)
    raise AssertionError(f"{state.server} was not picked at {now}")


def fail(g: UpstreamGroup, state: ServerState, now: float) -> None:
    attempt = take(g, state, now)
    g.report(attempt, ok=False, now=now)
    g.finished(attempt)


def spread(g: UpstreamGroup, picks: int, now: float, *, finish: bool = True) -> Counter[int]:
    """Which server (by index) each of ``picks`` picks went to."""
    counts: Counter[int] = Counter()
    for _ in range(picks):
        attempt = pick(g, now)
        counts[g.states.index(attempt.state)] += 1
        if finish:
            g.finished(attempt)
    return counts


# --- servers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port"),
    [
        ("http://127.0.0.1:9001", "http", "127.0.0.1", 9001),
        ("http://Backend.Example.TEST", "http", "backend.example.test", 80),
        ("https://backend.example.test/", "https", "backend.example.test", 443),
        ("HTTPS://svc_1:8443", "https", "svc_1", 8443),
        ("http://[::1]:9001", "http", "::1", 9001),
        ("https://[2001:DB8::1]", "https", "2001:db8::1", 443),
    ],
)
def test_server_from_url(url: str, scheme: str, host: str, port: int) -> None:
    """A server URL gives scheme, host (lower case, IPv6 bare) and port, with the
    scheme's default port when none is written."""
    assert UpstreamServer.from_url(url) == UpstreamServer(scheme, host, port)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://h", "must start with http:// or https://"),
        ("127.0.0.1:9001", "must start with http:// or https://"),
        ("localhost:9001", "must start with http:// or https://"),
        ("http://user:secret@h", "must not carry credentials"),
        ("http://h/v1", "must not have a path"),
        ("http://h:80/v1/", "must not have a path"),
        ("http://h/?x=1", "must not have a query"),
        ("http://h?x=1", "must not have a query"),
        ("http://h#top", "or fragment"),
        ("http://", "has no host"),
        ("http:/h", "has no host"),
        ("http://:80", "has no host"),
        ("http://h:0", "from 1 to 65535, got '0'"),
        ("http://h:65536", "from 1 to 65535, got '65536'"),
        ("http://h:http", "from 1 to 65535, got 'http'"),
        ("http://h:", "from 1 to 65535, got ''"),
        ("http://h:+80", "from 1 to 65535, got '\\+80'"),
        ("http://h:1:2", "from 1 to 65535, got '1:2'"),
        ("http://h:\uff18\uff10", "from 1 to 65535"),  # fullwidth digits
        ("http://[::1", "not a URL"),
        ("http://[::1]x", "unexpected 'x' after the IPv6 address"),
        ("http://[::g]", "not a URL|not a valid IPv6"),
        ("http://ho st", "invalid label"),
    ],
)
def test_bad_server_url_is_refused_with_its_reason(url: str, message: str) -> None:
    """Each bad URL is a ValueError naming the URL and what is wrong with it."""
    with pytest.raises(ValueError, match=message) as info:
        UpstreamServer.from_url(url)
    assert repr(url) in str(info.value)


def test_server_authority_and_url() -> None:
    """The Host value leaves out the scheme's default port; the URL that logs
    and metrics show always has it."""
    plain = UpstreamServer.from_url("http://h")
    tls = UpstreamServer.from_url("https://[::1]:8443")
    assert (plain.authority, plain.url, str(plain)) == ("h", "http://h:80", "http://h:80")
    assert (tls.authority, tls.url) == ("[::1]:8443", "https://[::1]:8443")
    assert UpstreamServer.from_url("https://h:80").authority == "h:80"


@given(
    st.sampled_from(["http", "https"]),
    st.one_of(
        st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]{1,5}){0,3}", fullmatch=True),
        st.ip_addresses().map(str),
    ),
    st.integers(1, 65535),
)
def test_server_url_round_trip(scheme: str, host: str, port: int) -> None:
    """``from_url(server.url)`` gives the same server back."""
    server = UpstreamServer(scheme, host, port)  # type: ignore[arg-type]
    assert UpstreamServer.from_url(server.url) == server


# --- group settings ----------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"balance": "random"}, "balance must be one of round_robin, least_conn, got 'random'"),
        ({"max_fails": -1}, "max_fails must be between 0 and 100"),
        ({"max_fails": MAX_FAILS_LIMIT + 1}, "max_fails must be between 0 and 100"),
        ({"max_fails": True}, "max_fails must be a whole number"),
        ({"max_fails": 2.0}, "max_fails must be a whole number"),
        ({"fail_timeout": 0}, "fail_timeout must be a number of seconds above 0"),
        ({"fail_timeout": -1.0}, "fail_timeout must be"),
        ({"fail_timeout": math.inf}, "fail_timeout must be"),
        ({"fail_timeout": math.nan}, "fail_timeout must be"),
    ],
)
def test_bad_group_setting_is_refused(settings: dict[str, Any], message: str) -> None:
    """A bad setting is a ValueError naming the setting and the value."""
    with pytest.raises(ValueError, match=message):
        group(**settings)


def test_group_needs_a_name_and_distinct_servers() -> None:
    """No servers, a server listed twice, or no name: refused."""
    with pytest.raises(ValueError, match="at least one server"):
        UpstreamGroup.from_urls("api", [])
    with pytest.raises(ValueError, match=r"server http://h:80 is listed twice"):
        UpstreamGroup.from_urls("api", ["http://h", "http://H:80/"])
    with pytest.raises(ValueError, match="needs a name"):
        UpstreamGroup.from_urls("", ["http://h"])
    with pytest.raises(ValueError, match="'http://h/x'"):
        UpstreamGroup.from_urls("api", ["http://h/x"])


# --- balancing ---------------------------------------------------------------


@pytest.mark.parametrize("finish", [True, False])
def test_round_robin_spreads_evenly(finish: bool) -> None:
    """30 picks over three servers: 10 each, whether or not the earlier
    attempts are still in flight."""
    assert spread(group(), 30, now=0.0, finish=finish) == {0: 10, 1: 10, 2: 10}


def test_round_robin_skips_a_server_that_is_out() -> None:
    """With one server out, the other two share the picks."""
    g = group()
    g.mark_down(g.states[1])
    assert spread(g, 30, now=0.0) == {0: 15, 2: 15}


def test_least_conn_prefers_fewest_in_flight() -> None:
    """least_conn sends a new exchange to the server with the fewest in
    flight; ties go round the servers in order."""
    g = group(balance="least_conn")
    held = [pick(g) for _ in range(6)]
    assert [g.states.index(attempt.state) for attempt in held] == [0, 1, 2, 0, 1, 2]
    for attempt in (held[2], held[5], held[1]):
        g.finished(attempt)
    # In flight now: 2, 1, 0.
    assert [g.states.index(pick(g).state) for _ in range(3)] == [2, 1, 2]
    assert [state.in_flight for state in g.states] == [2, 2, 2]


def test_least_conn_spreads_evenly_when_idle() -> None:
    """With nothing in flight, least_conn spreads like round robin."""
    assert spread(group(balance="least_conn"), 30, now=0.0) == {0: 10, 1: 10, 2: 10}


# --- passive health ----------------------------------------------------------


def test_max_fails_within_fail_timeout_takes_a_server_out() -> None:
    """Three failures within 10 s take the server out for 10 s from the last
    one; the others take every request meanwhile."""
    g = group(max_fails=3, fail_timeout=10.0)
    a = g.states[0]
    for now in (0.0, 4.0, 5.0):
        assert a.available(now)
        fail(g, a, now)
    assert not a.available(5.0)
    assert a.health() == "down"
    assert spread(g, 20, now=14.9) == {1: 10, 2: 10}
    assert a.available(15.0)


def test_failures_further_apart_than_fail_timeout_do_not() -> None:
    """Failures more than fail_timeout apart never add up to max_fails."""
    g = group(max_fails=2, fail_timeout=10.0)
    a = g.states[0]
    for now in (0.0, 10.5, 21.0, 31.5, 42.0):
        fail(g, a, now)
        assert a.available(now)
        assert a.health() == "up"


def test_the_window_slides() -> None:
    """The count is of the last max_fails failures: 0, 9, 11 are not three
    within 10 s, but 9, 11, 12 are (a window fixed at the first failure
    would miss it)."""
    g = group(max_fails=3, fail_timeout=10.0)
    a = g.states[0]
    for now in (0.0, 9.0, 11.0):
        fail(g, a, now)
    assert a.available(11.0)
    fail(g, a, 12.0)
    assert not a.available(12.0)


def test_failures_exactly_fail_timeout_apart_count() -> None:
    """ "Within fail_timeout" includes its end."""
    g = group(max_fails=2, fail_timeout=10.0)
    fail(g, g.states[0], 0.0)
    fail(g, g.states[0], 10.0)
    assert not g.states[0].available(10.0)


def test_successes_do_not_reset_the_count() -> None:
    """max_fails failures within fail_timeout take a server out even with
    successes in between (nginx's documented rule)."""
    g = group(max_fails=2, fail_timeout=10.0)
    a = g.states[0]
    fail(g, a, 0.0)
    ok = take(g, a, 1.0)
    g.report(ok, ok=True, now=1.0)
    g.finished(ok)
    fail(g, a, 2.0)
    assert not a.available(2.0)


def test_after_fail_timeout_exactly_one_probe() -> None:
    """Once fail_timeout has passed, one request tries the server; while it is
    in flight no other request goes there."""
    g = group(max_fails=1, fail_timeout=10.0)
    a = g.states[0]
    fail(g, a, 0.0)
    attempts = [pick(g, 10.0) for _ in range(30)]
    probes = [attempt for attempt in attempts if attempt.state is a]
    assert len(probes) == 1
    assert probes[0].probe
    assert not any(attempt.probe for attempt in attempts if attempt.state is not a)
    assert a.health() == "probing"
    assert a.in_flight == 1


def test_probe_success_puts_the_server_back() -> None:
    """A probe that gets a response head ends the outage at once."""
    g = group(max_fails=1, fail_timeout=10.0)
    a = g.states[0]
    fail(g, a, 0.0)
    probe = take(g, a, 10.0)
    g.report(probe, ok=True, now=10.5)
    assert a.health() == "up"
    # Back in rotation while the probe's body still streams.
    assert spread(g, 30, now=10.5) == {0: 10, 1: 10, 2: 10}


def test_probe_failure_takes_the_server_out_again() -> None:
    """A failed probe takes the server out for another fail_timeout, from the
    time of the failure, whatever max_fails is."""
    g = group(max_fails=3, fail_timeout=10.0)
    a = g.states[0]
    for now in (0.0, 0.0, 0.0):
        fail(g, a, now)
    probe = take(g, a, 10.0)
    g.report(probe, ok=False, now=11.0)
    g.finished(probe)
    assert not a.available(20.9)
    assert a.available(21.0)


def test_probe_without_verdict_lets_the_next_request_probe() -> None:
    """A probe that ends without a verdict (the client left) judges nothing:
    the server stays out, and the next request is the probe."""
    g = group(max_fails=1, fail_timeout=10.0)
    a = g.states[0]
    fail(g, a, 0.0)
    first = take(g, a, 10.0)
    g.finished(first)
    assert a.health() == "down"
    second = take(g, a, 10.0)
    assert second.probe


def test_all_down_gives_none_at_once() -> None:
    """Every server out: pick returns None (the caller answers 502), until the
    first one may be probed."""
    g = group(max_fails=1, fail_timeout=10.0)
    for index, state in enumerate(g.states):
        fail(g, state, float(index))
    assert g.pick(2.0) is None
    assert g.pick(9.9) is None
    probe = pick(g, 10.0)
    assert probe.state is g.states[0]
    assert probe.probe
    assert g.pick(10.0) is None


def test_old_verdicts_do_not_judge_again() -> None:
    """A failure reported by an attempt that started before the server was
    taken out (a slow connect timing out later) neither extends the outage
    nor takes the recovered server out again."""
    g = group(max_fails=1, fail_timeout=10.0)
    a = g.states[0]
    slow = take(g, a, 0.0)
    fail(g, a, 1.0)
    probe = take(g, a, 11.0)
    g.report(probe, ok=True, now=11.0)
    g.finished(probe)
    g.report(slow, ok=False, now=12.0)
    g.finished(slow)
    assert a.available(12.0)
    assert a.in_flight == 0


def test_one_server_is_never_taken_out_by_passive_health() -> None:
    """A group of one keeps trying its server, as nginx does: refusing would
    not help anyone."""
    g = group(count=1, max_fails=1)
    for now in range(5):
        fail(g, g.states[0], float(now))
    assert g.states[0].available(5.0)


def test_max_fails_zero_turns_passive_health_off() -> None:
    """max_fails = 0: failures are not counted."""
    g = group(max_fails=0)
    for _ in range(10):
        fail(g, g.states[0], 0.0)
    assert g.states[0].available(0.0)


# --- active health hooks -----------------------------------------------------


def test_mark_down_holds_a_server_out_until_mark_up() -> None:
    """mark_down keeps a server out whatever the clock says; mark_up ends that,
    while a passive outage still runs its course."""
    g = group(max_fails=1, fail_timeout=10.0)
    a = g.states[0]
    g.mark_down(a)
    assert not a.available(1000.0)
    assert a.health() == "down"
    g.mark_up(a)
    assert a.available(1000.0)
    fail(g, a, 1000.0)
    g.mark_down(a)
    g.mark_up(a)
    assert not a.available(1005.0)


# --- retry on the next server ------------------------------------------------


def test_next_after_picks_another_server() -> None:
    """The retry goes to a server other than the one that failed."""
    g = group()
    first = pick(g)
    g.report(first, ok=False, now=0.0)
    g.finished(first)
    retry = g.next_after(first, 0.0)
    assert retry is not None
    assert retry.state is not first.state


def test_next_after_with_no_other_server() -> None:
    """No other server available: None (answer 502), even if the failed one
    is still in rotation."""
    single = group(count=1)
    assert single.next_after(pick(single), 0.0) is None
    g = group(count=2, max_fails=1)
    fail(g, g.states[1], 0.0)
    assert g.next_after(pick(g), 0.0) is None


def test_least_conn_retry_goes_to_the_least_loaded_other() -> None:
    """With least_conn the retry takes the least loaded of the other servers."""
    g = group(balance="least_conn")
    take(g, g.states[1], 0.0)
    first = take(g, g.states[0], 0.0)
    retry = g.next_after(first, 0.0)
    assert retry is not None
    assert retry.state is g.states[2]


# --- the attempt protocol ----------------------------------------------------


def test_one_verdict_before_finish() -> None:
    """A second verdict, or a verdict after finished, is a bug in the caller."""
    g = group()
    attempt = pick(g)
    g.report(attempt, ok=True, now=0.0)
    with pytest.raises(RuntimeError, match="one verdict"):
        g.report(attempt, ok=False, now=0.0)
    late = pick(g)
    g.finished(late)
    with pytest.raises(RuntimeError, match="one verdict"):
        g.report(late, ok=True, now=0.0)


def test_finished_twice_counts_once() -> None:
    """finished may be called again (from cleanup paths); in_flight drops once."""
    g = group()
    attempt = pick(g)
    assert attempt.server == g.states[0].server
    assert attempt.state.in_flight == 1
    g.finished(attempt)
    g.finished(attempt)
    assert attempt.state.in_flight == 0


# --- the retry rule ----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "has_body", "sent", "received", "connect_failed", "expected"),
    [
        # connect (or TLS) failed: any method, even with a body
        (b"POST", True, False, False, True, True),
        (b"GET", False, False, False, True, True),
        # broke before any response byte: idempotent, safe, bodiless only
        (b"GET", False, True, False, False, True),
        (b"HEAD", False, True, False, False, True),
        (b"OPTIONS", False, True, False, False, True),
        (b"GET", True, True, False, False, False),
        (b"POST", False, True, False, False, False),
        (b"PATCH", False, True, False, False, False),
        (b"DELETE", False, True, False, False, False),
        (b"PUT", False, True, False, False, False),
        (b"get", False, True, False, False, False),
        # nothing of the request left us: the server never saw it
        (b"POST", False, False, False, False, True),
        (b"POST", True, False, False, False, False),
        # a byte of the response arrived: never
        (b"GET", False, True, True, False, False),
    ],
)
def test_may_retry_on_next_server(
    method: bytes, has_body: bool, sent: bool, received: bool, connect_failed: bool, expected: bool
) -> None:
    """The issue's rule: a connect failure is retried for any method; a
    connection broken before the response only for safe bodiless requests."""
    assert (
        may_retry_on_next_server(
            method,
            has_body=has_body,
            sent_any_byte=sent,
            received_any_byte=received,
            connect_failed=connect_failed,
        )
        is expected
    )


@given(st.sampled_from([b"GET", b"POST"]), st.booleans(), st.booleans(), st.booleans())
def test_never_a_second_retry(method: bytes, has_body: bool, sent: bool, failed: bool) -> None:
    """Once is the most: a retry is never retried."""
    assert not may_retry_on_next_server(
        method,
        has_body=has_body,
        sent_any_byte=sent,
        received_any_byte=False,
        connect_failed=failed,
        already_retried=True,
    )


# --- properties --------------------------------------------------------------


@given(
    st.integers(1, 6),
    st.integers(1, 5),
    st.floats(0.5, 60.0),
    st.lists(st.floats(0.0, 10.0), min_size=1, max_size=30),
)
def test_down_exactly_when_max_fails_fall_in_the_window(
    servers: int, max_fails: int, fail_timeout: float, gaps: list[float]
) -> None:
    """Server 0, failing at the given gaps, is out right after a failure
    exactly when its last max_fails failures span at most fail_timeout, and
    then stays out for fail_timeout, while the others keep serving."""
    g = UpstreamGroup.from_urls(
        "g",
        [f"http://10.0.0.{i + 1}" for i in range(servers + 1)],
        max_fails=max_fails,
        fail_timeout=fail_timeout,
    )
    a = g.states[0]
    now = 0.0
    recent: list[float] = []
    for gap in gaps:
        now += gap
        if not a.available(now):
            continue
        was_probe = a.down_until is not None
        fail(g, a, now)
        recent = [] if was_probe else [*recent, now][-max_fails:]
        expected_out = was_probe or (len(recent) == max_fails and now - recent[0] <= fail_timeout)
        assert a.available(now) is not expected_out
        if expected_out:
            recent = []
            assert a.down_until == now + fail_timeout
        assert g.pick(now) is not None


class GroupMachine(RuleBasedStateMachine):
    """Random picks, verdicts, finishes, active marks and clock steps; the
    bookkeeping must always agree with the attempts outstanding."""

    def __init__(self) -> None:
        super().__init__()
        self.group = UpstreamGroup.from_urls(
            "g",
            ["http://a", "http://b", "http://c"],
            balance="least_conn",
            max_fails=2,
            fail_timeout=5.0,
        )
        self.now = 0.0
        self.open: list[Attempt] = []

    @rule()
    def pick(self) -> None:
        available = [s for s in self.group.states if s.available(self.now)]
        fewest = min((s.in_flight for s in available), default=None)
        attempt = self.group.pick(self.now)
        if attempt is None:
            assert fewest is None
            return
        assert attempt.state in available
        assert attempt.state.in_flight == fewest + 1  # type: ignore[operator]
        self.open.append(attempt)

    @precondition(lambda self: self.open)
    @rule(which=st.integers(0, 100), ok=st.sampled_from([True, False, None]))
    def end(self, which: int, ok: bool | None) -> None:
        attempt = self.open.pop(which % len(self.open))
        if ok is not None:
            self.group.report(attempt, ok=ok, now=self.now)
        self.group.finished(attempt)

    @rule(seconds=st.sampled_from([0.0, 0.5, 2.5, 5.0, 7.0]))
    def wait(self, seconds: float) -> None:
        self.now += seconds

    @rule(which=st.integers(0, 2), down=st.booleans())
    def mark(self, which: int, down: bool) -> None:
        state = self.group.states[which]
        (self.group.mark_down if down else self.group.mark_up)(state)

    @invariant()
    def bookkeeping(self) -> None:
        for state in self.group.states:
            mine = [a for a in self.open if a.state is state]
            assert state.in_flight == len(mine)
            probes = [a for a in mine if a.probe]
            assert len(probes) <= 1
            assert state.probing == bool(probes)
            window = state.failure_window
            # A full window that spans fail_timeout or less takes the server out.
            assert len(window) < 2 or window[-1] - window[0] > 5.0
            assert state.down_until is None or not window


TestGroupMachine = GroupMachine.TestCase
TestGroupMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_a_group_spec_reads_a_config_files_values() -> None:
    """URLs become servers, durations may be numbers or text with a unit, and
    the live group takes the spec's settings."""
    spec = GroupSpec(
        name="api",
        servers=["http://127.0.0.1:9001", UpstreamServer("http", "127.0.0.1", 9002)],
        fail_timeout="1m",
        health_interval=2,
    )
    assert spec.servers == (
        UpstreamServer("http", "127.0.0.1", 9001),
        UpstreamServer("http", "127.0.0.1", 9002),
    )
    assert (spec.fail_timeout, spec.health_interval) == (60.0, 2.0)
    live = UpstreamGroup.from_spec(spec)
    assert (live.servers, live.fail_timeout, live.balance) == (spec.servers, 60.0, "round_robin")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"servers": "http://a"}, "servers must be a list of URLs"),
        ({"servers": [5]}, "is not a URL"),
        ({"servers": ["http://a"], "fail_timeout": True}, "expected a duration"),
        ({"servers": ["http://a"], "health_interval": 0}, "health_interval must be"),
        ({"servers": ["http://a"], "health_check": "/a b"}, "health_check must be a path"),
    ],
)
def test_a_group_spec_refuses_bad_values(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GroupSpec(name="api", **settings)


def test_servers_count_attempts_and_failures() -> None:
    """Per server, the attempts picked and the failures reported: the
    counters /metrics shows."""
    g = group(2, max_fails=0)
    first, second = pick(g), pick(g)
    g.report(first, ok=True, now=0.0)
    g.report(second, ok=False, now=0.0)
    assert [(s.requests, s.failures) for s in g.states] == [(1, 0), (1, 1)]
