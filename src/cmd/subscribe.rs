//! `subscribe`: idempotent; `subscribed` only once the subscription is live on the broker.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::{broker_failed, forbidden, Session};
use crate::protocol::{ErrorCode, Rejection, Reply};

pub async fn apply<'a>(
    session: &mut Session,
    id: Option<&'a RawValue>,
    channel: &str,
) -> Result<Bytes, Rejection<'a>> {
    if !session.permissions.can_subscribe(channel) {
        return Err(forbidden(id, "subscribe to", channel));
    }
    if !session.channels.contains(channel) {
        let limit = session.node.limits.max_subscriptions;
        if session.channels.len() >= limit {
            return Err(Rejection::new(
                id,
                ErrorCode::TooManySubscriptions,
                format!("a connection may subscribe to at most {limit} channels"),
            ));
        }
        // Recorded first: if the connection ends while this is in flight, the session's cleanup
        // still undoes whatever part of the subscription was made.
        session.channels.insert(channel.to_owned());
        if let Err(e) = session.node.subscribe(&session.outbox, channel).await {
            session.channels.remove(channel);
            return Err(broker_failed(id, "subscribe", &e));
        }
    }
    Ok(Reply::Subscribed { channel, id }.encode())
}
