"""
The SSRF guard for webhook destinations.

A destination whose host is, or resolves to, a loopback, private, link-local, CGNAT,
cloud-metadata, IPv6 ULA or site-local, unspecified, multicast or reserved address is
refused, unless ``DELIVERY_WEBHOOK_ALLOW_NETS`` allowlists it; so is an IPv6 address
that carries a refused IPv4 address (IPv4-mapped, NAT64, 6to4, Teredo). It is checked
twice:

- at registration, by :func:`check_url` (resolve the name, check every address);
- at send time, by :class:`GuardedResolver`, through which the sender's connections
  (``handlers.webhooks.transport``) resolve every name: a socket is connected only to
  addresses the resolver returned, and the resolver returns only addresses it vetted,
  so a name re-pointed after registration (DNS rebinding) cannot reach an internal
  address. IP-literal hosts are not resolved, so the sender checks those with
  :func:`check_literal_host` before connecting.

:func:`refusal_reason` is pure; the rest resolves names through an injected
:class:`Resolver`.
"""

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult

from delivery.errors import InvalidWebhookUrlError
from handlers.classify import PermanentSendError

type IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
type IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud metadata services: AWS/GCP/Azure/OpenStack, AWS over IPv6, Alibaba. They sit in
# ranges refused anyway (link-local, ULA, CGNAT) but get a reason of their own, and
# stay refused even if an operator allowlists the surrounding range by mistake.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("fd00:ec2::254"),
        ipaddress.ip_address("100.100.100.200"),
    }
)

# RFC 6598 shared address space; Python's is_private does not include it.
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_ULA = ipaddress.ip_network("fc00::/7")  # RFC 4193
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: embeds an IPv4 address
# RFC 8215 local-use NAT64: the operator picks the prefix length (/48 to /96), so where
# the IPv4 address sits, and whether it is internal, cannot be told from the address.
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")

MAX_URL_LENGTH = 2048


class BlockedAddressError(PermanentSendError, OSError):
    """
    A destination address the SSRF guard refuses.

    An ``OSError`` so that aiohttp treats it like any resolver failure (it wraps it in
    ``ClientConnectorDNSError``); a :class:`~handlers.classify.PermanentSendError` so
    that the classifier does not retry it.
    """


def parse_allow_nets(spec: str | Iterable[str]) -> tuple[IPNetwork, ...]:
    """
    Parse ``DELIVERY_WEBHOOK_ALLOW_NETS``: comma-separated CIDRs (``127.0.0.0/8,::1/128``).

    Raises:
        ValueError: an entry is not a network (host bits set count as invalid).
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    nets: list[IPNetwork] = []
    for item in items:
        text = item.strip()
        if not text:
            continue
        try:
            nets.append(ipaddress.ip_network(text))
        except ValueError as exc:
            raise ValueError(f"webhook_allow_nets: {text!r} is not a CIDR network") from exc
    return tuple(nets)


def _translated_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """
    The IPv4 address a connection to ``ip`` reaches in its place: IPv4-mapped
    (``::ffff:0:0/96``, which the kernel connects to over IPv4) and NAT64's well-known
    prefix (``64:ff9b::/96``, which the translator connects to).
    """
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _tunnelled_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """
    The IPv4 addresses a tunnelled IPv6 address routes through: the 6to4 router
    (``2002::/16``), or the Teredo server and client (``2001::/32``; ``ipaddress``
    undoes the client address's bit inversion).
    """
    if ip.sixtofour is not None:
        return (ip.sixtofour,)
    if ip.teredo is not None:
        return ip.teredo
    return ()


def refusal_reason(ip: IPAddress, allow_nets: Sequence[IPNetwork] = ()) -> str | None:
    """
    Why ``ip`` may not be a webhook destination, or ``None`` when it may.

    An address in ``allow_nets`` is allowed, except a cloud metadata address, which no
    allowlist opens, in whatever form it is embedded.

    IPv6 addresses that carry an IPv4 address are refused when it is:

    - IPv4-mapped (``::ffff:10.0.0.1``) and NAT64 (``64:ff9b::a00:1``) addresses reach
      that IPv4 address itself, so they are judged by it alone, allowlist included
      (``127.0.0.0/8`` opens ``::ffff:127.0.0.1``);
    - 6to4 (``2002:7f00:1::``) and Teredo addresses are routed through theirs, so a
      non-public embedded address refuses them whatever the allowlist says of the IPv4
      range (the tunnel endpoint is not the destination the operator opened); only
      listing the IPv6 range itself (``2002:7f00::/24``) opens them. A 6to4 address
      around a public IPv4 address is public; Teredo is never globally routable.

    IPv4-compatible addresses (``::/96``, deprecated by RFC 4291; inside ``::/8``, which
    ``ipaddress`` reports reserved) and local-use NAT64 (``64:ff9b:1::/48``) are refused
    whatever they carry, unless allowlisted as IPv6 ranges.
    """
    translated: ipaddress.IPv4Address | None = None
    tunnelled: tuple[ipaddress.IPv4Address, ...] = ()
    if isinstance(ip, ipaddress.IPv6Address):
        translated = _translated_ipv4(ip)
        tunnelled = _tunnelled_ipv4(ip)
    for carried in (ip, translated, *tunnelled):
        if carried in METADATA_ADDRESSES:
            what = f"{carried} is a cloud metadata address"
            return what if carried is ip else f"{ip} embeds {what}"
    if any(ip.version == net.version and ip in net for net in allow_nets):
        return None
    if translated is not None:
        reason = refusal_reason(translated, allow_nets)
        return f"{ip} embeds {reason}" if reason else None
    for inner in tunnelled:
        reason = refusal_reason(inner)
        if reason is not None:
            return f"{ip} embeds {reason}"
    v6 = isinstance(ip, ipaddress.IPv6Address)
    # Deprecated by RFC 3879 but still routed inside some networks; ipaddress counts
    # it as global.
    site_local = isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local
    checks: tuple[tuple[bool, str], ...] = (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.version == 4 and ip in _CGNAT, "carrier-grade NAT (100.64.0.0/10)"),
        (v6 and ip in _ULA, "IPv6 unique local (fc00::/7)"),
        (site_local, "IPv6 site-local (fec0::/10)"),
        (v6 and ip in _LOCAL_NAT64, "local-use NAT64 (64:ff9b:1::/48)"),
        (ip.is_multicast, "multicast"),
        (ip.is_reserved, "reserved"),
        (ip.is_private, "private"),
        (not ip.is_global, "not globally routable"),
    )
    for refused, what in checks:
        if refused:
            return f"{ip} is {what}"
    return None


def check_address(ip: IPAddress, allow_nets: Sequence[IPNetwork] = ()) -> None:
    """
    Raises:
        BlockedAddressError: ``ip`` is refused (see :func:`refusal_reason`).
    """
    reason = refusal_reason(ip, allow_nets)
    if reason is not None:
        raise BlockedAddressError(f"destination refused: {reason}")


def check_literal_host(host: str, allow_nets: Sequence[IPNetwork] = ()) -> None:
    """
    Check ``host`` when it is an IP literal (never resolved); names pass
    through untouched, for :class:`GuardedResolver` to check at connect time.

    Raises:
        BlockedAddressError: ``host`` is a refused IP literal.
    """
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return
    check_address(ip, allow_nets)


class Resolver:
    """
    Name resolution as the guard needs it: every address ``host`` resolves to.

    The default uses the event loop's ``getaddrinfo`` (a thread pool), as aiohttp's
    ``ThreadedResolver`` does. Subclasses (:class:`StaticResolver`) replace it in tests.
    """

    async def resolve(self, host: str, port: int) -> list[str]:
        """
        Raises:
            OSError: the name does not resolve (``socket.gaierror``).
        """
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        seen: dict[str, None] = {}
        for _family, _type, _proto, _canon, sockaddr in infos:
            seen.setdefault(str(sockaddr[0]), None)
        return list(seen)


class StaticResolver(Resolver):
    """A fixed name -> addresses table (a test seam, like httpx's ``MockTransport``)."""

    def __init__(self, table: Mapping[str, Sequence[str]]) -> None:
        self._table = {name.lower(): list(addrs) for name, addrs in table.items()}

    async def resolve(self, host: str, port: int) -> list[str]:
        try:
            return list(self._table[host.lower().rstrip(".")])
        except KeyError:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} is not in the table") from None


@dataclass(frozen=True, slots=True)
class CheckedUrl:
    """A destination that passed :func:`check_url`, with the addresses it resolved to."""

    url: str
    host: str
    port: int
    addresses: tuple[IPAddress, ...]


async def check_url(
    url: str,
    allow_nets: Sequence[IPNetwork],
    resolver: Resolver,
    *,
    timeout_s: float = 5.0,
) -> CheckedUrl:
    """
    Validate a webhook URL at registration: shape, then every resolved address.

    Every address must be allowed, not just one: a name answering with one public and
    one internal address would otherwise let a later connection pick the internal one.

    Raises:
        InvalidWebhookUrlError: (field ``webhook_url``) not an absolute http(s) URL,
            control characters or credentials in the URL, a name that does not resolve,
            or a refused address.
    """

    def bad(why: str) -> InvalidWebhookUrlError:
        return InvalidWebhookUrlError("webhook_url", f"webhook_url {why}")

    if len(url) > MAX_URL_LENGTH:
        raise bad(f"is longer than {MAX_URL_LENGTH} characters")
    text = url.strip()
    if any(ch < " " or ch == "\x7f" for ch in text):
        # urlsplit silently drops tab, CR and LF, so the host checked here could differ
        # from the one the URL names, and httpx refuses every such URL at send time.
        raise bad("must not contain control characters")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise bad("must be an absolute http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        # Credentials belong in auth_header, never in a URL that gets logged.
        raise bad("must not carry credentials; use auth_header")
    host = parts.hostname
    if not host:
        raise bad("has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise bad("has an invalid port") from None
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses: tuple[IPAddress, ...] = (literal,)
    else:
        try:
            async with asyncio.timeout(timeout_s):
                resolved = await resolver.resolve(host, port)
        except (OSError, TimeoutError):
            raise bad(f"host {host!r} does not resolve") from None
        addresses = tuple(ipaddress.ip_address(a.split("%", 1)[0]) for a in resolved)
        if not addresses:
            raise bad(f"host {host!r} does not resolve")
    for ip in addresses:
        reason = refusal_reason(ip, allow_nets)
        if reason is not None:
            raise bad(f"points to a refused address: {reason}")
    return CheckedUrl(url=url, host=host, port=port, addresses=addresses)


class GuardedResolver(AbstractResolver):
    """
    A resolver that returns only vetted addresses (send-time SSRF check); an aiohttp
    ``AbstractResolver``, so it can also serve an aiohttp connector.

    If *any* address of a name is refused the whole lookup fails with
    :class:`BlockedAddressError`, for the reason given in :func:`check_url`.
    """

    def __init__(self, allow_nets: Sequence[IPNetwork] = (), resolver: Resolver | None = None):
        self._allow_nets = tuple(allow_nets)
        self._resolver = resolver or Resolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await self._resolver.resolve(host, port)
        results: list[ResolveResult] = []
        for text in addresses:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
            reason = refusal_reason(ip, self._allow_nets)
            if reason is not None:
                raise BlockedAddressError(f"destination {host!r} refused: {reason}")
            ip_family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            if family not in (socket.AF_UNSPEC, ip_family):
                continue
            results.append(
                ResolveResult(
                    hostname=host,
                    host=str(ip),
                    port=port,
                    family=ip_family,
                    proto=0,
                    flags=socket.AI_NUMERICHOST,
                )
            )
        if not results:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} has no usable address")
        return results

    async def close(self) -> None:
        """Nothing to release: the default resolver uses the loop's executor."""
