//! `subscribe`: idempotent; `subscribed` only once the subscription is live on the broker.
//!
//! With `presence_events: true` the connection also receives the channel's join/leave events
//! (subscribe permission covers both). The events subscription is made first, so every join
//! after `subscribed` reaches the client. Subscribing again to a channel the connection has
//! sets the events flag to the new request's value (absent = off): the last subscribe wins.
//!
//! With history on, `subscribed` carries the channel's epoch and newest offset, and a `since`
//! position recovers what the client missed: the subscription goes live behind a gate first,
//! then the history is read, `subscribed` and the replay are queued, and the gate merges the live
//! messages it held by offset (see [`crate::hub::Gate`]): no gap, no duplicate.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::{broker_failed, forbidden, Session};
use crate::history::Read;
use crate::wire::protocol::{encode_delivery_at, ErrorCode, Rejection, Reply, Since};

pub async fn apply<'a>(
    session: &mut Session,
    id: Option<&'a RawValue>,
    channel: &str,
    since: Option<Since<'_>>,
    presence_events: bool,
) -> Result<Bytes, Rejection<'a>> {
    if !session.permissions.can_subscribe(channel) {
        return Err(forbidden(id, "subscribe to", channel));
    }
    let known = session.channels.contains(channel);
    if !known {
        let limit = session.node.limits().max_subscriptions;
        if session.channels.len() >= limit {
            return Err(Rejection::new(
                id,
                ErrorCode::TooManySubscriptions,
                format!("a connection may subscribe to at most {limit} channels"),
            ));
        }
    }
    // Already live with history on: the position is read before anything changes, so a failed
    // read leaves the subscription and its events flag as they were.
    let known_snapshot = match (session.node.history_on(), known) {
        (true, true) => Some(
            session
                .node
                .history_read(channel, Read::State)
                .await
                .map_err(|e| broker_failed(id, "subscribe", &e))?,
        ),
        _ => None,
    };
    let watching = session.watched.contains(channel);
    if presence_events && !watching {
        // Recorded first, like the channel below: the session's cleanup undoes a partial step.
        session.watched.insert(channel.to_owned());
        if let Err(e) = session.node.watch_presence(&session.outbox, channel).await {
            session.watched.remove(channel);
            return Err(broker_failed(id, "subscribe", &e));
        }
    } else if !presence_events && watching {
        session.unwatch_presence(channel).await;
    }
    if !session.node.history_on() {
        if !known {
            // Recorded first: if the connection ends while this is in flight, the session's
            // cleanup still undoes whatever part of the subscription was made.
            session.channels.insert(channel.to_owned());
            if let Err(e) = session.node.subscribe(&session.outbox, channel).await {
                session.channels.remove(channel);
                session.unwatch_presence(channel).await;
                return Err(broker_failed(id, "subscribe", &e));
            }
        }
        return Ok(Reply::Subscribed {
            channel,
            id,
            epoch: None,
            offset: None,
            recovered: None,
        }
        .encode());
    }
    if let Some(snapshot) = known_snapshot {
        // Already live: report the position, replay nothing (the client has the messages).
        return Ok(Reply::Subscribed {
            channel,
            id,
            epoch: Some(&snapshot.epoch),
            offset: Some(snapshot.offset),
            recovered: since.map(|_| false),
        }
        .encode());
    }
    subscribe_with_history(session, id, channel, since).await
}

async fn subscribe_with_history<'a>(
    session: &mut Session,
    id: Option<&'a RawValue>,
    channel: &str,
    since: Option<Since<'_>>,
) -> Result<Bytes, Rejection<'a>> {
    let node = session.node.clone();
    session.channels.insert(channel.to_owned());
    let gate = match node.subscribe_gated(&session.outbox, channel).await {
        Ok(Some(gate)) => gate,
        // Not in the session's set but in the hub: cannot happen (the session owns both).
        Ok(None) => {
            return Err(broker_failed(
                id,
                "subscribe",
                &crate::error::BrokerError::Down,
            ))
        }
        Err(e) => {
            session.channels.remove(channel);
            session.unwatch_presence(channel).await;
            return Err(broker_failed(id, "subscribe", &e));
        }
    };
    let read = match &since {
        Some(s) => Read::Since {
            epoch: &s.epoch,
            offset: s.offset,
        },
        None => Read::State,
    };
    let snapshot = match node.history_read(channel, read).await {
        Ok(snapshot) => snapshot,
        Err(e) => {
            session.channels.remove(channel);
            node.unsubscribe(&session.outbox, channel).await;
            session.unwatch_presence(channel).await;
            return Err(broker_failed(id, "subscribe", &e));
        }
    };
    let recovered = since
        .as_ref()
        .map(|s| snapshot.recovers(&s.epoch, s.offset));
    if let Some(recovered) = recovered {
        let outcome = if recovered {
            "recovered"
        } else {
            "not_recovered"
        };
        node.metrics()
            .recoveries
            .with_label_values(&[outcome])
            .inc();
    }
    let reply = Reply::Subscribed {
        channel,
        id,
        epoch: Some(&snapshot.epoch),
        offset: Some(snapshot.offset),
        recovered,
    }
    .encode();
    let outbox = &session.outbox;
    outbox.push(reply).await;
    if recovered == Some(true) {
        for (offset, payload) in &snapshot.messages {
            outbox
                .push(encode_delivery_at(channel, payload, *offset))
                .await;
        }
        node.metrics()
            .replayed
            .inc_by(snapshot.messages.len() as u64);
    }
    gate.go_live(outbox, &snapshot.epoch, snapshot.offset);
    // Already queued, in order, above.
    Ok(Bytes::new())
}
