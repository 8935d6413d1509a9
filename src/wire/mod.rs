//! What goes on the wire to a client, and the per-connection queue that holds it.
//!
//! The lowest layer above settings and metrics: the JSON protocol ([`protocol`]), the server's
//! pre-encoded frames ([`frame`]), a connection's identity as presence shows it ([`member`]) and
//! its [`Outbox`] (queue, byte budget, close switch). The hub, the session and the socket code
//! all use these; this module uses none of them.

pub mod frame;
pub mod member;
mod outbox;
pub mod protocol;

pub use self::member::Member;
pub use self::outbox::{Budget, CloseReason, Outbox, Push};
