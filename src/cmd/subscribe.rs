//! `subscribe`: idempotent; `subscribed` only once the subscription is live on the broker.
//!
//! With `presence_events: true` the connection also receives the channel's join/leave events
//! (subscribe permission covers both). The events subscription is made first, so every join
//! after `subscribed` reaches the client. Subscribing again to a channel the connection has
//! sets the events flag to the new request's value (absent = off): the last subscribe wins.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::{forbidden, unavailable, Session};
use crate::protocol::{ErrorCode, Rejection, Reply};

pub async fn apply<'a>(
    session: &mut Session,
    id: Option<&'a RawValue>,
    channel: &str,
    presence_events: bool,
) -> Result<Bytes, Rejection<'a>> {
    if !session.permissions.can_subscribe(channel) {
        return Err(forbidden(id, "subscribe to", channel));
    }
    let subscribed = session.channels.contains(channel);
    if !subscribed {
        let limit = session.node.limits.max_subscriptions;
        if session.channels.len() >= limit {
            return Err(Rejection::new(
                id,
                ErrorCode::TooManySubscriptions,
                format!("a connection may subscribe to at most {limit} channels"),
            ));
        }
    }
    let watching = session.watched.contains(channel);
    if presence_events && !watching {
        // Recorded first, like the channel below: the session's cleanup undoes a partial step.
        session.watched.insert(channel.to_owned());
        if let Err(e) = session.node.watch_presence(&session.outbox, channel).await {
            session.watched.remove(channel);
            return Err(unavailable(id, "subscribe", &e));
        }
    } else if !presence_events && watching {
        session
            .node
            .unwatch_presence(&session.outbox, channel)
            .await;
        session.watched.remove(channel);
    }
    if !subscribed {
        // Recorded first: if the connection ends while this is in flight, the session's cleanup
        // still undoes whatever part of the subscription was made.
        session.channels.insert(channel.to_owned());
        if let Err(e) = session.node.subscribe(&session.outbox, channel).await {
            session.channels.remove(channel);
            if session.watched.remove(channel) {
                session
                    .node
                    .unwatch_presence(&session.outbox, channel)
                    .await;
            }
            return Err(unavailable(id, "subscribe", &e));
        }
    }
    Ok(Reply::Subscribed { channel, id }.encode())
}
