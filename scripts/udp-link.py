#!/usr/bin/env python3
"""A userspace UDP link emulator for measuring QUIC on edge-like links, on loopback.

This kernel has no sch_netem, so delay and random loss cannot come from tc. This relay sits
between a QUIC client and a server (both on 127.0.0.1), forwards every datagram both ways, and
applies per direction what an LTE or Wi-Fi uplink does: a bottleneck rate (serialization at
--rate-mbit with a --queue-kb buffer, tail drop when full: the congestion signal), a one-way
--delay-ms, and random --loss-pct loss that has nothing to do with congestion. Real packets,
real sockets; it prints what it forwarded and dropped when it ends (SIGTERM/SIGINT).

    scripts/udp-link.py --listen 127.0.0.1:7543 --to 127.0.0.1:7443 \\
        --rate-mbit 10 --delay-ms 50 --loss-pct 1
    edgectl --node 127.0.0.1:7543 push ...

Only loopback addresses are accepted: it never sends anywhere else.
"""

import argparse
import asyncio
import ipaddress
import random
import signal
import sys


def loopback(text):
    host, _, port = text.rpartition(":")
    if not ipaddress.ip_address(host).is_loopback:
        raise argparse.ArgumentTypeError(f"{text}: only loopback addresses")
    return host, int(port)


class Direction:
    """One direction of the link: a FIFO bottleneck, then a fixed delay, with random loss."""

    def __init__(self, name, args, loop, send):
        self.name = name
        self.rate = args.rate_mbit * 1e6 / 8  # bytes/s; 0 = unlimited
        self.delay = args.delay_ms / 1000
        self.loss = args.loss_pct / 100
        self.queue_limit = args.queue_kb * 1024
        self.loop = loop
        self.send = send
        self.free_at = 0.0  # when the bottleneck finishes the packets already queued
        self.forwarded = self.random_drops = self.queue_drops = 0
        self.bytes = 0

    def push(self, data):
        now = self.loop.time()
        if self.rate:
            backlog = max(0.0, self.free_at - now) * self.rate
            if backlog + len(data) > self.queue_limit:
                self.queue_drops += 1
                return
            self.free_at = max(now, self.free_at) + len(data) / self.rate
            leaves = self.free_at
        else:
            leaves = now
        if random.random() < self.loss:
            self.random_drops += 1
            return
        self.forwarded += 1
        self.bytes += len(data)
        self.loop.call_at(leaves + self.delay, self.send, data)

    def report(self):
        return (f"{self.name}: {self.forwarded} datagrams ({self.bytes} bytes) forwarded, "
                f"{self.random_drops} lost at random, {self.queue_drops} dropped at a full queue")


class Relay(asyncio.DatagramProtocol):
    def __init__(self, args, loop):
        self.args = args
        self.loop = loop
        self.client = None
        self.server_side = None
        self.up = Direction("client->server", args, loop, self.to_server)
        self.down = Direction("server->client", args, loop, self.to_client)

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        # One client at a time (the last one heard from), as one QUIC connection needs.
        self.client = addr
        self.up.push(data)

    def to_server(self, data):
        if self.server_side is not None:
            self.server_side.sendto(data)

    def to_client(self, data):
        if self.client is not None:
            self.transport.sendto(data, self.client)


class ServerSide(asyncio.DatagramProtocol):
    def __init__(self, relay):
        self.relay = relay

    def datagram_received(self, data, addr):
        self.relay.down.push(data)


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=loopback, required=True)
    parser.add_argument("--to", type=loopback, required=True)
    parser.add_argument("--rate-mbit", type=float, default=10)
    parser.add_argument("--delay-ms", type=float, default=50)
    parser.add_argument("--loss-pct", type=float, default=1)
    parser.add_argument("--queue-kb", type=float, default=128)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    random.seed(args.seed)
    loop = asyncio.get_running_loop()
    relay = Relay(args, loop)
    await loop.create_datagram_endpoint(lambda: relay, local_addr=args.listen)
    transport, _ = await loop.create_datagram_endpoint(
        lambda: ServerSide(relay), remote_addr=args.to)
    relay.server_side = transport
    print(f"udp-link {args.listen[0]}:{args.listen[1]} -> {args.to[0]}:{args.to[1]}: "
          f"{args.rate_mbit} Mbit/s, {args.delay_ms} ms one way, {args.loss_pct} % loss",
          flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(relay.up.report(), file=sys.stderr)
    print(relay.down.report(), file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
