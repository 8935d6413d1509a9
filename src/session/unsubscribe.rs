//! `unsubscribe`: the member is gone from presence before `unsubscribed` is sent.
//!
//! The channel's presence events (if the connection watched them) stop first: nothing about the
//! channel follows `unsubscribed`, and the connection never sees its own leave.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::Session;
use crate::wire::protocol::{ErrorCode, Rejection, Reply};

pub async fn apply<'a>(
    session: &mut Session,
    id: Option<&'a RawValue>,
    channel: &str,
) -> Result<Bytes, Rejection<'a>> {
    if !session.channels.contains(channel) {
        return Err(Rejection::new(
            id,
            ErrorCode::NotSubscribed,
            format!("not subscribed to `{channel}`"),
        ));
    }
    if session.watched.contains(channel) {
        session
            .node
            .unwatch_presence(&session.outbox, channel)
            .await;
        session.watched.remove(channel);
    }
    session.node.unsubscribe(&session.outbox, channel).await;
    // Forgotten last: if the connection ends meanwhile, the session's cleanup finishes the job.
    session.channels.remove(channel);
    Ok(Reply::Unsubscribed {
        channel,
        id,
        reason: None,
    }
    .encode())
}
