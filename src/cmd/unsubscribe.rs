//! `unsubscribe`: the member is gone from presence before `unsubscribed` is sent.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::Session;
use crate::protocol::{ErrorCode, Rejection, Reply};

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
