"""A fake MikroTik RouterOS API listener for nasd's tests.

The wire format is read and written only with librouteros's own encoder and decoder
(librouteros 4.2.2, installed in .venv-peers), so the Rust codec is checked against an
implementation nobody on this project wrote.

Usage: fake_api.py --port PORT --log FILE [--user U --password P] [--legacy]
                   [--delay-ms N] [--max-conn FILE] [--tls-cert PEM --tls-key PEM]

Prints READY once listening on 127.0.0.1:PORT. Every received sentence is appended to
--log as a JSON line {"conn": N, "words": [...]}; connection opens/closes as
{"conn": N, "event": "open"|"close"}. --max-conn FILE holds the highest number of
connections seen open at once. --hangup-once closes one connection, the first time a
second command arrives on it, without answering (an idle connection gone stale).
--legacy uses the pre-6.43 challenge login (a
plaintext login is answered with a challenge, as those versions did).
--tls-cert/--tls-key serve the API over TLS (RouterOS api-ssl) with Python's own ssl
module (OpenSSL), so nasd's rustls client is checked against a TLS stack it did not
bring; the connection is logged as "open" once the handshake is done.
"""

import argparse
import asyncio
import binascii
import json
import os
import ssl
import sys

from librouteros.connections import AsyncSocketTransport
from librouteros.exceptions import ConnectionClosed, ProtocolError
from librouteros.login import encode_password
from librouteros.protocol import AsyncApiProtocol

ENCODING = "utf-8"


class State:
    def __init__(self, args):
        self.args = args
        self.entries = []  # dicts with .id, list, address, comment
        self.next_id = 1
        self.next_conn = 1
        self.open = 0
        self.max_open = 0
        self.hung_up = False

    def record(self, obj):
        with open(self.args.log, "a", encoding="utf-8") as f:
            f.write(json.dumps(obj) + "\n")

    def note_open(self, delta):
        self.open += delta
        if self.open > self.max_open:
            self.max_open = self.open
            if self.args.max_conn:
                tmp = self.args.max_conn + ".tmp"
                with open(tmp, "w") as f:
                    f.write(str(self.max_open))
                os.replace(tmp, self.args.max_conn)


def split_words(words):
    """Attribute words (=k=v), query words (?k=v) and the .tag."""
    attrs, queries, tag = {}, [], None
    for w in words:
        if w.startswith("="):
            parts = w[1:].split("=", 1)
            attrs[parts[0]] = parts[1] if len(parts) > 1 else ""
        elif w.startswith("?"):
            queries.append(w[1:])
        elif w.startswith(".tag="):
            tag = w[len(".tag="):]
    return attrs, queries, tag


async def serve(state, reader, writer):
    proto = AsyncApiProtocol(AsyncSocketTransport(reader, writer), ENCODING)
    conn = state.next_conn
    state.next_conn += 1
    state.note_open(1)
    state.record({"conn": conn, "event": "open"})
    logged_in = False
    challenge = None
    answered = 0
    args = state.args
    try:
        while True:
            cmd, words = await proto.readSentence()
            state.record({"conn": conn, "words": [cmd, *words]})
            attrs, queries, tag = split_words(words)
            tagw = [f".tag={tag}"] if tag is not None else []

            async def reply(kind, *ws):
                await proto.writeSentence(kind, *ws, *tagw)

            async def trap(message):
                # RouterOS follows every !trap with a !done for the same command.
                await reply("!trap", f"=message={message}")
                await reply("!done")

            if cmd == "/login":
                if "response" in attrs:
                    ok = (
                        challenge is not None
                        and attrs.get("name") == args.user
                        and attrs["response"] == encode_password(challenge, args.password)
                    )
                elif args.legacy or "password" not in attrs:
                    # Pre-6.43 answers any /login without =response= with a challenge.
                    challenge = binascii.hexlify(os.urandom(16)).decode()
                    await reply("!done", f"=ret={challenge}")
                    continue
                else:
                    ok = attrs.get("name") == args.user and attrs["password"] == args.password
                if ok:
                    logged_in = True
                    await reply("!done")
                else:
                    await trap("invalid user name or password (6)")
                continue
            if cmd == "/quit":
                await proto.writeSentence("!fatal", "session terminated on request")
                break
            if not logged_in:
                await trap("not logged in")
                continue
            if args.hangup_once and answered >= 1 and not state.hung_up:
                state.hung_up = True
                break
            answered += 1
            if args.delay_ms:
                await asyncio.sleep(args.delay_ms / 1000)
            if cmd == "/ip/firewall/address-list/add":
                lst, addr = attrs.get("list"), attrs.get("address")
                if not lst or not addr:
                    await trap("failure: list and address must be set")
                elif any(e["list"] == lst and e["address"] == addr for e in state.entries):
                    await trap("failure: already have such entry")
                else:
                    entry = {
                        ".id": f"*{state.next_id:X}",
                        "list": lst,
                        "address": addr,
                        "comment": attrs.get("comment", ""),
                    }
                    state.next_id += 1
                    state.entries.append(entry)
                    await reply("!done", f"=ret={entry['.id']}")
            elif cmd == "/ip/firewall/address-list/remove":
                wanted = attrs.get(".id", attrs.get("numbers", ""))
                ids = [i for i in wanted.split(",") if i]
                found = [e for e in state.entries if e[".id"] in ids]
                if not ids or len(found) != len(ids):
                    await trap("no such item")
                else:
                    state.entries = [e for e in state.entries if e not in found]
                    await reply("!done")
            elif cmd == "/ip/firewall/address-list/print":
                conds = []
                for q in queries:
                    key, _, value = q.partition("=")
                    conds.append((key, value))
                for e in state.entries:
                    if all(e.get(k) == v for k, v in conds):
                        await reply("!re", *(f"={k}={v}" for k, v in e.items()))
                await reply("!done")
            else:
                await trap("no such command prefix")
    except (
        ConnectionClosed,
        ConnectionError,
        asyncio.IncompleteReadError,
        ProtocolError,
        ssl.SSLError,
    ):
        pass
    finally:
        state.note_open(-1)
        state.record({"conn": conn, "event": "close"})
        writer.close()


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--user", default="admin")
    p.add_argument("--password", default="")
    p.add_argument("--legacy", action="store_true")
    p.add_argument("--delay-ms", type=int, default=0)
    p.add_argument("--max-conn", default=None)
    p.add_argument("--hangup-once", action="store_true")
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    args = p.parse_args()
    state = State(args)
    context = None
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    server = await asyncio.start_server(
        lambda r, w: serve(state, r, w),
        "127.0.0.1",
        args.port,
        reuse_address=True,
        ssl=context,
    )
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
