"""Routes: host and path-prefix matching, first match wins, table validation.

Plain synchronous tests: ``_routes`` is sans-I/O.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy._routes import (
    Route,
    RouteError,
    RouteTable,
    check_host_name,
    remove_dot_segments,
    request_host,
    request_path,
)

API = Route(host="api.example.test", upstream="api")
WILD = Route(host="*.example.test", upstream="wild")
V1 = Route(path_prefix="/v1/", upstream="v1")
DEFAULT = Route(upstream="static")


def names(table: RouteTable, host: bytes | str | None, path: bytes | str) -> str | None:
    route = table.match(host, path)
    return None if route is None else route.upstream


def test_exact_host_ignores_case_port_and_trailing_dot() -> None:
    """An exact host route matches its name however the Host field spells it,
    and no other name."""
    table = RouteTable([API])
    for host in (
        b"api.example.test",
        b"API.Example.TEST",
        b"api.example.test:8080",
        "api.example.test.",
    ):
        assert names(table, host, b"/") == "api"
    for other in (b"www.example.test", b"api.example.test.evil", b"xapi.example.test", None):
        assert names(table, other, b"/") is None


def test_wildcard_matches_subdomains_not_the_bare_name() -> None:
    """``*.example.test`` matches names below example.test at any depth, not
    example.test itself and not a name that merely ends in the same letters."""
    table = RouteTable([WILD])
    for host in (b"a.example.test", b"a.b.example.test", b"A.Example.Test:81"):
        assert names(table, host, b"/") == "wild"
    for host in (b"example.test", b"badexample.test", b".example.test", b"example.test.org"):
        assert names(table, host, b"/") is None


def test_path_prefix_on_the_path_before_the_query() -> None:
    """A prefix compares with the path only; the query never makes a match."""
    table = RouteTable([V1])
    assert names(table, b"h", b"/v1/users?x=1") == "v1"
    assert names(table, b"h", b"/v1/") == "v1"
    assert names(table, b"h", b"/v1") is None
    assert names(table, b"h", b"/other?next=/v1/") is None
    assert names(table, b"h", b"/V1/users") is None


def test_path_prefix_sees_the_decoded_normalised_path() -> None:
    """Percent-encoding and dot segments cannot take a request into or out of a
    prefix route: the match uses the path the upstream will resolve."""
    table = RouteTable([V1, DEFAULT])
    assert names(table, b"h", b"/%761/users") == "v1"
    assert names(table, b"h", b"/x/../v1/users") == "v1"
    assert names(table, b"h", b"/v1/../admin") == "static"
    assert names(table, b"h", b"/v1/%2e%2e/admin") == "static"
    assert names(table, b"h", b"/v1%2Fusers") == "v1"


def test_path_prefix_with_non_ascii_letters() -> None:
    """A prefix written with non-ASCII letters matches their UTF-8
    percent-encoding; bytes that are not UTF-8 match nothing."""
    table = RouteTable([Route(path_prefix="/café/", upstream="cafe")])
    assert names(table, b"h", b"/caf%C3%A9/menu") == "cafe"
    assert names(table, b"h", "/café/menu") == "cafe"
    assert names(table, b"h", b"/caf%E9/menu") is None


def test_asterisk_target_matches_only_routes_without_prefix() -> None:
    """``OPTIONS *`` has no path: prefix routes pass it by."""
    table = RouteTable([Route(path_prefix="/", upstream="root"), DEFAULT])
    assert names(table, b"h", b"*") == "static"


def test_host_and_prefix_together() -> None:
    """A route with both conditions needs both."""
    route = Route(host="api.example.test", path_prefix="/v1/", upstream="api")
    table = RouteTable([route])
    assert names(table, b"api.example.test", b"/v1/x") == "api"
    assert names(table, b"api.example.test", b"/v2/x") is None
    assert names(table, b"www.example.test", b"/v1/x") is None


def test_first_match_wins_and_default_catches_the_rest() -> None:
    """Routes are tried in order; the default route takes what none matched."""
    table = RouteTable([API, WILD, V1, DEFAULT])
    assert names(table, b"api.example.test", b"/v1/x") == "api"
    assert names(table, b"www.example.test", b"/v1/x") == "wild"
    assert names(table, b"other.test", b"/v1/x") == "v1"
    assert names(table, b"other.test", b"/") == "static"
    assert names(table, None, b"/") == "static"


def test_no_match_without_default() -> None:
    """Without a default route a request that matches nothing gets None (404);
    an empty table routes nothing."""
    assert RouteTable([API, V1]).match(b"other.test", b"/") is None
    assert RouteTable([]).match(b"api.example.test", b"/") is None


def test_single_is_one_default_route() -> None:
    """The ``--upstream URL`` form routes every request to its one group."""
    table = RouteTable.single("default")
    assert names(table, None, b"*") == "default"
    assert table.routes[0].is_default


def test_ipv6_literal_host() -> None:
    """An IPv6 Host is compared as an address, port dropped, however it is
    abbreviated."""
    table = RouteTable([Route(host="[::1]", upstream="local")])
    assert names(table, b"[::1]:8080", b"/") == "local"
    assert names(table, b"[0:0::1]", b"/") == "local"
    assert names(table, b"[::2]", b"/") is None
    assert names(table, b"[::1", b"/") is None
    assert names(table, b"[not-an-address]:80", b"/") is None


def test_route_after_default_is_an_error() -> None:
    """A route after the default route could never match: refused, naming it."""
    message = r"route 3: comes after the default route \(route 2"
    with pytest.raises(RouteError, match=message) as info:
        RouteTable([API, DEFAULT, V1])
    assert info.value.index == 2


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"host": "api.example.test:8080"}, "without a port"),
        ({"host": "::1"}, "IPv6 address in brackets"),
        ({"host": "a.*.example.test"}, "whole first label"),
        ({"host": "*example.test"}, "whole first label"),
        ({"host": "*."}, "empty"),
        ({"host": "exa mple.test"}, "invalid label"),
        ({"host": "bücher.example"}, "ASCII only"),
        ({"host": "a..b"}, "invalid label"),
        ({"host": "-a.test"}, "invalid label"),
        ({"host": "[::g]"}, "not a valid IPv6"),
        ({"host": "[127.0.0.1]"}, "not a valid IPv6"),
        ({"host": "a" * 64 + ".test"}, "invalid label"),
        ({"host": ("a" * 60 + ".") * 5}, "longer than 253"),
        ({"path_prefix": "v1/"}, "must start with '/'"),
        ({"path_prefix": "/v1?x"}, "not a query"),
        ({"path_prefix": "/v1/../x"}, "dot segments"),
        ({"path_prefix": "/v1/."}, "dot segments"),
    ],
)
def test_bad_route_is_refused_with_its_reason(settings: dict[str, str], message: str) -> None:
    """Each malformed condition is a ValueError that says what is wrong."""
    with pytest.raises(ValueError, match=message):
        Route(upstream="api", **settings)


def test_empty_upstream_name_is_refused() -> None:
    """A route must name a group."""
    with pytest.raises(ValueError, match="must name an upstream group"):
        Route(upstream="")


def test_route_host_is_stored_normalised() -> None:
    """Case and a trailing dot are dropped once, when the route is built."""
    assert Route(host="API.Example.Test.", upstream="a").host == "api.example.test"
    assert Route(host="*.Example.Test", upstream="a").host == "*.example.test"
    assert Route(host="[0:0::1]", upstream="a").host == "[::1]"


def test_upstream_names_and_check() -> None:
    """The table lists the groups it uses; a group not defined is reported
    with the first route that names it."""
    table = RouteTable([API, WILD, Route(host="x.test", upstream="api"), DEFAULT])
    assert table.upstream_names() == {"api", "wild", "static"}
    table.check_upstreams({"api", "wild", "static", "unused"})
    with pytest.raises(RouteError, match=r"route 2: upstream 'wild' is not defined") as info:
        table.check_upstreams({"api", "static"})
    assert info.value.index == 1
    with pytest.raises(RouteError, match=r"\(defined: none\)"):
        table.check_upstreams(())


def test_check_host_name() -> None:
    """Names are lowered and lose a trailing dot; IPv6 loses its brackets."""
    assert check_host_name("Svc_1.Example.") == "svc_1.example"
    assert check_host_name("[::1]") == "::1"
    assert check_host_name("127.0.0.1") == "127.0.0.1"
    with pytest.raises(ValueError, match="empty"):
        check_host_name(".")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", "/"),
        ("/a/b/c/./../../g", "/a/g"),
        ("/mid/content=5/../6", "/mid/6"),
        ("/../../x", "/x"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/a//b", "/a//b"),
        ("/.hidden/..x", "/.hidden/..x"),
    ],
)
def test_remove_dot_segments(path: str, expected: str) -> None:
    """RFC 3986 5.2.4 on absolute paths (examples from its section 5.2.4)."""
    assert remove_dot_segments(path) == expected


def test_request_host_and_path() -> None:
    """The normalised forms that routes compare."""
    assert request_host(None) is None
    assert request_host(b"Example.Test.:443") == "example.test"
    assert request_host("[::FFFF:1.2.3.4]:80") == "[::ffff:102:304]"
    assert request_path(b"*") is None
    assert request_path(b"/a%20b/./c?q=/d#f") == "/a b/c"


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
NAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join)


@given(NAME, NAME, st.integers(1, 65535), st.booleans())
def test_wildcard_property(sub: str, domain: str, port: int, upper: bool) -> None:
    """``*.D`` matches ``S.D`` for every name S, with any port and case, and
    never ``D`` itself."""
    table = RouteTable([Route(host="*." + domain, upstream="w")])
    host = f"{sub}.{domain}:{port}"
    assert names(table, host.upper() if upper else host, b"/") == "w"
    assert names(table, domain, b"/") is None


@given(st.text(alphabet="/.ab%2e", max_size=30))
def test_normalised_path_has_no_dot_segments(tail: str) -> None:
    """Whatever the target, the path routes compare starts with ``/``, has no
    ``.`` or ``..`` segment, and normalising it again changes nothing."""
    path = request_path(("/" + tail).encode())
    assert path is not None
    assert path.startswith("/")
    assert not {".", ".."} & set(path.split("/"))
    assert remove_dot_segments(path) == path


HOSTS = st.sampled_from([None, "a.test", "b.a.test", "c.test"])
PREFIXES = st.sampled_from([None, "/", "/x/", "/x/y", "/z"])
ROUTES = st.lists(
    st.builds(
        Route,
        upstream=st.sampled_from(["g1", "g2", "g3"]),
        host=st.sampled_from([None, "a.test", "*.a.test", "c.test"]),
        path_prefix=PREFIXES,
    ),
    max_size=6,
)


@given(ROUTES, HOSTS, st.sampled_from(["/", "/x/", "/x/y/z", "/z?q", "/q"]))
def test_match_is_the_first_route_whose_conditions_hold(
    routes: list[Route], host: str | None, path: str
) -> None:
    """``match`` agrees with a direct reading of the rules: the first route
    whose host (exact or wildcard) and prefix both hold."""
    defaults = [i for i, route in enumerate(routes) if route.is_default]
    if defaults:
        routes = routes[: defaults[0] + 1]

    def holds(route: Route) -> bool:
        if route.host is not None:
            if host is None:
                return False
            if route.host.startswith("*."):
                if not host.endswith(route.host[1:]):
                    return False
            elif host != route.host:
                return False
        bare = path.split("?")[0]
        return route.path_prefix is None or bare.startswith(route.path_prefix)

    expected = next((route for route in routes if holds(route)), None)
    assert RouteTable(routes).match(host, path) is expected
