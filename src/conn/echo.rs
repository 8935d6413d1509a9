//! The Autobahn TestSuite's handler (cargo feature `autobahn`): each message goes back with its
//! opcode, and no welcome is sent, so the suite tests exactly this connection code.

use bytes::Bytes;

use super::{Handler, Message};
use crate::wire::frame;

/// Sends each message back.
#[derive(Debug, Default)]
pub struct Echo;

impl Handler for Echo {
    async fn on_message(&mut self, message: Message<'_>) -> Bytes {
        match message {
            Message::Text(text) => {
                frame::text(text.len(), |b| b.extend_from_slice(text.as_bytes()))
            }
            Message::Binary(data) => frame::binary(data),
        }
    }

    /// Not echoed (the echo server runs without a rate limit).
    fn on_rate_limited(&mut self, _message: Message<'_>) -> Bytes {
        Bytes::new()
    }

    async fn end(self) {}
}
