//! Server-to-client WebSocket frames, encoded once and written as they are.
//!
//! Server frames are never masked (RFC 6455 5.1), so a frame's bytes do not depend on the socket
//! they go to: a delivery is encoded into one complete frame per node and the same `Bytes` is
//! queued to every subscriber and handed to a vectored write without another copy. Payloads are
//! built behind room reserved for the longest header, which is then filled in right-aligned.

use bytes::Bytes;

const FIN: u8 = 0x80;
const TEXT: u8 = 0x1;
#[cfg(any(test, feature = "autobahn"))]
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;
/// The longest header of an unmasked frame: 2 bytes plus a 64-bit length.
const MAX_HEADER: usize = 10;

/// An empty Ping, sent by the server's ping timer.
pub const PING_FRAME: Bytes = Bytes::from_static(&[FIN | PING, 0]);

/// A text frame whose payload is written by `build` (which must write UTF-8).
pub fn text(capacity: usize, build: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    data(TEXT, capacity, build)
}

/// A binary frame carrying `payload` (the Autobahn echo endpoint's; pubgate itself sends text).
#[cfg(any(test, feature = "autobahn"))]
pub fn binary(payload: &[u8]) -> Bytes {
    data(BINARY, payload.len(), |b| b.extend_from_slice(payload))
}

fn data(opcode: u8, capacity: usize, build: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut buf = Vec::with_capacity(MAX_HEADER + capacity);
    buf.resize(MAX_HEADER, 0);
    build(&mut buf);
    finish(buf, opcode)
}

/// A Pong echoing a client Ping's payload (at most 125 bytes, checked by the reader).
pub fn pong(payload: &[u8]) -> Bytes {
    control(PONG, payload)
}

/// A Close frame with the given payload: empty, or a code and an optional UTF-8 reason.
pub fn close(payload: &[u8]) -> Bytes {
    control(CLOSE, payload)
}

/// A Close frame carrying `code` and `reason`.
pub fn close_with(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    close(&payload)
}

fn control(opcode: u8, payload: &[u8]) -> Bytes {
    debug_assert!(
        payload.len() <= 125,
        "control frame payloads are at most 125 bytes"
    );
    let mut buf = Vec::with_capacity(2 + payload.len());
    buf.extend_from_slice(&[FIN | opcode, payload.len() as u8]);
    buf.extend_from_slice(payload);
    Bytes::from(buf)
}

/// Writes the header for the payload after the reserved room and drops the unused room.
fn finish(mut buf: Vec<u8>, opcode: u8) -> Bytes {
    let len = buf.len() - MAX_HEADER;
    let start = match len {
        0..=125 => {
            buf[MAX_HEADER - 1] = len as u8;
            MAX_HEADER - 2
        }
        126..=0xFFFF => {
            buf[MAX_HEADER - 3] = 126;
            buf[MAX_HEADER - 2..MAX_HEADER].copy_from_slice(&(len as u16).to_be_bytes());
            MAX_HEADER - 4
        }
        _ => {
            buf[1] = 127;
            buf[2..MAX_HEADER].copy_from_slice(&(len as u64).to_be_bytes());
            0
        }
    };
    buf[start] = FIN | opcode;
    Bytes::from(buf).slice(start..)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(len: usize) -> Bytes {
        text(len, |b| b.resize(b.len() + len, b'a'))
    }

    #[test]
    fn text_frames_use_the_shortest_length_encoding() {
        let f = text_of(0);
        assert_eq!(&f[..], &[0x81, 0]);
        let f = text_of(125);
        assert_eq!(&f[..2], &[0x81, 125]);
        assert_eq!(f.len(), 127);
        let f = text_of(126);
        assert_eq!(&f[..4], &[0x81, 126, 0, 126]);
        assert_eq!(f.len(), 130);
        let f = text_of(65535);
        assert_eq!(&f[..4], &[0x81, 126, 0xFF, 0xFF]);
        let f = text_of(65536);
        assert_eq!(&f[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(f.len(), 65546);
        assert!(f[10..].iter().all(|&b| b == b'a'));
    }

    #[test]
    fn binary_frames() {
        assert_eq!(&binary(b"")[..], &[0x82, 0]);
        assert_eq!(&binary(&[0xFF; 3])[..], &[0x82, 3, 0xFF, 0xFF, 0xFF]);
        let f = binary(&[7; 70000]);
        assert_eq!(&f[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        assert_eq!(f.len(), 70010);
    }

    #[test]
    fn control_frames() {
        assert_eq!(&PING_FRAME[..], &[0x89, 0]);
        assert_eq!(&pong(b"hi")[..], &[0x8A, 2, b'h', b'i']);
        assert_eq!(&close(b"")[..], &[0x88, 0]);
        assert_eq!(
            &close_with(1001, "bye")[..],
            &[0x88, 5, 0x03, 0xE9, b'b', b'y', b'e']
        );
    }
}
