"""The SSRF guard: every refused range, the allowlist, registration and resolver checks."""

import ipaddress
import re
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
    ("64:ff9b::a00:1", "embeds 10.0.0.1 is private"),
    ("::ffff:169.254.169.254", "metadata"),
    # 6to4 (2002::/16) wrapping a non-public IPv4 address.
    ("2002:7f00:1::", "embeds 127.0.0.1 is loopback"),
    ("2002:a9fe:a9fe::", "embeds 169.254.169.254 is a cloud metadata address"),
    ("2002:a00:1::", "embeds 10.0.0.1 is private"),
    ("2002:ac10:1::5", "embeds 172.16.0.1 is private"),
    ("2002:c0a8:101::1", "embeds 192.168.1.1 is private"),
    ("2002:a9fe:101::", "embeds 169.254.1.1 is link-local"),
    ("2002:6440:1::", "embeds 100.64.0.1 is carrier-grade NAT"),
    ("2002::1", "embeds 0.0.0.0 is unspecified"),
    ("2002:e000:1::", "embeds 224.0.0.1 is multicast"),
    ("2002:c000:20a::", "embeds 192.0.2.10 is private"),
    # Site-local (fec0::/10, deprecated but still routed in some networks).
    ("fec0::1", "site-local"),
    ("feff:ffff::1", "site-local"),
    # Teredo (2001::/32): the client address is stored bit-inverted.
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "embeds 127.0.0.1 is loopback"),
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "embeds 10.0.0.1 is private"),
    ("2001:0:a9fe:a9fe::f7f7:f7f7", "metadata"),
    ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", "private"),
    # IPv4-compatible (::/96, deprecated) and local-use NAT64 (64:ff9b:1::/48).
    ("::7f00:1", "reserved"),
    ("::808:808", "reserved"),
    ("64:ff9b:1::808:808", "local-use NAT64"),
    ("64:ff9b:1:7f00:1::", "local-use NAT64"),
]
BLOCKED_IDS = [a for a, _ in BLOCKED]


def url_host(address: str) -> str:
    """``address`` as a URL host: IPv6 literals in brackets."""
    return f"[{address}]" if ":" in address else address


@pytest.mark.parametrize(("address", "why"), BLOCKED, ids=BLOCKED_IDS)
def test_blocked_ranges(address: str, why: str) -> None:
    """Each internal or special range is refused, with a reason naming the range."""
    reason = refusal_reason(ipaddress.ip_address(address))
    assert reason is not None
    assert why in reason


@pytest.mark.parametrize(("address", "why"), BLOCKED, ids=BLOCKED_IDS)
async def test_registration_refuses_blocked_ranges(address: str, why: str) -> None:
    """Registration refuses each range as an IP-literal host and as a name resolving to it."""
    literal = f"http://{url_host(address)}:8080/hook"
    with pytest.raises(InvalidWebhookUrlError, match=re.escape(why)) as info:
        await check_url(literal, (), RESOLVER)
    assert info.value.field == "webhook_url"
    named = StaticResolver({"tenant.example.com": ["93.184.216.34", address]})
    with pytest.raises(InvalidWebhookUrlError, match=re.escape(why)):
        await check_url("https://tenant.example.com/hook", (), named)


@pytest.mark.parametrize(("address", "why"), BLOCKED, ids=BLOCKED_IDS)
async def test_connect_time_refuses_blocked_ranges(address: str, why: str) -> None:
    """At connect time the guarded resolver and the IP-literal check refuse each range."""
    guard = GuardedResolver((), StaticResolver({"tenant.example.com": [address]}))
    with pytest.raises(BlockedAddressError, match=re.escape(why)):
        await guard.resolve("tenant.example.com", 443, socket.AF_UNSPEC)
    with pytest.raises(BlockedAddressError, match=re.escape(why)):
        check_literal_host(url_host(address))


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34",
        "8.8.8.8",
        "100.128.0.1",
        "172.32.0.1",
        "2606:4700::1111",
        "2002:5db8:d822::1",  # 6to4 around the public 93.184.216.34
        "64:ff9b::808:808",  # NAT64 of the public 8.8.8.8
        "::ffff:8.8.8.8",
    ],
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


@pytest.mark.parametrize(
    ("address", "nets"),
    [
        ("::ffff:169.254.169.254", "::ffff:0:0/96"),
        ("64:ff9b::a9fe:a9fe", "64:ff9b::/96"),
        ("2002:a9fe:a9fe::", "2002::/16"),
        ("2001:0:a9fe:a9fe::f7f7:f7f7", "2001::/32"),
    ],
)
def test_allowlisting_an_ipv6_range_never_opens_embedded_metadata(address: str, nets: str) -> None:
    """The metadata address stays refused inside any IPv6 form, whatever range is allowlisted."""
    reason = refusal_reason(ipaddress.ip_address(address), parse_allow_nets(nets))
    assert reason is not None
    assert "169.254.169.254 is a cloud metadata address" in reason


def test_ipv4_allowlist_opens_translated_but_not_tunnelled_forms() -> None:
    """
    An IPv4 allowlist opens the IPv4-mapped and NAT64 forms (they reach that address
    itself) but not 6to4 or Teredo, which only listing their IPv6 range opens.
    """
    v4 = parse_allow_nets("127.0.0.0/8,10.0.0.0/8")
    ip = ipaddress.ip_address
    assert refusal_reason(ip("::ffff:127.0.0.1"), v4) is None
    assert refusal_reason(ip("64:ff9b::a00:1"), v4) is None
    for tunnelled in ("2002:7f00:1::", "2002:a00:1::", "2001:0:4136:e378:8000:63bf:80ff:fffe"):
        reason = refusal_reason(ip(tunnelled), v4)
        assert reason is not None, tunnelled
        assert "embeds" in reason
    v6 = parse_allow_nets("2002:7f00::/24,fec0::/10,2001::/32,64:ff9b:1::/48")
    for opened in (
        "2002:7f00:1::",
        "fec0::1",
        "2001:0:4136:e378:8000:63bf:80ff:fffe",
        "64:ff9b:1::808:808",
    ):
        assert refusal_reason(ip(opened), v6) is None, opened
    assert refusal_reason(ip("2002:a00:1::"), v6) is not None


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
        ("http://127.0.0.1\n.hooks.example.com/", "control characters"),
        ("https://hooks.example.com/a\r\nX-Injected: 1", "control characters"),
        ("https://hooks.example.com/a\x00", "control characters"),
        ("https://hooks.example.com/a\tb", "control characters"),
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
        "lf-in-host",
        "crlf-in-path",
        "nul",
        "tab",
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
