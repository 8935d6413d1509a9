//! The reading side: frames to messages, each handed to the connection's [`Handler`].
//!
//! Auto-close and auto-pong are off so every frame passes through here: fastwebsockets limits a
//! single frame's size and validates single-frame UTF-8, but leaves fragment reassembly, the
//! size of a whole fragmented message, UTF-8 across fragments, control-frame sizes, close-frame
//! validation and the mapping of errors to close codes to the caller.

use bytes::Bytes;
use fastwebsockets::{CloseCode, Frame, OpCode, WebSocketError};
use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;

use super::lazy_read::{LazyRead, Source};
use super::rate::{MessageRate, Verdict};
use super::{Handler, Limits, Liveness, Message};
use crate::wire::{CloseReason, Outbox};

/// A fragmented message being reassembled.
struct Partial {
    opcode: OpCode,
    data: Vec<u8>,
    /// For text: the length of the prefix of `data` already checked as UTF-8.
    valid: usize,
}

impl Partial {
    fn new(opcode: OpCode, first: &[u8]) -> Partial {
        Partial {
            opcode,
            data: first.to_vec(),
            valid: 0,
        }
    }

    /// Whether a text message can still be (`fin`: is) valid UTF-8, checking only the bytes
    /// added since the last call. Invalid text fails on the fragment that makes it invalid
    /// (RFC 6455 8.1), not when the message completes; a sequence cut between two fragments is
    /// valid so far.
    fn utf8_ok(&mut self, fin: bool) -> bool {
        if self.opcode != OpCode::Text {
            return true;
        }
        match std::str::from_utf8(&self.data[self.valid..]) {
            Ok(_) => {
                self.valid = self.data.len();
                true
            }
            Err(e) => {
                self.valid += e.valid_up_to();
                !fin && e.error_len().is_none()
            }
        }
    }
}

pub async fn run<R: AsyncRead + Unpin, H: Handler>(
    source: &Source<R>,
    handler: &mut H,
    outbox: &Outbox,
    limits: &Limits,
    liveness: &Liveness,
    peer_closed: &CancellationToken,
) {
    let max = limits.max_message_size;
    let mut ws = LazyRead::new(source, max);
    let mut partial: Option<Partial> = None;
    let mut rate = MessageRate::new(limits.rate_limit, limits.rate_burst);
    loop {
        let mut frame = match ws.read_frame().await {
            Ok(frame) => frame,
            Err(e) => {
                outbox.close(close_for_error(&e));
                break;
            }
        };
        liveness.touch();
        // Frames parsed from the read buffer cost no I/O, so a flood of small frames (pings)
        // would keep this task on its worker thread, ahead of the writers and timers queued
        // there: each frame takes one unit of the task's cooperative budget.
        tokio::task::consume_budget().await;
        if !is_masked(&mut frame) {
            // RFC 6455 5.1: a server must close on an unmasked client frame.
            outbox.close(CloseReason::Protocol);
            break;
        }
        if outbox.is_closing() {
            // Closing: wait for the client's close frame, ignore anything else.
            if frame.opcode == OpCode::Close {
                break;
            }
            continue;
        }
        let fail = match frame.opcode {
            // The library has already refused a Ping over 125 bytes. Each ping gets its pong
            // while at most MAX_PENDING_PONGS wait (then only the latest ones, RFC 6455 5.5.3): a
            // ping flood against a closed window holds a few pongs, and the stall deadline ends it.
            OpCode::Ping => {
                outbox.pong(&frame.payload);
                None
            }
            OpCode::Pong if frame.payload.len() > 125 => Some(CloseReason::Protocol),
            OpCode::Pong => None,
            OpCode::Close => {
                outbox.close(close_reply(&frame.payload));
                break;
            }
            OpCode::Text | OpCode::Binary if partial.is_some() => Some(CloseReason::Protocol),
            OpCode::Text | OpCode::Binary if !frame.fin => {
                let p = partial.insert(Partial::new(frame.opcode, &frame.payload));
                (!p.utf8_ok(false)).then_some(CloseReason::InvalidUtf8)
            }
            OpCode::Text | OpCode::Binary => {
                limited(handler, outbox, &mut rate, frame.opcode, &frame.payload).await
            }
            OpCode::Continuation => match partial.as_mut() {
                None => Some(CloseReason::Protocol),
                Some(p) if p.data.len() + frame.payload.len() > max => Some(CloseReason::TooBig),
                Some(p) => {
                    p.data.extend_from_slice(&frame.payload);
                    if !p.utf8_ok(frame.fin) {
                        Some(CloseReason::InvalidUtf8)
                    } else if frame.fin {
                        let Partial { opcode, data, .. } = partial.take().expect("checked above");
                        limited(handler, outbox, &mut rate, opcode, &data).await
                    } else {
                        None
                    }
                }
            },
        };
        if let Some(reason) = fail {
            outbox.close(reason);
        }
    }
    peer_closed.cancel();
}

impl<'a> Message<'a> {
    /// `None` for text that is not UTF-8.
    fn decode(opcode: OpCode, data: &'a [u8]) -> Option<Message<'a>> {
        match opcode {
            OpCode::Text => std::str::from_utf8(data).ok().map(Message::Text),
            _ => Some(Message::Binary(data)),
        }
    }
}

/// Counts one complete data message against the rate limit, then hands it to the handler, has
/// the handler answer it as rate limited, or closes a flood.
async fn limited<H: Handler>(
    handler: &mut H,
    outbox: &Outbox,
    rate: &mut MessageRate,
    opcode: OpCode,
    data: &[u8],
) -> Option<CloseReason> {
    // `Some(first)` when the message is over the rate.
    let limited = match rate.check() {
        Verdict::Allow => None,
        Verdict::Limited { first } => Some(first),
        Verdict::Flood => {
            tracing::info!("closing a connection that floods messages");
            return Some(CloseReason::Flood);
        }
    };
    // Executed or rate limited, invalid text fails the connection (RFC 6455 8.1).
    let Some(message) = Message::decode(opcode, data) else {
        return Some(CloseReason::InvalidUtf8);
    };
    let reply = match limited {
        None => handler.on_message(message).await,
        Some(first) => {
            if first {
                tracing::info!("connection rate limited");
            }
            handler.on_rate_limited(message)
        }
    };
    // Empty: the handler queued its replies itself (a subscribe with history).
    if !reply.is_empty() {
        outbox.push(reply).await;
    }
    None
}

/// Whether the client masked the frame. fastwebsockets accepts unmasked client frames and keeps
/// the mask private, but the header it formats for a frame sets the mask bit exactly when the
/// frame had a mask.
fn is_masked(frame: &mut Frame<'_>) -> bool {
    let mut head = [0u8; 14];
    frame.fmt_head(&mut head);
    head[1] & 0x80 != 0
}

/// The close code a read error calls for.
fn close_for_error(e: &WebSocketError) -> CloseReason {
    match e {
        WebSocketError::FrameTooLarge => CloseReason::TooBig,
        WebSocketError::InvalidUTF8 => CloseReason::InvalidUtf8,
        WebSocketError::UnexpectedEOF
        | WebSocketError::ConnectionClosed
        | WebSocketError::IoError(_) => CloseReason::Gone,
        _ => CloseReason::Protocol,
    }
}

/// How to answer a client's close frame: echo its code, or fail a malformed one.
fn close_reply(payload: &[u8]) -> CloseReason {
    match payload.len() {
        0 => CloseReason::Echo(Bytes::new()),
        1 | 126.. => CloseReason::Protocol,
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !CloseCode::from(code).is_allowed() {
                CloseReason::Protocol
            } else if std::str::from_utf8(&payload[2..]).is_err() {
                CloseReason::InvalidUtf8
            } else {
                CloseReason::Echo(Bytes::copy_from_slice(&payload[..2]))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_errors_map_to_close_codes() {
        let code = |e: WebSocketError| close_for_error(&e).frame().map(|f| f.0);
        assert_eq!(code(WebSocketError::FrameTooLarge), Some(1009));
        assert_eq!(code(WebSocketError::InvalidUTF8), Some(1007));
        assert_eq!(code(WebSocketError::ReservedBitsNotZero), Some(1002));
        assert_eq!(code(WebSocketError::InvalidValue), Some(1002));
        assert_eq!(code(WebSocketError::ControlFrameFragmented), Some(1002));
        assert_eq!(code(WebSocketError::PingFrameTooLarge), Some(1002));
        assert_eq!(code(WebSocketError::UnexpectedEOF), None);
    }

    #[test]
    fn fragmented_text_fails_on_the_fragment_that_makes_it_invalid() {
        // "€" is E2 82 AC: cut between fragments it is valid so far.
        let mut p = Partial::new(OpCode::Text, b"a\xE2");
        assert!(p.utf8_ok(false));
        p.data.extend_from_slice(b"\x82");
        assert!(p.utf8_ok(false));
        p.data.extend_from_slice(b"\xACb");
        assert!(p.utf8_ok(true));
        // A sequence still open when the message ends is invalid.
        let mut p = Partial::new(OpCode::Text, b"a\xE2\x82");
        assert!(p.utf8_ok(false));
        assert!(!p.utf8_ok(true));
        // F4 90 is already past U+10FFFF: no later fragment can make it valid.
        let mut p = Partial::new(OpCode::Text, b"ok\xF4\x90");
        assert!(!p.utf8_ok(false));
        // Binary is not text.
        let mut p = Partial::new(OpCode::Binary, b"\xFF");
        assert!(p.utf8_ok(true));
    }

    #[test]
    fn close_frames_are_validated() {
        assert_eq!(close_reply(b""), CloseReason::Echo(Bytes::new()));
        assert_eq!(close_reply(b"\x03"), CloseReason::Protocol);
        assert_eq!(
            close_reply(b"\x03\xe8bye"),
            CloseReason::Echo(Bytes::from_static(b"\x03\xe8"))
        );
        assert_eq!(close_reply(b"\x03\xed"), CloseReason::Protocol); // 1005
        assert_eq!(close_reply(b"\x03\xec"), CloseReason::Protocol); // 1004
        assert_eq!(
            close_reply(b"\x0b\xb8"),
            CloseReason::Echo(Bytes::from_static(b"\x0b\xb8"))
        ); // 3000
        assert_eq!(close_reply(b"\x03\xe8\xff"), CloseReason::InvalidUtf8);
    }
}
