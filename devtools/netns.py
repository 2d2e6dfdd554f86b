"""A network of a test's own: a namespace joined to the root namespace by veth pairs, links
that can be cut and healed, and a relay that adds latency (tests and benchmarks; root only).

Nothing here touches ``lo`` or the host's own interfaces: every qdisc is put on a veth of
ours, every address is on a veth of ours, and ``close()`` deletes the namespace and the
veths (deleting one end of a veth deletes both).

A cut drops every packet both ways on the link's two ends (``tc ... tbf`` with a one-byte
bucket and queue: the effect of ``netem loss 100%``, which needs ``sch_netem``, a module
some kernels, e.g. this project's CI VMs, do not have). The link stays up, so the two ends
see silence, not an error: a half-open connection, as a real partition gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from workers.errors import ConfigError

DROP_ALL = ("tbf", "rate", "8bit", "burst", "1", "limit", "1")


def unavailable() -> str | None:
    """Why this process cannot build a network of its own (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2, util-linux)"
    probe = f"rip{uuid.uuid4().hex[:8]}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        return f"ip netns is unavailable: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, check=False)
    return None


def _ip(*argv: str, ns: str | None = None) -> None:
    cmd = [*(("ip", "netns", "exec", ns) if ns else ()), *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ConfigError(f"{' '.join(cmd)}: {done.stderr.strip()}")


@dataclass
class Link:
    """One veth pair: ``host`` (root namespace, address ``host_ip``) and ``peer`` (in the
    namespace, ``peer_ip``)."""

    ns: str
    host: str
    peer: str
    host_ip: str
    peer_ip: str
    cut_now: bool = False

    def cut(self) -> None:
        """Drop everything both ways, the link left up: silence, as in a partition."""
        if not self.cut_now:
            _ip("tc", "qdisc", "add", "dev", self.host, "root", *DROP_ALL)
            _ip("tc", "qdisc", "add", "dev", self.peer, "root", *DROP_ALL, ns=self.ns)
            self.cut_now = True

    def heal(self) -> None:
        if self.cut_now:
            _ip("tc", "qdisc", "del", "dev", self.host, "root")
            _ip("tc", "qdisc", "del", "dev", self.peer, "root", ns=self.ns)
            self.cut_now = False


def _free_subnets(count: int) -> list[ipaddress.IPv4Network]:
    """``count`` /30 networks in 10.200.0.0/13 that no interface of the host uses."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True,
                          check=True).stdout
    taken = [ipaddress.ip_interface(w).network for w in used.split() if "/" in w
             and w[0].isdigit()]
    pool = ipaddress.ip_network("10.200.0.0/13")
    for _ in range(100):
        base = random.randrange(0, pool.num_addresses // 4 - count) * 4
        nets = [ipaddress.IPv4Network(f"{pool.network_address + base + 4 * i}/30")
                for i in range(count)]
        if not any(n.overlaps(t) for n in nets for t in taken):
            return nets
    raise ConfigError("no free 10.200.0.0/13 subnet for a test network")


class Network:
    """A namespace with one link per name (``Network(["redis", "postgres"])``)."""

    def __init__(self, names: Sequence[str]) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns = f"ri{tag}"
        self.links: dict[str, Link] = {}
        _ip("ip", "netns", "add", self.ns)
        try:
            _ip("ip", "link", "set", "lo", "up", ns=self.ns)
            for i, (name, net) in enumerate(zip(names, _free_subnets(len(names)),
                                                strict=True)):
                host, peer = f"ri{tag}h{i}", f"ri{tag}n{i}"
                hosts = list(net.hosts())
                link = Link(self.ns, host, peer, str(hosts[0]), str(hosts[1]))
                _ip("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
                _ip("ip", "link", "set", peer, "netns", self.ns)
                _ip("ip", "addr", "add", f"{link.host_ip}/30", "dev", host)
                _ip("ip", "link", "set", host, "up")
                _ip("ip", "addr", "add", f"{link.peer_ip}/30", "dev", peer, ns=self.ns)
                _ip("ip", "link", "set", peer, "up", ns=self.ns)
                self.links[name] = link
        except BaseException:
            self.close()
            raise

    def wrap(self, hostname: str | None = None) -> list[str]:
        """A command prefix that execs its command in the namespace; with ``hostname``
        under a host name of its own (a UTS namespace): to the others, another host."""
        inside = ["ip", "netns", "exec", self.ns]
        if hostname is None:
            return inside
        return [*inside, "unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"',
                hostname]

    def cut(self, *names: str) -> None:
        for name in names or tuple(self.links):
            self.links[name].cut()

    def heal(self, *names: str) -> None:
        for name in names or tuple(self.links):
            self.links[name].heal()

    def close(self) -> None:
        for link in self.links.values():
            subprocess.run(["ip", "link", "delete", link.host], capture_output=True,
                           check=False)
        subprocess.run(["ip", "netns", "delete", self.ns], capture_output=True, check=False)
        self.links = {}


class DelayRelay:
    """TCP relays, on a thread of their own, that hold every byte going to the server
    ``delay`` seconds before passing it on: each round trip through them takes that much
    longer (what ``netem delay`` on the client's side of the link would do).

    ``relay(listen_host, target_host, target_port)`` returns the port it listens on.
    ``close()`` ends them and every connection they hold.
    """

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-relay",
                                        daemon=True)
        self._thread.start()

    def relay(self, listen_host: str, target_host: str, target_port: int) -> int:
        async def start() -> int:
            server = await asyncio.start_server(
                lambda r, w: self._serve(r, w, target_host, target_port), listen_host, 0)
            self._servers.append(server)
            return int(server.sockets[0].getsockname()[1])

        return asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     host: str, port: int) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        for w in (writer, up_writer):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(self._pump(reader, up_writer, self.delay),
                                 self._pump(up_reader, writer, 0.0))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    delay: float) -> None:
        """Copy ``reader`` to ``writer``, each chunk ``delay`` s after it arrived, in order."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            with contextlib.suppress(OSError):
                writer.write_eof()

        sender = asyncio.ensure_future(send())
        try:
            while True:
                data = await reader.read(65536)
                await queue.put((loop.time() + delay, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()

    def close(self) -> None:
        async def stop() -> None:
            for server in self._servers:
                server.close()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
