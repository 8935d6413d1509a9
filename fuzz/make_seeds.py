#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/seeds/<target>/ (committed).

client_message: one request of every type, and malformed ones.
connection_reader: what a client sends after the upgrade: masked frames (mostly with a zero
mask key, so the JSON stays readable to the fuzzer's mutations), fragments, pings, close frames
with valid and invalid codes, oversized and 2^63 length headers, invalid UTF-8 split across
fragments, unmasked frames, and a `refresh` with a token signed with the fuzzing node's secret.

Run from anywhere: python3 fuzz/make_seeds.py
"""

import base64
import hashlib
import hmac
import json
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
SECRET = b"pubgate-fuzz-secret"  # pubgate::fuzzing::SECRET
EXP = 4102444800  # pubgate::fuzzing::EXP
MAX = 1024  # pubgate::fuzzing::MAX_MESSAGE_SIZE

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
ZERO = b"\0\0\0\0"
KEY = b"\x37\xfa\x21\x3d"


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def token(claims, secret=SECRET):
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signed = head + b"." + body
    sig = b64(hmac.new(secret, signed, hashlib.sha256).digest())
    return (signed + b"." + sig).decode()


def frame(op, payload=b"", fin=True, mask=ZERO, rsv=0, length=None):
    if isinstance(payload, str):
        payload = payload.encode()
    n = len(payload) if length is None else length
    out = bytearray([(0x80 if fin else 0) | rsv | op])
    bit = 0x80 if mask is not None else 0
    if n < 126:
        out.append(bit | n)
    elif n < 65536:
        out.append(bit | 126)
        out += n.to_bytes(2, "big")
    else:
        out.append(bit | 127)
        out += n.to_bytes(8, "big")
    if mask is not None:
        out += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(out) + payload


def text(obj, **kw):
    return frame(OP_TEXT, json.dumps(obj, separators=(",", ":")), **kw)


def close(code=None, reason=b"", **kw):
    payload = b"" if code is None else code.to_bytes(2, "big") + reason
    return frame(OP_CLOSE, payload, **kw)


def fragments(op, payload, cuts, mask=ZERO):
    if isinstance(payload, str):
        payload = payload.encode()
    pieces, last = [], 0
    for cut in cuts + [len(payload)]:
        pieces.append(payload[last:cut])
        last = cut
    out = b""
    for i, piece in enumerate(pieces):
        out += frame(op if i == 0 else OP_CONT, piece, fin=i == len(pieces) - 1, mask=mask)
    return out


REQUESTS = {
    "subscribe": {"type": "subscribe", "channel": "news", "id": 1},
    "subscribe_own": {"type": "subscribe", "channel": "user:fuzz", "id": "own"},
    "unsubscribe": {"type": "unsubscribe", "channel": "news", "id": [1, {"a": None}]},
    "publish": {"type": "publish", "channel": "news/eu", "data": {"x": [1, 2.5, "é"]}, "id": "p"},
    "publish_null": {"type": "publish", "channel": "news", "data": None, "id": None},
    "presence": {"type": "presence", "channel": "a", "id": 1e3},
    "ping": {"type": "ping", "id": -7},
    "refresh": {"type": "refresh", "token": "a.b.c", "id": True},
    "reserved": {"type": "subscribe", "channel": "__control", "id": 9},
    "unknown": {"type": "dance", "id": "x"},
    "no_type": {"id": 3, "channel": "a"},
    "bad_channel": {"type": "subscribe", "channel": "a b*" + "x" * 200, "id": 2},
}

RAW_REQUESTS = {
    "escapes": rb'{"type":"sub\u0073cribe","channel":"n\u0065ws","\u0069d":"\ud83d\ude00"}',
    "duplicate": b'{"type":"ping","type":"ping","id":1}',
    "array": b'[{"type":"ping"}]',
    "not_json": b"ping",
    "big_number_id": b'{"type":"ping","id":1e400}',
    "nested_data": b'{"type":"publish","channel":"news","data":' + b"[" * 100 + b"]" * 100 + b"}",
    "whitespace": b' \r\n\t{ "type" : "ping" , "id" : [ 1 , 2 ] } ',
    "unicode_space": '\u00a0{"type":"ping"}'.encode(),
    "empty": b"",
}


def client_message():
    seeds = {}
    for name, req in REQUESTS.items():
        seeds[name] = json.dumps(req, separators=(",", ":")).encode()
    seeds.update(RAW_REQUESTS)
    valid = token({"sub": "fuzz", "exp": EXP, "subscribe": ["a"], "publish": []})
    seeds["refresh_valid"] = json.dumps({"type": "refresh", "token": valid, "id": 5}).encode()
    return seeds


def connection_reader():
    s = {}
    s["session"] = b"".join(
        [
            text({"type": "subscribe", "channel": "news", "id": 1}),
            text({"type": "publish", "channel": "news", "data": {"n": 1}, "id": 2}),
            text({"type": "presence", "channel": "news", "id": 3}),
            text({"type": "subscribe", "channel": "user:fuzz", "id": 4}),
            text({"type": "unsubscribe", "channel": "news", "id": 5}),
            text({"type": "ping", "id": 6}),
            close(1000, b"bye"),
        ]
    )
    s["masked_key"] = text({"type": "ping", "id": "k"}, mask=KEY) + close(1001, mask=KEY)
    s["fragmented"] = (
        fragments(OP_TEXT, '{"type":"subscribe","channel":"news","id":"f"}', [5, 20])
        + frame(OP_PING, b"hi")
        + fragments(OP_TEXT, '{"type":"ping"}', [1])
        + close()
    )
    s["ping_pong"] = frame(OP_PING, b"x" * 125) + frame(OP_PONG, b"p") + frame(OP_PING) + close()
    s["binary"] = frame(OP_BINARY, b"\x00\xff") + fragments(OP_BINARY, b"\xff" * 10, [3])
    for code in [1000, 1003, 1005, 999, 1012, 1014, 2999, 3000, 4999, 5000]:
        s[f"close_{code}"] = close(code, b"reason")
    s["close_1_byte"] = frame(OP_CLOSE, b"\x03")
    s["close_bad_utf8"] = close(1000, b"\xc3\x28")
    s["close_126"] = close(1000, b"r" * 124)
    s["close_unmasked"] = close(1000, mask=None)
    s["pong_126"] = frame(OP_PONG, b"p" * 126)
    s["ping_126"] = frame(OP_PING, b"p" * 126)
    s["ping_fragmented"] = frame(OP_PING, b"p", fin=False)
    s["len_2_63"] = frame(OP_TEXT, length=1 << 63)
    s["len_64bit"] = frame(OP_TEXT, length=MAX + 1) + b"x" * 8
    s["len_16bit"] = frame(OP_BINARY, b"y" * (MAX + 1))
    s["len_max"] = frame(OP_TEXT, '{"type":"ping","id":"' + "x" * (MAX - 23) + '"}')
    s["fragments_too_big"] = fragments(OP_TEXT, "z" * (MAX + 10), [400, 800])
    s["utf8_split_valid"] = fragments(OP_TEXT, '{"type":"ping","id":"é€😀"}', [22, 25, 27])
    s["utf8_split_invalid"] = fragments(OP_TEXT, b'{"id":"\xc3', [3]) + close()
    s["utf8_truncated_last"] = fragments(OP_TEXT, b'{"type":"ping"}\xf0\x9f\x98', [4])
    s["utf8_invalid_single"] = frame(OP_TEXT, b"\xff\xfe") + close()
    s["unmasked_text"] = text({"type": "ping"}, mask=None)
    s["rsv_bits"] = frame(OP_TEXT, "{}", rsv=0x40)
    s["opcode_3"] = frame(3, b"")
    s["opcode_11"] = frame(11, b"")
    s["continuation_alone"] = frame(OP_CONT, b"x")
    s["text_inside_fragments"] = frame(OP_TEXT, b"{", fin=False) + frame(OP_TEXT, b"{}")
    s["truncated_header"] = b"\x81\xfe\x01"
    s["truncated_payload"] = frame(OP_TEXT, "{}" * 10)[:12]
    s["empty"] = b""
    s["rate_limited"] = b"".join(text({"type": "ping", "id": i}) for i in range(40)) + close()
    s["too_many_subscriptions"] = b"".join(
        text({"type": "subscribe", "channel": c, "id": c})
        for c in ["news", "news/1", "a", "b", "news/2", "c"]
    )
    s["slow_consumer"] = text({"type": "subscribe", "channel": "news"}) + b"".join(
        text({"type": "publish", "channel": "news", "data": i}) for i in range(12)
    )
    narrower = token({"sub": "fuzz", "exp": EXP, "subscribe": ["a"], "publish": []})
    other = token({"sub": "someone", "exp": EXP})
    s["refresh"] = b"".join(
        [
            text({"type": "subscribe", "channel": "news", "id": 1}),
            text({"type": "subscribe", "channel": "a", "id": 2}),
            text({"type": "refresh", "token": narrower, "id": 3}),
            text({"type": "refresh", "token": other, "id": 4}),
            text({"type": "refresh", "token": "x.y.z", "id": 5}),
            text({"type": "publish", "channel": "news", "data": 1, "id": 6}),
        ]
    )
    s["forbidden"] = text({"type": "subscribe", "channel": "secret", "id": 1}) + text(
        {"type": "publish", "channel": "a", "data": 1, "id": 2}
    )
    return s


def write(target, seeds):
    out = os.path.join(HERE, "seeds", target)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(f"{target}: {len(seeds)} seeds in {os.path.relpath(out)}")


if __name__ == "__main__":
    write("client_message", client_message())
    write("connection_reader", connection_reader())
