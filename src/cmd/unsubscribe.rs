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
    if !session.channels.remove(channel) {
        return Err(Rejection::new(
            id,
            ErrorCode::NotSubscribed,
            format!("not subscribed to `{channel}`"),
        ));
    }
    session.node.unsubscribe(&session.outbox, channel).await;
    Ok(Reply::Unsubscribed { channel, id }.encode())
}
