"""`--url dns:///NAME:PORT`: every address behind a name (a Kubernetes headless Service), kept current.

gRPC keeps one HTTP/2 connection per server, so a Service with one virtual IP sends a client's
every request to one pod. With `dns:///NAME:PORT` (gRPC's own URL form) the client resolves every
address behind the name, connects to each (the pool spreads requests over them, with its health
checks and retries), and resolves again every `interval` seconds: new pods join once they pass the
pre-flight, removed ones leave (they get no new requests; the ones in flight finish or are retried).
The resolver is injectable (tests resolve a name to loopback servers).
"""
from __future__ import annotations

import asyncio
import socket
from typing import Any, Callable, Sequence

DNS_PREFIX = "dns:///"
Resolver = Callable[[str, int], Sequence[str]]  # (name, port) -> ["host:port", ...]


def is_dns(url: str) -> bool:
    return url.startswith(DNS_PREFIX)


def parse_dns(url: str) -> tuple[str, int]:
    rest = url[len(DNS_PREFIX):].rstrip("/")
    name, sep, port = rest.rpartition(":")
    if not sep or not name or not port.isdigit():
        raise ValueError(f"{url}: expected dns:///NAME:PORT (e.g. dns:///coordexp-server-headless.coordexp:8001)")
    return name, int(port)


def system_resolver(name: str, port: int) -> list[str]:
    """Every address of `name` (IPv4 and IPv6), as host:port, sorted."""
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    out = set()
    for family, _t, _p, _c, addr in infos:
        host = addr[0]
        out.add(f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}")
    return sorted(out)


def expand(urls: Sequence[str], resolver: Resolver | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(every address to connect to, the dns targets to keep resolving)."""
    resolver = resolver or system_resolver
    out: list[str] = []
    targets: list[tuple[str, int]] = []
    for u in urls:
        if is_dns(u):
            name, port = parse_dns(u)
            targets.append((name, port))
            out.extend(a for a in resolver(name, port) if a not in out)
        elif u not in out:
            out.append(u)
    return out, targets


async def watch(pool: Any, targets: Sequence[tuple[str, int]], resolver: Resolver | None, interval: float,
                preflight_timeout: float = 10.0) -> None:
    """Every `interval` s: resolve `targets`; addresses that appeared join `pool` after their pre-flight
    (`pool.admit`), addresses that vanished retire (no new requests)."""
    resolver = resolver or system_resolver
    while True:
        await asyncio.sleep(interval)
        now: list[str] = []
        for name, port in targets:
            now.extend(await asyncio.get_running_loop().run_in_executor(None, resolver, name, port))
        dns_urls = {s.url for s in pool.servers if s.from_dns}
        for url in now:
            known = next((s for s in pool.servers if s.url == url), None)
            if known is not None:
                if known.retired:  # it came back
                    known.retired = False
                    pool.changed()
                continue
            await pool.admit(url, preflight_timeout)  # not ready yet: the next round tries again
        for url in dns_urls - set(now):
            pool.retire(url)
