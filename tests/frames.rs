//! WebSocket framing through a raw TCP client (tests/common/raw.rs): frames a library will not
//! send, and the close codes the contract asks for: 1009 oversize (one frame or across
//! fragments), 1007 invalid UTF-8 (one frame or across fragments), 1002 malformed frames. After
//! each failure the node must keep serving other clients, which every test checks.

mod common;

use std::time::Duration;

use common::raw::{
    close_payload, frame, masked, Closed, RawClient, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING,
    OP_PONG, OP_TEXT,
};
use common::{start_node, test_config, TestNode};
use serde_json::{json, Value};

const MAX: usize = 1024;

/// A node whose largest incoming message is [`MAX`] bytes.
async fn small_node() -> TestNode {
    start_node(pubgate::Config {
        max_message_size: MAX,
        ..test_config()
    })
    .await
}

/// Proves the node still serves: a new client gets its welcome and a pong, and a delivery works.
async fn assert_node_serves(node: &TestNode) {
    let mut a = node.client().await;
    let reply = a.request(json!({"type":"ping","id":"ok"})).await;
    assert_eq!(reply, json!({"type":"pong","id":"ok"}));
    a.subscribe("health").await;
    let mut b = node.client().await;
    b.publish("health", json!(1)).await;
    assert_eq!(
        a.recv().await,
        json!({"type":"message","channel":"health","data":1})
    );
}

/// A ping request padded to exactly `len` bytes of JSON text.
fn ping_of_len(len: usize) -> String {
    let base = r#"{"type":"ping","id":""}"#.len();
    assert!(len >= base);
    let text = format!(r#"{{"type":"ping","id":"{}"}}"#, "x".repeat(len - base));
    assert_eq!(text.len(), len);
    text
}

fn split3(bytes: &[u8], a: usize, b: usize) -> [&[u8]; 3] {
    [&bytes[..a], &bytes[a..b], &bytes[b..]]
}

// ---- Message size: 1009 ------------------------------------------------------------------

#[tokio::test]
async fn a_single_frame_over_the_limit_is_closed_1009() {
    let node = small_node().await;
    for len in [MAX + 1, 5 * MAX, 70_000] {
        let message = masked(true, OP_TEXT, ping_of_len(len).as_bytes());
        let closed = RawClient::close_after(node.addr, &[message]).await;
        assert_eq!(closed, Closed::Frame(Some(1009)), "message of {len} bytes");
    }
    assert_node_serves(&node).await;
}

#[tokio::test]
async fn a_message_of_exactly_the_limit_is_accepted_in_one_frame_or_fragments() {
    let node = small_node().await;
    let mut raw = RawClient::connect(node.addr).await;
    let text = ping_of_len(MAX);
    let id = serde_json::from_str::<Value>(&text).unwrap()["id"].clone();
    raw.send_text(&text).await;
    assert_eq!(raw.recv_json().await, json!({"type":"pong","id":id}));

    // The same bytes in 4 fragments of 256 bytes.
    let bytes = text.as_bytes();
    for (i, chunk) in bytes.chunks(256).enumerate() {
        let op = if i == 0 { OP_TEXT } else { OP_CONT };
        raw.send_frame(i == 3, op, chunk).await;
    }
    assert_eq!(raw.recv_json().await, json!({"type":"pong","id":id}));
    assert_node_serves(&node).await;
}

#[tokio::test]
async fn fragments_adding_up_to_more_than_the_limit_are_closed_1009() {
    let node = small_node().await;
    // 4 fragments of 400 bytes, each well under the limit, 1600 in all.
    let text = ping_of_len(1600);
    let fragments: Vec<Vec<u8>> = text
        .as_bytes()
        .chunks(400)
        .enumerate()
        .map(|(i, chunk)| masked(i == 3, if i == 0 { OP_TEXT } else { OP_CONT }, chunk))
        .collect();
    let closed = RawClient::close_after(node.addr, &fragments).await;
    assert_eq!(closed, Closed::Frame(Some(1009)));

    // One byte over, split in two: the limit counts the whole message.
    let text = ping_of_len(MAX + 1);
    let (a, b) = text.as_bytes().split_at(MAX / 2);
    let fragments = [masked(false, OP_TEXT, a), masked(true, OP_CONT, b)];
    let closed = RawClient::close_after(node.addr, &fragments).await;
    assert_eq!(closed, Closed::Frame(Some(1009)));

    // Many small fragments, never finished: closed as soon as the total passes the limit.
    let mut fragments = vec![masked(false, OP_TEXT, b"{\"type\":\"ping\",\"id\":\"")];
    fragments.extend((0..40).map(|_| masked(false, OP_CONT, &[b'x'; 100])));
    let closed = RawClient::close_after(node.addr, &fragments).await;
    assert_eq!(closed, Closed::Frame(Some(1009)));
    assert_node_serves(&node).await;
}

#[tokio::test]
async fn a_frame_header_announcing_an_enormous_length_is_closed_1009_at_once() {
    let node = small_node().await;
    // 2^63 - 1 bytes announced (the largest legal 64-bit length), no payload follows.
    let mut raw = RawClient::connect(node.addr).await;
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    raw.send_raw(&header).await.unwrap();
    assert_eq!(
        raw.expect_close_within(Duration::from_secs(2)).await,
        Closed::Frame(Some(1009))
    );

    // 2^63 (the most significant bit set, which RFC 6455 forbids): 1009 or 1002, at once.
    let mut raw = RawClient::connect(node.addr).await;
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 63).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    raw.send_raw(&header).await.unwrap();
    let closed = raw.expect_close_within(Duration::from_secs(2)).await;
    assert!(
        matches!(closed, Closed::Frame(Some(1009 | 1002))),
        "got {closed:?}"
    );

    // A 16-bit length over the limit, no payload: also refused without waiting for it.
    let mut raw = RawClient::connect(node.addr).await;
    let mut header = vec![0x81, 0x80 | 126];
    header.extend_from_slice(&60_000u16.to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    raw.send_raw(&header).await.unwrap();
    assert_eq!(
        raw.expect_close_within(Duration::from_secs(2)).await,
        Closed::Frame(Some(1009))
    );
    assert_node_serves(&node).await;
}

// ---- UTF-8: 1007 -------------------------------------------------------------------------

#[tokio::test]
async fn invalid_utf8_in_a_single_frame_is_closed_1007() {
    let node = start_node(test_config()).await;
    let cases: [&[u8]; 5] = [
        b"{\"type\":\"ping\",\"id\":\"\xff\"}",
        // A truncated 2-byte sequence at the end.
        b"{\"type\":\"ping\",\"id\":\"\xc3",
        // An overlong encoding of '/'.
        b"{\"type\":\"ping\",\"id\":\"\xc0\xaf\"}",
        // A UTF-16 surrogate encoded in UTF-8.
        b"{\"type\":\"ping\",\"id\":\"\xed\xa0\x80\"}",
        // Beyond U+10FFFF.
        b"{\"type\":\"ping\",\"id\":\"\xf4\x90\x80\x80\"}",
    ];
    for payload in cases {
        let closed = RawClient::close_after(node.addr, &[masked(true, OP_TEXT, payload)]).await;
        assert_eq!(closed, Closed::Frame(Some(1007)), "payload {payload:?}");
    }
    assert_node_serves(&node).await;
}

#[tokio::test]
async fn invalid_utf8_across_fragments_is_closed_1007() {
    let node = start_node(test_config()).await;
    let cases: [&[(bool, u8, &[u8])]; 4] = [
        // A multi-byte character cut at the fragment boundary, then a byte that cannot continue
        // it.
        &[
            (false, OP_TEXT, b"{\"type\":\"ping\",\"id\":\"\xc3"),
            (true, OP_CONT, b"(\"}"),
        ],
        // A 4-byte character cut in the middle fragment, broken in the last.
        &[
            (false, OP_TEXT, b"{\"type\":\"ping\",\"id\":\"\xf0\x9f"),
            (false, OP_CONT, b"\x98"),
            (true, OP_CONT, b"A\"}"),
        ],
        // A message whose last fragment ends inside a UTF-8 sequence (each fragment looks fine).
        &[
            (false, OP_TEXT, b"{\"type\":\"ping\",\"id\":\"ab"),
            (true, OP_CONT, b"cd\xe2\x82"),
        ],
        // Invalid bytes inside a later fragment, not at a boundary.
        &[
            (false, OP_TEXT, b"{\"type\":\"ping\","),
            (true, OP_CONT, b"\"id\":\"\xfe\"}"),
        ],
    ];
    for (i, case) in cases.iter().enumerate() {
        let fragments: Vec<Vec<u8>> = case
            .iter()
            .map(|&(fin, op, payload)| masked(fin, op, payload))
            .collect();
        let closed = RawClient::close_after(node.addr, &fragments).await;
        assert_eq!(closed, Closed::Frame(Some(1007)), "case {i}");
    }
    assert_node_serves(&node).await;
}

#[tokio::test]
async fn valid_multibyte_characters_split_across_fragments_are_accepted() {
    let node = start_node(test_config()).await;
    let mut raw = RawClient::connect(node.addr).await;
    let id = "é€😀";
    let text = format!(r#"{{"type":"ping","id":"{id}"}}"#);
    let bytes = text.as_bytes();
    let start = text.find('é').unwrap();
    // Cut inside 'é' (2 bytes), then inside '😀' (4 bytes: after its second byte).
    let emoji = text.find('😀').unwrap();
    for [a, b, c] in [
        split3(bytes, start + 1, emoji + 2),
        split3(bytes, start + 3, emoji + 1),
        split3(bytes, start + 4, emoji + 3),
    ] {
        raw.send_frame(false, OP_TEXT, a).await;
        raw.send_frame(false, OP_CONT, b).await;
        raw.send_frame(true, OP_CONT, c).await;
        assert_eq!(raw.recv_json().await, json!({"type":"pong","id":id}));
    }
    // Publish data split inside a character arrives exactly.
    raw.send_json(&json!({"type":"subscribe","channel":"utf8","id":1}))
        .await;
    assert_eq!(
        raw.recv_json().await,
        json!({"type":"subscribed","channel":"utf8","id":1})
    );
    let text = json!({"type":"publish","channel":"utf8","data":"ünïcødé ✓ 😀"}).to_string();
    let cut = text.find('✓').unwrap() + 1;
    raw.send_frame(false, OP_TEXT, &text.as_bytes()[..cut])
        .await;
    raw.send_frame(true, OP_CONT, &text.as_bytes()[cut..]).await;
    let mut got = vec![raw.recv_json().await, raw.recv_json().await];
    got.sort_by_key(|v| v.to_string());
    let mut expected = vec![
        json!({"type":"published","channel":"utf8"}),
        json!({"type":"message","channel":"utf8","data":"ünïcødé ✓ 😀"}),
    ];
    expected.sort_by_key(|v| v.to_string());
    assert_eq!(got, expected);
}

// ---- Malformed frames: 1002 --------------------------------------------------------------

#[tokio::test]
async fn reserved_bits_are_closed_1002() {
    let node = start_node(test_config()).await;
    for rsv in [0b100, 0b010, 0b001, 0b111] {
        let text = frame(true, rsv, OP_TEXT, br#"{"type":"ping"}"#, true);
        let closed = RawClient::close_after(node.addr, &[text]).await;
        assert_eq!(closed, Closed::Frame(Some(1002)), "rsv bits {rsv:03b}");
    }
    // On a control frame too.
    let ping = frame(true, 0b100, OP_PING, b"p", true);
    let closed = RawClient::close_after(node.addr, &[ping]).await;
    assert_eq!(closed, Closed::Frame(Some(1002)));
    assert_node_serves(&node).await;
}

#[tokio::test]
async fn reserved_opcodes_are_closed_1002() {
    let node = start_node(test_config()).await;
    for opcode in [0x3, 0x7, 0xB, 0xF] {
        let closed = RawClient::close_after(node.addr, &[masked(true, opcode, b"hello")]).await;
        assert_eq!(closed, Closed::Frame(Some(1002)), "opcode {opcode:#x}");
    }
    assert_node_serves(&node).await;
}

#[tokio::test]
async fn a_fragmented_control_frame_is_closed_1002() {
    let node = start_node(test_config()).await;
    let fragments = [
        masked(false, OP_PING, b"frag"),
        masked(true, OP_CONT, b"ment"),
    ];
    let closed = RawClient::close_after(node.addr, &fragments).await;
    assert_eq!(closed, Closed::Frame(Some(1002)));
    assert_node_serves(&node).await;
}

#[tokio::test]
async fn a_control_frame_longer_than_125_bytes_is_closed_1002() {
    let node = start_node(test_config()).await;
    let mut payload = close_payload(1000, "");
    payload.resize(126, b'p');
    for opcode in [OP_PING, OP_PONG, OP_CLOSE] {
        let closed = RawClient::close_after(node.addr, &[masked(true, opcode, &payload)]).await;
        assert_eq!(closed, Closed::Frame(Some(1002)), "opcode {opcode:#x}");
    }
    assert_node_serves(&node).await;
}

#[tokio::test]
async fn a_continuation_without_a_started_message_is_closed_1002() {
    let node = start_node(test_config()).await;
    for fin in [true, false] {
        let continuation = masked(fin, OP_CONT, br#"{"type":"ping"}"#);
        let closed = RawClient::close_after(node.addr, &[continuation]).await;
        assert_eq!(closed, Closed::Frame(Some(1002)), "fin {fin}");
    }
    // After a complete message, a continuation has nothing to continue either.
    let mut raw = RawClient::connect(node.addr).await;
    let reply = raw.request(&json!({"type":"ping","id":1})).await;
    assert_eq!(reply, json!({"type":"pong","id":1}));
    let _ = raw.send_raw(&masked(true, OP_CONT, b"{}")).await;
    assert_eq!(raw.expect_close().await, Closed::Frame(Some(1002)));
    assert_node_serves(&node).await;
}

#[tokio::test]
async fn a_new_data_frame_inside_a_fragmented_message_is_closed_1002() {
    let node = start_node(test_config()).await;
    for second in [OP_TEXT, OP_BINARY] {
        let frames = [
            masked(false, OP_TEXT, b"{\"type\":\"pi"),
            masked(true, second, br#"{"type":"ping"}"#),
        ];
        let closed = RawClient::close_after(node.addr, &frames).await;
        assert_eq!(closed, Closed::Frame(Some(1002)), "opcode {second}");
    }
    assert_node_serves(&node).await;
}

#[tokio::test]
async fn an_unmasked_client_frame_is_closed_1002() {
    // RFC 6455 section 5.1: a server MUST close the connection on an unmasked frame.
    let node = start_node(test_config()).await;
    let unmasked = frame(true, 0, OP_TEXT, br#"{"type":"ping","id":1}"#, false);
    let closed = RawClient::close_after(node.addr, &[unmasked]).await;
    assert_eq!(closed, Closed::Frame(Some(1002)));
    assert_node_serves(&node).await;
}

#[tokio::test]
async fn garbage_bytes_close_the_connection() {
    let node = start_node(test_config()).await;
    let garbage: [&[u8]; 3] = [
        // First byte with reserved bits and a reserved opcode.
        b"\xde\xad\xbe\xef\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99",
        // Plain text as if it were HTTP again.
        b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n",
        &[0xff; 64],
    ];
    for bytes in garbage {
        let closed = RawClient::close_after(node.addr, &[bytes.to_vec()]).await;
        assert!(
            matches!(closed, Closed::Frame(Some(1002)) | Closed::NoFrame),
            "garbage {bytes:?}: {closed:?}"
        );
        // A close frame must carry 1002 (a protocol error), not some other code.
        if let Closed::Frame(code) = closed {
            assert_eq!(code, Some(1002));
        }
    }
    assert_node_serves(&node).await;
}

// ---- Control frames ----------------------------------------------------------------------

#[tokio::test]
async fn a_ping_frame_gets_a_pong_with_the_same_payload() {
    let node = start_node(test_config()).await;
    let mut raw = RawClient::connect(node.addr).await;
    for payload in [b"".to_vec(), b"hello-123".to_vec(), vec![0xA5; 125]] {
        raw.send_frame(true, OP_PING, &payload).await;
        let f = raw.next_frame().await;
        assert_eq!(f.opcode, OP_PONG, "{f:?}");
        assert!(f.fin);
        assert!(!f.masked, "server frames are unmasked");
        assert_eq!(f.payload, payload);
    }
    // Still a working connection.
    assert_eq!(
        raw.request(&json!({"type":"ping","id":2})).await,
        json!({"type":"pong","id":2})
    );
}

#[tokio::test]
async fn an_unsolicited_pong_is_ignored() {
    let node = start_node(test_config()).await;
    let mut raw = RawClient::connect(node.addr).await;
    raw.send_frame(true, OP_PONG, b"unasked").await;
    assert_eq!(
        raw.request(&json!({"type":"ping","id":1})).await,
        json!({"type":"pong","id":1})
    );
}

#[tokio::test]
async fn a_ping_between_fragments_is_answered_and_the_message_completes() {
    let node = start_node(test_config()).await;
    let mut raw = RawClient::connect(node.addr).await;
    raw.send_frame(false, OP_TEXT, br#"{"type":"pi"#).await;
    raw.send_frame(true, OP_PING, b"mid").await;
    raw.send_frame(true, OP_CONT, br#"ng","id":"frag"}"#).await;
    let mut pong = None;
    let mut reply = None;
    while pong.is_none() || reply.is_none() {
        let f = raw.next_frame().await;
        match f.opcode {
            OP_PONG => pong = Some(f.payload),
            OP_TEXT => reply = Some(serde_json::from_slice::<Value>(&f.payload).unwrap()),
            OP_PING => continue,
            _ => panic!("unexpected {f:?}"),
        }
    }
    assert_eq!(pong.unwrap(), b"mid");
    assert_eq!(reply.unwrap(), json!({"type":"pong","id":"frag"}));
}

#[tokio::test]
async fn a_client_close_is_echoed_and_the_tcp_connection_ends() {
    let node = start_node(test_config()).await;
    let mut raw = RawClient::connect(node.addr).await;
    raw.send_frame(true, OP_CLOSE, &close_payload(1000, "bye"))
        .await;
    let echo = loop {
        let f = raw.next_frame().await;
        if f.opcode == OP_CLOSE {
            break f;
        }
        assert!(
            f.opcode == OP_PING || f.opcode == OP_PONG,
            "unexpected {f:?} before the close echo"
        );
    };
    assert_eq!(echo.close_code(), Some(1000), "echo {echo:?}");
    // Exactly one close frame, then the server ends the TCP connection.
    raw.expect_eof_within(common::WAIT).await;

    // A close without a payload: answered with a close (empty or 1000), then the end.
    let mut raw = RawClient::connect(node.addr).await;
    raw.send_frame(true, OP_CLOSE, b"").await;
    let echo = raw.next_frame().await;
    assert_eq!(echo.opcode, OP_CLOSE, "{echo:?}");
    assert!(
        matches!(echo.close_code(), None | Some(1000)),
        "echo {echo:?}"
    );
    raw.expect_eof_within(common::WAIT).await;

    // A subscribed client that closes is removed: publishing there still works for others.
    let mut raw = RawClient::connect(node.addr).await;
    raw.send_json(&json!({"type":"subscribe","channel":"health","id":1}))
        .await;
    raw.recv_json().await;
    raw.send_frame(true, OP_CLOSE, &close_payload(1001, "going away"))
        .await;
    let echo = raw.next_frame().await;
    assert_eq!(echo.opcode, OP_CLOSE, "{echo:?}");
    raw.expect_eof_within(common::WAIT).await;
    assert_node_serves(&node).await;
}

#[tokio::test]
async fn an_invalid_client_close_frame_is_closed_1002_or_1007() {
    let node = start_node(test_config()).await;
    let bad: [Vec<u8>; 5] = [
        vec![0x03],               // one byte: no room for a code
        close_payload(999, ""),   // below the valid range
        close_payload(1005, ""),  // reserved: must not be sent
        close_payload(1006, ""),  // reserved: must not be sent
        close_payload(5000, "x"), // above the valid range
    ];
    for payload in bad {
        let mut raw = RawClient::connect(node.addr).await;
        let _ = raw.send_raw(&masked(true, OP_CLOSE, &payload)).await;
        let f = loop {
            match raw.next_frame_within(common::WAIT).await {
                Ok(f) if f.opcode == OP_CLOSE => break f,
                Ok(_) => continue,
                Err(e) => panic!("payload {payload:?}: no close frame, {e:?}"),
            }
        };
        assert_eq!(f.close_code(), Some(1002), "payload {payload:?}");
        raw.expect_eof_within(common::WAIT).await;
    }
    // A valid code with a reason that is not UTF-8: 1007.
    let mut raw = RawClient::connect(node.addr).await;
    let mut payload = close_payload(1000, "");
    payload.extend_from_slice(b"bad \xff reason");
    let _ = raw.send_raw(&masked(true, OP_CLOSE, &payload)).await;
    let f = loop {
        let f = raw.next_frame().await;
        if f.opcode == OP_CLOSE {
            break f;
        }
    };
    assert_eq!(f.close_code(), Some(1007), "{f:?}");
    raw.expect_eof_within(common::WAIT).await;
    assert_node_serves(&node).await;
}

#[tokio::test]
async fn fragmented_binary_messages_are_unsupported_and_the_connection_stays_open() {
    let node = start_node(test_config()).await;
    let mut raw = RawClient::connect(node.addr).await;
    raw.send_frame(true, OP_BINARY, &[0, 1, 2, 0xff]).await;
    let reply = raw.recv_json().await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "unsupported", "{reply}");
    assert!(reply.get("id").is_none(), "{reply}");
    // A fragmented binary message is one message: one error.
    raw.send_frame(false, OP_BINARY, &[0xff, 0xfe]).await;
    raw.send_frame(true, OP_CONT, &[0xfd]).await;
    let reply = raw.recv_json().await;
    assert_eq!(reply["code"], "unsupported", "{reply}");
    assert_eq!(
        raw.request(&json!({"type":"ping","id":1})).await,
        json!({"type":"pong","id":1})
    );
}

// ---- Bytes read behind the upgrade request -------------------------------------------------

#[tokio::test]
async fn frames_sent_with_the_upgrade_request_are_all_served_in_order() {
    let node = start_node(test_config()).await;
    // In the upgrade request's write, so the server's HTTP parser reads (part of) them with the
    // request: a ping, a request, a fragmented request, and a request larger than hyper's read
    // buffer (its first bytes read with the request, the rest from the socket).
    let big = ping_of_len(20_000);
    let big_id = serde_json::from_str::<Value>(&big).unwrap()["id"].clone();
    let behind = [
        masked(true, OP_PING, b"early"),
        masked(true, OP_TEXT, br#"{"type":"ping","id":1}"#),
        masked(false, OP_TEXT, br#"{"type":"ping","#),
        masked(true, OP_CONT, br#""id":2}"#),
        masked(true, OP_TEXT, big.as_bytes()),
    ]
    .concat();
    let mut raw = RawClient::upgrade_sending(node.addr, &behind).await;
    // The pong may overtake the welcome (pongs go first); the messages come in order.
    let mut pong = None;
    let mut texts = Vec::new();
    while pong.is_none() || texts.len() < 4 {
        let f = raw.next_frame().await;
        match f.opcode {
            OP_PONG => pong = Some(f.payload),
            OP_TEXT => texts.push(serde_json::from_slice::<Value>(&f.payload).unwrap()),
            OP_PING => continue,
            _ => panic!("unexpected {f:?}"),
        }
    }
    assert_eq!(pong.unwrap(), b"early");
    assert_eq!(texts[0]["type"], "welcome");
    assert_eq!(
        texts[1..],
        [
            json!({"type":"pong","id":1}),
            json!({"type":"pong","id":2}),
            json!({"type":"pong","id":big_id}),
        ]
    );
    assert_eq!(
        raw.request(&json!({"type":"ping","id":"after"})).await,
        json!({"type":"pong","id":"after"})
    );
}
