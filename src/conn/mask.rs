//! Spots unmasked client frames, which fastwebsockets 0.10 accepts without telling.
//!
//! RFC 6455 section 5.1: a server must close the connection when a client frame is not masked.
//! fastwebsockets keeps a frame's mask private, so this wraps the read half and follows the
//! frame headers in the byte stream as they pass (payloads are skipped by length, never
//! copied). The reader checks [`Unmasked`] after each frame and closes with 1002. A frame the
//! library refuses ends the connection anyway, so the two parsers never need to agree past it.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Set once an unmasked frame header went by.
#[derive(Debug, Clone, Default)]
pub struct Unmasked(Arc<AtomicBool>);

impl Unmasked {
    pub fn seen(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A read half that watches frame headers.
pub struct MaskCheck<R> {
    inner: R,
    flag: Unmasked,
    /// Header bytes of the frame being read.
    head: [u8; 14],
    have: usize,
    /// Payload bytes still to pass before the next header.
    skip: u64,
}

impl<R> MaskCheck<R> {
    pub fn new(inner: R, flag: Unmasked) -> Self {
        MaskCheck {
            inner,
            flag,
            head: [0; 14],
            have: 0,
            skip: 0,
        }
    }

    /// Follows `bytes` through the frame structure.
    fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = (bytes.len() as u64).min(self.skip) as usize;
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            self.head[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if self.have < 2 {
                continue;
            }
            let masked = self.head[1] & 0x80 != 0;
            let (ext, len7) = match self.head[1] & 0x7f {
                126 => (2, None),
                127 => (8, None),
                n => (0, Some(u64::from(n))),
            };
            let need = 2 + ext + if masked { 4 } else { 0 };
            if self.have < need {
                continue;
            }
            let len = len7.unwrap_or_else(|| {
                self.head[2..2 + ext]
                    .iter()
                    .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
            });
            if !masked {
                self.flag.0.store(true, Ordering::Relaxed);
            }
            self.skip = len;
            self.have = 0;
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for MaskCheck<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &result {
            // Cheap: only header bytes are looked at; payloads are skipped by length.
            this.scan(&buf.filled()[before..]);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(masked: bool, len: usize) -> Vec<u8> {
        let mut out = vec![0x81];
        let bit = if masked { 0x80 } else { 0 };
        if len < 126 {
            out.push(bit | len as u8);
        } else if len <= 0xffff {
            out.push(bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if masked {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        // Payload bytes that look like unmasked headers, to prove they are skipped.
        out.extend(std::iter::repeat_n(0x01, len));
        out
    }

    fn scan_in_chunks(bytes: &[u8], chunk: usize) -> bool {
        let flag = Unmasked::default();
        let mut check = MaskCheck::new((), flag.clone());
        for piece in bytes.chunks(chunk) {
            check.scan(piece);
        }
        flag.seen()
    }

    #[test]
    fn masked_frames_of_every_length_form_pass() {
        let mut stream = Vec::new();
        for len in [0, 1, 125, 126, 300, 65535, 65536, 70000] {
            stream.extend(frame(true, len));
        }
        for chunk in [1, 3, 7, 100, 100_000] {
            assert!(!scan_in_chunks(&stream, chunk), "chunk {chunk}");
        }
    }

    #[test]
    fn an_unmasked_frame_anywhere_is_seen() {
        for len in [0, 5, 200, 70000] {
            let mut stream = frame(true, 300);
            stream.extend(frame(false, len));
            stream.extend(frame(true, 3));
            for chunk in [1, 2, 5, 64, 1 << 20] {
                assert!(scan_in_chunks(&stream, chunk), "len {len}, chunk {chunk}");
            }
        }
    }
}
