"""Relay-only WebRTC calls between two aiortc peers through uturn (scripts/aiortc-e2e.sh).

Each scenario makes two RTCPeerConnections with iceTransportPolicy "relay" and one TURN server
(UDP or TCP to uturn; long-term or TURN REST credentials), opens a data channel and sends N
numbered messages each way. It asserts:
  - every message arrived, in order, on both sides;
  - each side gathered relay candidates only, and the nominated ICE pair of each side is
    relay -> relay, its remote end being the other side's relayed address (aioice's nominated
    pair is read directly: a host candidate reaching a relay address would also pass uturn's
    per-IP permission check, so the policy alone proves nothing);
  - uturn's allocations API lists both relayed addresses under the scenario's user and
    transport, with packets counted each way.
Prints one line per scenario with its duration, then "N passed, N failed"; exits 1 on failure.
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import sys
import time
import urllib.parse
import urllib.request

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
)

TIMEOUT = 20.0


def rest_credentials(secret: str, user: str) -> tuple[str, str]:
    # draft-uberti-behave-turn-rest-00: username "expiry:user",
    # password base64(HMAC-SHA1(secret, username)).
    username = f"{int(time.time()) + 3600}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def allocations(http: str, user: str) -> list[dict]:
    url = f"http://{http}/api/v1/allocations?user={urllib.parse.quote(user)}"
    with urllib.request.urlopen(url, timeout=5) as res:
        return json.load(res)["allocations"]


def nominated_pair(pc: RTCPeerConnection):
    # aiortc exposes no candidate-pair stats; the ICE connection under the SCTP transport keeps
    # the nominated pair per component (one component: the data channel's bundle).
    connection = pc.sctp.transport.transport._connection
    return connection, connection._nominated.get(1)


async def wait_for(predicate, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def uturn_view(http: str, user: str, relayed: list[str]) -> list[dict]:
    """The allocations of `user` whose relayed addresses are `relayed`, once uturn has counted
    packets each way on both (counters are published every few hundred milliseconds)."""

    async def fetch():
        listed = await asyncio.to_thread(allocations, http, user)
        found = [next((x for x in listed if r in x["relayed"]), None) for r in relayed]
        moved = all(
            x and x["to_peer"]["packets"] > 0 and x["to_client"]["packets"] > 0 for x in found
        )
        return found if moved else None

    deadline = time.monotonic() + 10
    while True:
        found = await fetch()
        if found:
            return found
        if time.monotonic() > deadline:
            listed = await asyncio.to_thread(allocations, http, user)
            raise AssertionError(
                f"allocations API never showed {relayed} with packets each way: {listed}"
            )
        await asyncio.sleep(0.1)


async def call(server: RTCIceServer, messages: int, http: str, api_user: str) -> dict:
    config = RTCConfiguration(
        iceServers=[server], iceTransportPolicy=RTCIceTransportPolicy.RELAY
    )
    a = RTCPeerConnection(config)
    b = RTCPeerConnection(config)
    received = {"a": [], "b": []}
    channels = {}
    try:
        channels["a"] = a.createDataChannel("messages", ordered=True)
        channels["a"].on("message", lambda m: received["a"].append(m))

        @b.on("datachannel")
        def on_datachannel(channel):
            channels["b"] = channel
            channel.on("message", lambda m: received["b"].append(m))

        # aiortc gathers every candidate in setLocalDescription, so the descriptions carry them
        # (no trickle).
        await a.setLocalDescription(await a.createOffer())
        await b.setRemoteDescription(a.localDescription)
        await b.setLocalDescription(await b.createAnswer())
        await a.setRemoteDescription(b.localDescription)

        await wait_for(
            lambda: channels["a"].readyState == "open"
            and "b" in channels
            and channels["b"].readyState == "open",
            "the data channel open on both sides",
        )
        for i in range(messages):
            channels["a"].send(f"a->b {i}")
            channels["b"].send(f"b->a {i}")
        await wait_for(
            lambda: len(received["a"]) >= messages and len(received["b"]) >= messages,
            f"{messages} messages each way",
        )

        sides = {}
        for name, pc in (("a", a), ("b", b)):
            connection, pair = nominated_pair(pc)
            sides[name] = {
                "local_types": sorted({c.type for c in connection.local_candidates}),
                "pair": pair
                and {
                    "local": (pair.local_candidate.type, f"{pair.local_candidate.host}:{pair.local_candidate.port}"),
                    "remote": (pair.remote_candidate.type, f"{pair.remote_candidate.host}:{pair.remote_candidate.port}"),
                },
            }
        # uturn's view while the call is still up: by the relayed addresses the pairs use.
        # Only when both pairs are relay ones: otherwise the pair checks below say what is wrong.
        relayed = [
            sides[n]["pair"]["local"][1]
            for n in ("a", "b")
            if sides[n]["pair"] and sides[n]["pair"]["local"][0] == "relay"
        ]
        api = await uturn_view(http, api_user, relayed) if len(relayed) == 2 else []
        return {"received": received, "sides": sides, "api": api}
    finally:
        await a.close()
        await b.close()


async def scenario(args, name: str, transport: str, rest: bool) -> tuple[bool, float, str]:
    started = time.monotonic()
    failures = []
    port = args.udp_port if transport == "udp" else args.tcp_port
    url = f"turn:127.0.0.1:{port}?transport={transport}"
    if rest:
        api_user = f"aiortc-rest-{transport}"
        username, credential = rest_credentials(args.secret, api_user)
    else:
        api_user = username = f"aiortc-{transport}"
        credential = args.password
    server = RTCIceServer(urls=url, username=username, credential=credential)

    try:
        result = await call(server, args.messages, args.http, api_user)
    except Exception as e:  # reported as this scenario's failure, the others still run
        return False, time.monotonic() - started, f"call failed: {e!r}"

    for side, prefix in (("b", "a->b"), ("a", "b->a")):
        got = result["received"][side]
        expected = [f"{prefix} {i}" for i in range(args.messages)]
        if got != expected:
            wrong = next((i for i, (g, e) in enumerate(zip(got, expected)) if g != e), len(got))
            failures.append(f"side {side}: {len(got)}/{args.messages} messages, first wrong at {wrong}")
    sides = result["sides"]
    for side, other in (("a", "b"), ("b", "a")):
        s = sides[side]
        if s["local_types"] != ["relay"]:
            failures.append(f"side {side} gathered candidate types {s['local_types']}, expected only relay")
        pair = s["pair"]
        if not pair or pair["local"][0] != "relay" or pair["remote"][0] != "relay":
            failures.append(f"side {side}: nominated pair is not relay -> relay: {pair}")
        elif sides[other]["pair"] and pair["remote"][1] != sides[other]["pair"]["local"][1]:
            failures.append(f"side {side}: remote end {pair['remote'][1]} is not the other side's relayed address")
    if len(result["api"]) != 2:
        failures.append("allocations API not checked: no relay pair on both sides")
    for x in result["api"]:
        if x["transport"] != transport or x["username"] != api_user:
            failures.append(f"allocation {x['id']}: {x['transport']}/{x['username']}, expected {transport}/{api_user}")
    summary = (
        f"{args.messages} messages each way in order; pairs "
        + ", ".join(f"{n} {sides[n]['pair']['local'][1]} -> {sides[n]['pair']['remote'][1]}" for n in ("a", "b"))
        + " relay -> relay; allocations "
        + ", ".join(
            f"{x['id']} ({x['transport']}) to_peer {x['to_peer']['packets']} to_client {x['to_client']['packets']}"
            for x in result["api"]
        )
        if not failures
        else ""
    )
    return (not failures, time.monotonic() - started, "; ".join(failures) or summary)


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--udp-port", type=int, required=True)
    parser.add_argument("--tcp-port", type=int, required=True)
    parser.add_argument("--http", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("only", nargs="*")
    args = parser.parse_args()
    scenarios = [
        ("udp", "udp", False),
        ("tcp", "tcp", False),
        ("rest-udp", "udp", True),
        ("rest-tcp", "tcp", True),
    ]
    passed = failed = 0
    for name, transport, rest in scenarios:
        if args.only and name not in args.only:
            continue
        ok, seconds, detail = await scenario(args, name, transport, rest)
        print(f"{'PASS' if ok else 'FAIL'} {name:<8} {seconds:.1f} s: {detail}", flush=True)
        passed += ok
        failed += not ok
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
