//! Entry points for coverage-guided fuzzing (`fuzz/`, see `docs/fuzzing.md`) and for the stable
//! test that replays the committed corpus (`tests/fuzz_regressions.rs`).
//!
//! Not an API: each function runs the gateway's real code on arbitrary bytes and panics when an
//! invariant breaks, which is what the fuzzer looks for.
//! - [`parse_request`]: the client message parser with its channel validation, and the encoding
//!   of the replies and deliveries it leads to.
//! - [`read_connection`]: the connection reader (fastwebsockets parsing, fragment reassembly,
//!   size cap, UTF-8 checks, close-frame validation, commands on a real in-process node with the
//!   memory broker) over an in-memory stream holding the bytes, checked against a small
//!   reference model of RFC 6455 framing.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use crate::auth::{Identity, Permissions};
use crate::config::Config;
use crate::conn::{reader, Handler, Liveness, Source};
use crate::node::Node;
use crate::session::Session;
use crate::wire::protocol::{self, Command, ErrorCode, Reply};
use crate::wire::{CloseReason, Member, Outbox};

/// Largest message of the fuzzing node: small, so inputs of a few KiB reach the size paths.
pub const MAX_MESSAGE_SIZE: usize = 1024;
/// HS256 secret of the fuzzing node, so `refresh` tokens can be valid (see the seeds).
pub const SECRET: &str = "pubgate-fuzz-secret";
/// The user every fuzzed connection is authenticated as.
pub const USER: &str = "fuzz";
/// The fuzzed connection's token expiry: 2100-01-01.
pub const EXP: u64 = 4_102_444_800;
/// The fuzzed connection's permissions (its own `user:fuzz` channel comes on top).
pub const SUBSCRIBE: &[&str] = &["news*", "a", "b"];
pub const PUBLISH: &[&str] = &["news*"];

// ---- The client message parser -----------------------------------------------------------

/// Parses `bytes` as one client text message, as the reader hands it to the commands, and checks:
/// - parsing never panics, and a request or rejection id is exactly the text of the message's
///   `id` field (never `null`); an id is only lost when the object is not a request at all;
/// - the type and channel of a request are those of the message, and channels are valid;
/// - every reply (the error, or the success reply of the command) is one complete text frame of
///   a JSON object with the right `type`, `id` and `channel`;
/// - a publish's `data` is delivered verbatim.
pub fn parse_request(bytes: &[u8]) {
    // The reader closes with 1007 before text that is not UTF-8 reaches the parser.
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    // The message's own fields, read independently of the parser (the last of duplicate keys).
    let fields = serde_json::from_str::<HashMap<String, &RawValue>>(text).ok();
    let field = |name: &str| fields.as_ref().and_then(|f| f.get(name)).map(|v| v.get());
    match protocol::parse_request(text) {
        Err(rejection) => {
            let id = rejection.id.map(RawValue::get);
            if let Some(id) = id {
                assert_ne!(id, "null", "a null id is no id");
                assert_eq!(Some(id), field("id"), "a rejection's id is the request's");
            } else if field("id").is_some_and(|id| id != "null") {
                assert!(
                    rejection.code == ErrorCode::BadRequest
                        && rejection.message.starts_with("not a valid request"),
                    "the id of a request was dropped: {rejection:?}"
                );
            }
            let frame = Reply::from(&rejection).encode();
            let reply = json_object(text_payload(&frame));
            assert_eq!(get(&reply, "type"), Some(r#""error""#));
            let code = format!("\"{}\"", rejection.code.as_str());
            assert_eq!(get(&reply, "code"), Some(code.as_str()));
            assert_eq!(get(&reply, "id"), id, "the error reply echoes the id");
        }
        Ok(request) => {
            let id = request.id.map(RawValue::get);
            assert_eq!(id, field("id").filter(|v| *v != "null"), "a request's id");
            let kind: String = field("type")
                .and_then(|t| serde_json::from_str(t).ok())
                .expect("a request has a string type");
            let channel_field: Option<String> =
                field("channel").and_then(|c| serde_json::from_str(c).ok());
            let check_channel = |channel: &str| {
                assert_eq!(Some(channel), channel_field.as_deref());
                assert!(protocol::validate_channel(channel).is_ok(), "{channel:?}");
                assert!(protocol::reject_reserved(channel).is_ok(), "{channel:?}");
            };
            let member = [Member {
                conn_id: "0123456789abcdef".into(),
                node: "fuzz".into(),
                user: Some(USER.into()),
                info: None,
            }];
            let (name, reply, channel) = match &request.command {
                Command::Subscribe { channel, since, .. } => {
                    let channel: &str = channel;
                    let reply = Reply::Subscribed {
                        channel,
                        id: request.id,
                        epoch: since.as_ref().map(|s| &*s.epoch),
                        offset: since.as_ref().map(|s| s.offset),
                        recovered: since.as_ref().map(|_| false),
                    };
                    ("subscribe", reply.encode(), Some(channel))
                }
                Command::History { channel, .. } => {
                    let channel: &str = channel;
                    let reply = protocol::encode_history(channel, request.id, "e", 0, &[]);
                    ("history", reply, Some(channel))
                }
                Command::Unsubscribe { channel } => {
                    let channel: &str = channel;
                    let reply = Reply::Unsubscribed {
                        channel,
                        id: request.id,
                        reason: None,
                    };
                    ("unsubscribe", reply.encode(), Some(channel))
                }
                Command::Publish { channel, data } => {
                    let channel: &str = channel;
                    assert_eq!(Some(data.get()), field("data"));
                    check_delivery(channel, data.get());
                    let reply = Reply::Published {
                        channel,
                        id: request.id,
                        offset: None,
                    };
                    ("publish", reply.encode(), Some(channel))
                }
                Command::Presence { channel, .. } => {
                    let channel: &str = channel;
                    let reply = Reply::Presence {
                        channel,
                        id: request.id,
                        count: member.len(),
                        members: Some(&member),
                        truncated: false,
                    };
                    ("presence", reply.encode(), Some(channel))
                }
                Command::Ping => ("ping", Reply::Pong { id: request.id }.encode(), None),
                Command::Refresh { token } => {
                    let given: Option<String> =
                        field("token").and_then(|t| serde_json::from_str(t).ok());
                    assert_eq!(Some(&**token), given.as_deref());
                    let reply = Reply::Refreshed {
                        id: request.id,
                        exp: EXP,
                    };
                    ("refresh", reply.encode(), None)
                }
            };
            assert_eq!(kind, name, "the command is the message's type");
            let reply = json_object(text_payload(&reply));
            assert_eq!(get(&reply, "id"), id, "the reply echoes the id");
            if let Some(channel) = channel {
                check_channel(channel);
                let quoted = format!("\"{channel}\"");
                assert_eq!(get(&reply, "channel"), Some(quoted.as_str()));
            }
        }
    }
}

/// A client's `data` reaches subscribers as exactly the JSON text it sent.
fn check_delivery(channel: &str, data: &str) {
    let frame = protocol::encode_delivery(channel, data.as_bytes());
    let expected = format!(r#"{{"type":"message","channel":"{channel}","data":{data}}}"#);
    assert_eq!(
        text_payload(&frame),
        expected.as_bytes(),
        "a publish's data is delivered verbatim"
    );
}

// ---- The connection reader ---------------------------------------------------------------

/// The runtime and node of one fuzzing thread, built once and never dropped.
struct Harness {
    runtime: Runtime,
    node: Arc<Node>,
}

thread_local! {
    static HARNESS: &'static Harness = Box::leak(Box::new(Harness::start()));
}

impl Harness {
    fn start() -> Harness {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let config = Config {
            node_id: Some("fuzz".into()),
            max_message_size: MAX_MESSAGE_SIZE,
            max_subscriptions: 4,
            send_queue: 8,
            rate_limit: 100,
            rate_burst: 32,
            jwt_secret: Some(SECRET.into()),
            ..Config::default()
        };
        config.validate().expect("a valid fuzzing config");
        let node = runtime
            .block_on(Node::start(&config, "fuzz".into()))
            .expect("a memory node");
        Harness { runtime, node }
    }
}

/// Runs the real connection reader over an in-memory stream holding `bytes` (the client's side
/// of an upgraded WebSocket), with the replies drained as the writer would, and checks that:
/// - it ends (the stream ends in EOF) without panicking, and the session cleans up after itself;
/// - every frame queued for the client is one complete, unmasked server frame: a pong of at most
///   125 bytes or a text frame of a JSON object with a known `type`;
/// - the close reason and the number of replies (one per data message) are those of a reference
///   model of RFC 6455 framing ([`reference`]), with between one pong and one per ping when the
///   client pinged (at most a few unanswered pongs are kept: the latest); only a slow-consumer close (the
///   connection's own deliveries filling its queue) may cut that short.
pub fn read_connection(bytes: &[u8]) {
    HARNESS.with(|h| h.runtime.block_on(connection(&h.node, bytes)));
}

async fn connection(node: &Arc<Node>, bytes: &[u8]) {
    let expected = reference(bytes, MAX_MESSAGE_SIZE);
    let patterns = |list: &[&str]| list.iter().map(|p| p.to_string()).collect::<Vec<_>>();
    let identity = Identity {
        user: Some(USER.into()),
        permissions: Permissions::granted(USER, &patterns(SUBSCRIBE), &patterns(PUBLISH)),
        exp: Some(EXP),
        info: None,
        verified_at: std::time::Instant::now(),
    };
    let outbox = node.register(&identity);
    let mut session = Session::new(node.clone(), outbox.clone(), identity);
    let limits = crate::http::conn_limits(node.limits());
    let read = Source::new(Trickle::new(bytes), Bytes::new());
    let liveness = Liveness::new();
    let peer_closed = CancellationToken::new();
    let mut frames = Vec::new();
    let run = async {
        let reader = reader::run(
            &read,
            &mut session,
            &outbox,
            &limits,
            &liveness,
            &peer_closed,
        );
        let writer = drain(&outbox, &peer_closed, &mut frames);
        tokio::join!(reader, writer);
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the reader ends at the end of its input");
    session.end().await;
    node.unregister(&outbox);
    let mut rest = VecDeque::new();
    outbox.take(&mut rest);
    frames.extend(rest);

    let (mut answers, mut pongs) = (0, 0);
    for frame in &frames {
        let (opcode, payload) = server_frame(frame);
        match opcode {
            PONG => {
                assert!(payload.len() <= 125, "a pong echoes at most 125 bytes");
                pongs += 1;
            }
            TEXT => {
                let reply = json_object(payload);
                let kind: String = get(&reply, "type")
                    .and_then(|t| serde_json::from_str(t).ok())
                    .expect("a reply has a string type");
                match kind.as_str() {
                    "message" | "welcome" => {}
                    "unsubscribed" if reply.contains_key("reason") => {}
                    "subscribed" | "unsubscribed" | "published" | "presence" | "pong"
                    | "refreshed" | "error" => answers += 1,
                    other => panic!("unknown reply type {other:?}"),
                }
            }
            other => panic!("unexpected opcode {other:#x} queued for the client"),
        }
    }
    let reason = outbox.close_reason();
    if reason != CloseReason::SlowConsumer {
        assert_eq!(reason, expected.reason, "close reason");
        assert_eq!(answers, expected.answers, "replies (one per message)");
        assert!(
            pongs <= expected.pings && (pongs == 0) == (expected.pings == 0),
            "{pongs} pongs for {expected:?}"
        );
    } else {
        assert!(
            answers <= expected.answers && pongs <= expected.pings,
            "{answers} replies and {pongs} pongs > {expected:?}"
        );
    }
    let left = node.hub().members();
    assert!(
        left.iter().all(|(_, m)| m.conn_id != outbox.conn_id()),
        "a closed session left subscriptions behind: {left:?}"
    );
}

/// Drains the connection's queue as the writer would, until the reader is done.
async fn drain(outbox: &Outbox, reader_done: &CancellationToken, frames: &mut Vec<Bytes>) {
    let mut batch = VecDeque::new();
    loop {
        outbox.take(&mut batch);
        outbox.sent(batch.iter().map(Bytes::len).sum());
        frames.extend(batch.drain(..));
        if reader_done.is_cancelled() {
            return;
        }
        tokio::select! {
            _ = outbox.ready() => {}
            _ = reader_done.cancelled() => {}
        }
    }
}

/// An in-memory client stream that hands its bytes over in uneven pieces and is not ready on
/// every third read, as a socket would be: the parser's partial-header and partial-payload paths
/// run, and the reader yields to the drain.
struct Trickle<'a> {
    rest: &'a [u8],
    reads: usize,
}

/// Sizes of successive reads, cycled.
const PIECES: [usize; 8] = [1, 7, 2, 64, 3, 4096, 5, 13];

impl<'a> Trickle<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Trickle {
            rest: bytes,
            reads: 0,
        }
    }
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.reads += 1;
        if this.reads % 3 == 0 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = PIECES[this.reads % PIECES.len()]
            .min(this.rest.len())
            .min(buf.remaining());
        buf.put_slice(&this.rest[..n]);
        this.rest = &this.rest[n..];
        Poll::Ready(Ok(()))
    }
}

/// What the reference model expects of a connection that sends `bytes` and then EOF.
#[derive(Debug)]
struct Expected {
    /// The first reason to close.
    reason: CloseReason,
    /// Replies owed before it.
    answers: usize,
    /// Pings before it: answered by at least one pong and at most one each (at most
    /// `MAX_PENDING_PONGS` unanswered pongs are kept, the latest).
    pings: usize,
}

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// A reference model of how a server reads client frames (RFC 6455 5 and 7.4), written as a
/// straight walk over the bytes; checks apply in wire order (header, length, payload), and the
/// first reason to close wins:
/// - the stream ending anywhere is `Gone` (no close frame can be sent);
/// - RSV bits, an unknown opcode, a fragmented control frame, a ping over 125 bytes, then an
///   unmasked frame (after its payload is read), a pong or close over 125 bytes, a 1-byte close,
///   a close code that may not be sent (only 1000-1003, 1007-1013, 3000-4999 may), a
///   continuation with nothing to continue or a new message inside a fragmented one: 1002;
/// - a frame or a reassembled message over `max` bytes: 1009;
/// - text that is not UTF-8, whole or reassembled, or a close reason that is not: 1007;
/// - a valid close: its code (or nothing) echoed.
///
/// Every complete data message and every ping before that is answered once.
fn reference(mut input: &[u8], max: usize) -> Expected {
    let mut answers = 0;
    let mut partial: Option<(u8, Vec<u8>)> = None;
    let mut pings = 0;
    let end = |reason: CloseReason, answers: usize, pings: usize| Expected {
        reason,
        answers,
        pings,
    };
    loop {
        let Some(&[b0, b1]) = take(&mut input, 2) else {
            return end(CloseReason::Gone, answers, pings);
        };
        let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
        if b0 & 0x70 != 0 || !matches!(opcode, 0..=2 | 8..=10) {
            return end(CloseReason::Protocol, answers, pings);
        }
        let masked = b1 & 0x80 != 0;
        let len = match b1 & 0x7F {
            126 => take(&mut input, 2).map(|b| u64::from(u16::from_be_bytes([b[0], b[1]]))),
            127 => take(&mut input, 8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes"))),
            n => Some(u64::from(n)),
        };
        let Some(len) = len else {
            return end(CloseReason::Gone, answers, pings);
        };
        let mask: Option<[u8; 4]> = if masked {
            match take(&mut input, 4) {
                Some(m) => Some(m.try_into().expect("4 bytes")),
                None => return end(CloseReason::Gone, answers, pings),
            }
        } else {
            None
        };
        let control = opcode >= CLOSE;
        if (control && !fin) || (opcode == PING && len > 125) {
            return end(CloseReason::Protocol, answers, pings);
        }
        if len > max as u64 {
            return end(CloseReason::TooBig, answers, pings);
        }
        let Some(payload) = take(&mut input, len as usize) else {
            return end(CloseReason::Gone, answers, pings);
        };
        let mut payload = payload.to_vec();
        if let Some(mask) = mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        let utf8 = |b: &[u8]| std::str::from_utf8(b).is_ok();
        // Fragmented text fails on the fragment that makes it invalid: a sequence cut at the end
        // of a fragment is still valid so far.
        let valid_so_far = |b: &[u8], fin: bool| match std::str::from_utf8(b) {
            Ok(_) => true,
            Err(e) => !fin && e.error_len().is_none(),
        };
        if opcode == TEXT && fin && !utf8(&payload) {
            return end(CloseReason::InvalidUtf8, answers, pings);
        }
        if !masked {
            return end(CloseReason::Protocol, answers, pings);
        }
        let complete = match opcode {
            PING => {
                pings += 1;
                None
            }
            PONG if payload.len() > 125 => return end(CloseReason::Protocol, answers, pings),
            PONG => None,
            CLOSE => {
                let reason = match payload.len() {
                    0 => CloseReason::Echo(Bytes::new()),
                    1 | 126.. => CloseReason::Protocol,
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        if !matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999) {
                            CloseReason::Protocol
                        } else if !utf8(&payload[2..]) {
                            CloseReason::InvalidUtf8
                        } else {
                            CloseReason::Echo(Bytes::copy_from_slice(&payload[..2]))
                        }
                    }
                };
                return end(reason, answers, pings);
            }
            TEXT | BINARY if partial.is_some() => {
                return end(CloseReason::Protocol, answers, pings)
            }
            TEXT | BINARY if !fin => {
                if opcode == TEXT && !valid_so_far(&payload, false) {
                    return end(CloseReason::InvalidUtf8, answers, pings);
                }
                partial = Some((opcode, payload));
                None
            }
            TEXT | BINARY => Some((opcode, payload)),
            CONTINUATION => match partial.as_mut() {
                None => return end(CloseReason::Protocol, answers, pings),
                Some((_, data)) if data.len() + payload.len() > max => {
                    return end(CloseReason::TooBig, answers, pings)
                }
                Some((kind, data)) => {
                    data.extend_from_slice(&payload);
                    if *kind == TEXT && !valid_so_far(data, fin) {
                        return end(CloseReason::InvalidUtf8, answers, pings);
                    }
                    if fin {
                        partial.take()
                    } else {
                        None
                    }
                }
            },
            _ => unreachable!("opcodes were checked"),
        };
        if let Some((opcode, data)) = complete {
            if opcode == TEXT && !utf8(&data) {
                return end(CloseReason::InvalidUtf8, answers, pings);
            }
            answers += 1;
        }
    }
}

/// The next `n` bytes of `input`, if it has that many.
fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if input.len() < n {
        return None;
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Some(head)
}

// ---- Frames and JSON ---------------------------------------------------------------------

/// Checks one server frame (FIN, no RSV bits, unmasked, shortest length encoding, exactly one
/// frame) and returns its opcode and payload.
fn server_frame(frame: &[u8]) -> (u8, &[u8]) {
    assert!(frame.len() >= 2, "a frame has a header: {frame:?}");
    assert_eq!(frame[0] & 0xF0, 0x80, "FIN and no RSV bits: {frame:?}");
    assert_eq!(frame[1] & 0x80, 0, "server frames are not masked");
    let (len, head) = match frame[1] {
        126 => {
            let len = u16::from_be_bytes([frame[2], frame[3]]) as usize;
            assert!(len >= 126, "shortest length encoding");
            (len, 4)
        }
        127 => {
            let len = u64::from_be_bytes(frame[2..10].try_into().expect("8 bytes"));
            assert!(len > 0xFFFF, "shortest length encoding");
            (len as usize, 10)
        }
        n => (usize::from(n), 2),
    };
    assert_eq!(frame.len(), head + len, "one complete frame");
    (frame[0] & 0x0F, &frame[head..])
}

/// The payload of a text frame.
fn text_payload(frame: &[u8]) -> &[u8] {
    let (opcode, payload) = server_frame(frame);
    assert_eq!(opcode, TEXT, "a text frame");
    payload
}

/// The fields of a JSON object (raw values, so any valid JSON number is accepted).
fn json_object(payload: &[u8]) -> HashMap<String, &RawValue> {
    let text = std::str::from_utf8(payload).expect("text frames are UTF-8");
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("a reply is a JSON object ({e}): {text:?}"))
}

fn get<'a>(fields: &HashMap<String, &'a RawValue>, name: &str) -> Option<&'a str> {
    fields.get(name).map(|v| v.get())
}
