//! The socket of an upgraded connection, split between the reader and the writer.
//!
//! A plain TCP connection is taken out of hyper's upgrade (`Upgraded::downcast`) into owned
//! halves: no lock between the halves, no boxed stream, and the bytes hyper read behind the
//! upgrade request come out with it, to be parsed first ([`super::Source`]); hyper's read buffer
//! is freed once they are. Any other stream (TLS) stays in the upgrade, which hands those bytes
//! out itself, split by `tokio::io::split`.

use bytes::Bytes;
use fastwebsockets::WebSocket;
use hyper_util::rt::TokioIo;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::Io;

/// An upgraded connection's read and write halves.
pub enum Transport {
    /// Plain TCP, with the bytes hyper read behind the upgrade request.
    Tcp(OwnedReadHalf, OwnedWriteHalf, Bytes),
    /// Any other stream, still inside hyper's upgrade.
    Upgraded(ReadHalf<Io>, WriteHalf<Io>),
}

impl Transport {
    /// Splits the stream of a WebSocket that has not read anything yet.
    pub fn new(ws: WebSocket<Io>) -> Transport {
        match ws
            .into_inner()
            .into_inner()
            .downcast::<TokioIo<TcpStream>>()
        {
            Ok(parts) => {
                let (read, write) = parts.io.into_inner().into_split();
                Transport::Tcp(read, write, parts.read_buf)
            }
            Err(upgraded) => {
                let (read, write) = tokio::io::split(TokioIo::new(upgraded));
                Transport::Upgraded(read, write)
            }
        }
    }
}
