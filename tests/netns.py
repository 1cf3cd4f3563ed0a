"""Hosts of a test's own: network namespaces on one switch, removed after.

`Network.create(["redis", "api1", ...])` makes, under a random prefix
(`tf-<hex>-`), a namespace per host and one for the switch (a Linux bridge).
Each host gets a veth pair: `eth0` inside the host, its other end a port of
the bridge. One more pair has its host end in this namespace, so the test
itself (and the processes it starts without a `Host`) reach every host, as a
client on the network would. The addresses are a private /24 that no address
or route of this machine touches (10.213.x.0/24, x random).

`cut(host)` takes the host's bridge port down: a pulled cable. The host's own
interface stays up and keeps its routes, so its packets go nowhere and its
TCP connections hang, as on a real partition (taking `eth0` itself down
would fail its sends at once, which is kinder than a partition).
`mend(host)` plugs it back. `close()` deletes every namespace and link it
made, whatever state the test left them in.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field

from tests.procs import Host

# The block the test networks are picked from: private, and unlikely to be anyone's.
BLOCK = "10.213"
ROOT_OCTET = 254  # this namespace's own address on the test network
IP_TIMEOUT_S = 10.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=check)


def unavailable() -> str | None:
    """Why this process cannot make network namespaces (None: it can)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "`ip netns` needs root"
    probe = f"tf-{secrets.token_hex(3)}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this namespace has an address or a route in."""
    nets = []
    for entry in json.loads(_ip("-j", "-4", "addr").stdout or "[]"):
        for a in entry.get("addr_info", []):
            nets.append(ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default" and ":" not in dst:
            nets.append(ipaddress.IPv4Network(dst, strict=False))
    return nets


def free_subnet() -> str:
    """A /24 of BLOCK that overlaps nothing of this machine's, as `a.b.c` (random among the free ones)."""
    used = _used_networks()
    free = [f"{BLOCK}.{x}" for x in range(1, 255)
            if not any(n.overlaps(ipaddress.IPv4Network(f"{BLOCK}.{x}.0/24")) for n in used)]
    if not free:
        raise RuntimeError(f"every {BLOCK}.x.0/24 is in use on this machine")
    return free[secrets.randbelow(len(free))]


@dataclass
class Network:
    prefix: str
    subnet: str
    hosts: dict[str, Host] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-switch"

    @property
    def root_link(self) -> str:
        return f"{self.prefix.replace('-', '')}-r"  # in this namespace; at most 15 characters

    @property
    def root_address(self) -> str:
        return f"{self.subnet}.{ROOT_OCTET}"

    @classmethod
    def create(cls, names: list[str]) -> Network:
        net = cls(f"tf-{secrets.token_hex(2)}", free_subnet())
        try:
            net._switch()
            for i, name in enumerate(names, start=1):
                net._host(name, f"{net.subnet}.{i}")
            net._root()
        except BaseException:
            net.close()
            raise
        return net

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _switch(self) -> None:
        self._add_ns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def _port(self, name: str) -> str:
        return f"p-{name}"[:15]

    def _plug(self, port: str) -> None:
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")

    def _host(self, name: str, address: str) -> None:
        ns = f"{self.prefix}-{name}"
        self._add_ns(ns)
        _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", self._port(name), "netns", self.switch)
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        self._plug(self._port(name))
        self.hosts[name] = Host(address, ns)

    def _root(self) -> None:
        _ip("link", "add", self.root_link, "type", "veth", "peer", "name", self._port("root"), "netns", self.switch)
        _ip("addr", "add", f"{self.root_address}/24", "dev", self.root_link)
        _ip("link", "set", self.root_link, "up")
        self._plug(self._port("root"))

    def host(self, name: str) -> Host:
        return self.hosts[name]

    def cut(self, name: str) -> None:
        _ip("-n", self.switch, "link", "set", self._port(name), "down")

    def mend(self, name: str) -> None:
        _ip("-n", self.switch, "link", "set", self._port(name), "up")

    def close(self) -> None:
        """Delete everything made; a namespace's links (and their peers) go with it."""
        _ip("link", "del", self.root_link, check=False)
        for ns in reversed(self.namespaces):
            _ip("netns", "del", ns, check=False)
        self.namespaces.clear()

    def leftovers(self) -> list[str]:
        """Namespaces and links of this network still present (empty after `close`)."""
        names = [n.split()[0] for n in _ip("netns", "list").stdout.splitlines() if n.strip()]
        links = json.loads(_ip("-j", "link").stdout or "[]")
        return ([n for n in names if n.startswith(self.prefix + "-")]
                + [str(link["ifname"]) for link in links if link.get("ifname") == self.root_link])
