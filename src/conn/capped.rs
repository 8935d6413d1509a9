//! A read half that hands the WebSocket parser at most [`READ_CHUNK`] bytes per read.
//!
//! fastwebsockets reads into a `BytesMut` and, before each frame's payload, reserves room for it
//! behind the bytes not parsed yet. After a read that filled the buffer with many small frames
//! (a ping flood), that reservation finds no room and doubles the buffer; the next read fills the
//! doubled buffer again, so the buffer grows to whatever the kernel holds for the socket (16 MiB
//! measured, up to `net.ipv4.tcp_rmem`'s maximum). Capping each read bounds the unparsed bytes
//! and so the buffer: about one frame (`PUBGATE_MAX_MESSAGE_SIZE`) plus one chunk.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Most bytes read from the socket at once: enough for many small frames per syscall.
const READ_CHUNK: usize = 16 * 1024;

/// `R`, read at most [`READ_CHUNK`] bytes at a time.
pub struct Capped<R>(pub R);

impl<R: AsyncRead + Unpin> AsyncRead for Capped<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() <= READ_CHUNK {
            return Pin::new(&mut self.0).poll_read(cx, buf);
        }
        let mut chunk = ReadBuf::new(buf.initialize_unfilled_to(READ_CHUNK));
        ready!(Pin::new(&mut self.0).poll_read(cx, &mut chunk))?;
        let n = chunk.filled().len();
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn reads_at_most_a_chunk_at_a_time() {
        let data = vec![7u8; 3 * READ_CHUNK + 5];
        let mut capped = Capped(&data[..]);
        let mut buf = bytes::BytesMut::with_capacity(10 * READ_CHUNK);
        let mut reads = Vec::new();
        loop {
            let n = capped.read_buf(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            reads.push(n);
        }
        assert_eq!(reads, [READ_CHUNK, READ_CHUNK, READ_CHUNK, 5]);
        assert_eq!(&buf[..], &data[..]);
    }
}
