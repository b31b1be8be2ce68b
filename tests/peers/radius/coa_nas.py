"""A RADIUS NAS for nasd's CoA / Disconnect tests, built on pyrad 2.6.0.

Usage: coa_nas.py SECRET DICTIONARY RECORD_FILE

Listens on 127.0.0.1, a free UDP port, and prints "READY <port>" once bound.
Every request that pyrad accepts (right secret: pyrad verifies the request
authenticator and drops the rest) is recorded as one JSON line in RECORD_FILE:
code, id, attributes in packet order as pyrad decodes them, the raw packet in
hex, and ma_ok, our own check of the Message-Authenticator (pyrad checks it
only for Access-Request). It answers by the User-Name:

  nak-busy      NAK, Error-Cause = Resources-Unavailable (506)
  nak-gone      NAK, Error-Cause = Session-Context-Not-Found (503)
  nak-plain     NAK without Error-Cause
  silent        no reply
  bad-ma        ACK whose Message-Authenticator is wrong (authenticator right)
  forged-first  first a NAK with a wrong authenticator, then the real ACK
  other-port    first a valid NAK from another port, then the ACK from ours
  anything else ACK

Replies carry a Message-Authenticator and echo the Acct-Session-Id as
Reply-Message, so a client can tell replies apart.
"""

import hashlib
import hmac
import json
import socket
import struct
import sys

from pyrad import dictionary, packet, server


def ma_ok(raw, secret):
    """Recompute the Message-Authenticator of a CoA / Disconnect request:
    HMAC-MD5 over the packet with a zero authenticator and a zero MA value
    (RFC 5176 section 3.3). None if the packet has none."""
    offset = 20
    while offset + 2 <= len(raw):
        kind, length = raw[offset], raw[offset + 1]
        if length < 2:
            return False
        if kind == 80:
            if length != 18:
                return False
            copy = bytearray(raw)
            copy[4:20] = bytes(16)
            copy[offset + 2:offset + 18] = bytes(16)
            mac = hmac.new(secret, bytes(copy), hashlib.md5).digest()
            return hmac.compare_digest(mac, raw[offset + 2:offset + 18])
        offset += length
    return None


def attributes(pkt):
    """(name, value) pairs in packet order, values as strings."""
    out = []
    for key in pkt.keys():
        if key in ("Message-Authenticator", 80):
            continue
        for value in pkt[key]:
            if isinstance(value, bytes):
                value = "0x" + value.hex()
            out.append([str(key), str(value)])
    return out


def first(pkt, name):
    try:
        return pkt[name][0]
    except KeyError:
        return None


class Nas(server.Server):
    def __init__(self, record, **kwargs):
        super().__init__(**kwargs)
        self.record = record

    def HandleCoaPacket(self, pkt):
        self.answer(pkt, packet.CoANAK)

    def HandleDisconnectPacket(self, pkt):
        self.answer(pkt, packet.DisconnectNAK)

    def answer(self, pkt, nak_code):
        raw = pkt.raw_packet
        entry = {
            "code": pkt.code,
            "id": pkt.id,
            "attributes": attributes(pkt),
            "raw": raw.hex(),
            "ma_ok": ma_ok(raw, pkt.secret),
        }
        with open(self.record, "a") as f:
            f.write(json.dumps(entry) + "\n")

        user = first(pkt, "User-Name")
        session = first(pkt, "Acct-Session-Id")
        if user == "silent":
            return
        reply = self.CreateReplyPacket(pkt)
        reply.add_message_authenticator()
        if session is not None:
            reply["Reply-Message"] = session
        if user == "nak-busy":
            reply.code = nak_code
            reply["Error-Cause"] = 506
        elif user == "nak-gone":
            reply.code = nak_code
            reply["Error-Cause"] = 503
        elif user == "nak-plain":
            reply.code = nak_code
        data = reply.ReplyPacket()

        if user == "bad-ma":
            data = self.spoil_ma(data, pkt)
        elif user == "forged-first":
            forged = bytearray(data)
            forged[0] = nak_code
            pkt.fd.sendto(bytes(forged), pkt.source)
        elif user == "other-port":
            nak = self.CreateReplyPacket(pkt)
            nak.code = nak_code
            other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            other.bind(("127.0.0.1", 0))
            other.sendto(nak.ReplyPacket(), pkt.source)
            other.close()
        pkt.fd.sendto(data, pkt.source)

    @staticmethod
    def spoil_ma(data, pkt):
        """Flip a bit of the reply's Message-Authenticator and recompute the
        response authenticator, so only the MA check can notice."""
        data = bytearray(data)
        offset = 20
        while offset + 2 <= len(data):
            if data[offset] == 80:
                data[offset + 2] ^= 1
                break
            offset += data[offset + 1]
        data[4:20] = pkt.authenticator
        data[4:20] = hashlib.md5(bytes(data) + pkt.secret).digest()
        return bytes(data)


def main():
    secret, dict_path, record = sys.argv[1], sys.argv[2], sys.argv[3]
    nas = Nas(
        record,
        dict=dictionary.Dictionary(dict_path),
        hosts={"127.0.0.1": server.RemoteHost("127.0.0.1", secret.encode(), "nasd")},
        auth_enabled=False,
        acct_enabled=False,
        coa_enabled=True,
        coaport=0,
    )
    nas.BindToAddress("127.0.0.1")
    port = nas.coafds[0].getsockname()[1]
    print("READY %d" % port, flush=True)
    nas.Run()


if __name__ == "__main__":
    main()
