"""The SSRF guard: every refused range, the allowlist, registration and resolver checks."""

import ipaddress
import socket

import pytest

from delivery.errors import InvalidWebhookUrlError
from handlers.ssrf import (
    BlockedAddressError,
    GuardedResolver,
    StaticResolver,
    check_literal_host,
    check_url,
    parse_allow_nets,
    refusal_reason,
)

BLOCKED = [
    ("169.254.169.254", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("::1", "loopback"),
    ("10.0.0.1", "private"),
    ("10.255.255.254", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.1", "private"),
    ("192.168.1.1", "private"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"),
    ("fd00::1", "unique local"),
    ("fc00::1", "unique local"),
    ("0.0.0.0", "unspecified"),  # noqa: S104 - an address under test, not a bind
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("192.0.2.10", "private"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.1.2.3", "private"),
    ("64:ff9b::a9fe:a9fe", "metadata"),
]


@pytest.mark.parametrize(("address", "why"), BLOCKED, ids=[a for a, _ in BLOCKED])
def test_blocked_ranges(address: str, why: str) -> None:
    """Each internal or special range is refused, with a reason naming the range."""
    reason = refusal_reason(ipaddress.ip_address(address))
    assert reason is not None
    assert why in reason


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "100.128.0.1", "172.32.0.1", "2606:4700::1111"]
)
def test_public_addresses_allowed(address: str) -> None:
    """Globally routable addresses, including neighbours of refused ranges, pass."""
    assert refusal_reason(ipaddress.ip_address(address)) is None


def test_allowlist_opens_its_range_only() -> None:
    """An allowlisted CIDR opens exactly that range."""
    nets = parse_allow_nets("127.0.0.0/8, 10.1.0.0/16")
    assert refusal_reason(ipaddress.ip_address("127.0.0.1"), nets) is None
    assert refusal_reason(ipaddress.ip_address("10.1.2.3"), nets) is None
    assert refusal_reason(ipaddress.ip_address("10.2.0.1"), nets) is not None
    assert refusal_reason(ipaddress.ip_address("::1"), nets) is not None


def test_allowlist_never_opens_metadata() -> None:
    """Even 0.0.0.0/0 on the allowlist does not open the cloud metadata address."""
    nets = parse_allow_nets("0.0.0.0/0")
    assert refusal_reason(ipaddress.ip_address("169.254.169.254"), nets) is not None


def test_allow_nets_parse_errors_name_the_entry() -> None:
    """A malformed DELIVERY_WEBHOOK_ALLOW_NETS entry is a clear ValueError."""
    with pytest.raises(ValueError, match=r"'10\.0\.0\.1/33'"):
        parse_allow_nets("127.0.0.0/8,10.0.0.1/33")


def test_empty_allow_nets() -> None:
    """An empty setting allowlists nothing."""
    assert parse_allow_nets("") == ()


RESOLVER = StaticResolver(
    {
        "hooks.example.com": ["93.184.216.34"],
        "internal.example.com": ["10.0.0.5"],
        "mixed.example.com": ["93.184.216.34", "127.0.0.1"],
        "localhost": ["127.0.0.1", "::1"],
    }
)


async def test_check_url_accepts_public_destination() -> None:
    """A public https URL passes and reports what it resolved to."""
    checked = await check_url("https://hooks.example.com/sonzai?x=1", (), RESOLVER)
    assert checked.port == 443
    assert checked.addresses == (ipaddress.ip_address("93.184.216.34"),)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://internal.example.com/hook", "10.0.0.5 is private"),
        ("https://mixed.example.com/hook", "127.0.0.1 is loopback"),
        ("http://localhost:8080/hook", "loopback"),
        ("http://169.254.169.254/latest/meta-data", "metadata"),
        ("http://[::1]:9000/", "loopback"),
        ("http://[fd00::1]/", "unique local"),
        ("http://100.64.0.1/", "carrier-grade NAT"),
        ("http://192.168.0.10/", "private"),
        ("http://172.16.5.4/", "private"),
        ("https://unknown.example.com/", "does not resolve"),
        ("ftp://hooks.example.com/", "http:// or https://"),
        ("/relative/path", "http:// or https://"),
        ("https://user:pw@hooks.example.com/", "credentials"),
        ("https://hooks.example.com:99999/", "invalid port"),
        ("https://" + "a" * 2050 + ".com/", "longer than"),
    ],
    ids=[
        "name-to-private",
        "name-with-one-internal-address",
        "localhost",
        "metadata",
        "ipv6-loopback",
        "ula",
        "cgnat",
        "192.168",
        "172.16",
        "unresolvable",
        "ftp",
        "relative",
        "credentials",
        "bad-port",
        "too-long",
    ],
)
async def test_check_url_refuses(url: str, message: str) -> None:
    """Registration refuses the URL with INVALID_WEBHOOK_URL on field webhook_url."""
    with pytest.raises(InvalidWebhookUrlError, match=message) as info:
        await check_url(url, (), RESOLVER)
    assert info.value.field == "webhook_url"
    assert info.value.to_body()["code"] == "INVALID_WEBHOOK_URL"


async def test_check_url_honours_allowlist() -> None:
    """Tests and local setups allowlist 127.0.0.0/8 and ::1 to reach local receivers."""
    nets = parse_allow_nets("127.0.0.0/8,::1/128")
    checked = await check_url("http://localhost:8080/hook", nets, RESOLVER)
    assert len(checked.addresses) == 2


async def test_guarded_resolver_refuses_internal_name() -> None:
    """At connect time a name resolving to an internal address raises BlockedAddressError."""
    guard = GuardedResolver((), RESOLVER)
    with pytest.raises(BlockedAddressError, match=r"10\.0\.0\.5"):
        await guard.resolve("internal.example.com", 443, socket.AF_UNSPEC)


async def test_guarded_resolver_returns_vetted_addresses() -> None:
    """Allowed addresses come back as numeric results for aiohttp to connect to."""
    guard = GuardedResolver(parse_allow_nets("127.0.0.0/8,::1/128"), RESOLVER)
    results = await guard.resolve("localhost", 80, socket.AF_UNSPEC)
    assert [(r["host"], r["family"]) for r in results] == [
        ("127.0.0.1", socket.AF_INET),
        ("::1", socket.AF_INET6),
    ]
    only_v4 = await guard.resolve("localhost", 80, socket.AF_INET)
    assert [r["host"] for r in only_v4] == ["127.0.0.1"]


def test_literal_host_check() -> None:
    """IP-literal hosts are checked directly; names are left to the resolver."""
    with pytest.raises(BlockedAddressError):
        check_literal_host("[::1]")
    check_literal_host("127.0.0.1", parse_allow_nets("127.0.0.0/8"))
    check_literal_host("hooks.example.com")
