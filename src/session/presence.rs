//! `presence`: every connection subscribed to the channel, on every node. Needs subscribe
//! permission on the channel (whoever may not listen may not see who listens either).
//!
//! `count` is always exact; `members` holds at most `PUBGATE_PRESENCE_MAX_MEMBERS` entries
//! (`"truncated":true` when capped) and is left out of a `count_only` reply.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::{broker_failed, forbidden, Session};
use crate::wire::protocol::{Rejection, Reply};

pub async fn apply<'a>(
    session: &mut Session,
    id: Option<&'a RawValue>,
    channel: &str,
    count_only: bool,
) -> Result<Bytes, Rejection<'a>> {
    if !session.permissions.can_subscribe(channel) {
        return Err(forbidden(id, "query presence of", channel));
    }
    let listing = session
        .node
        .presence(channel, count_only)
        .await
        .map_err(|e| broker_failed(id, "presence", &e))?;
    Ok(Reply::Presence {
        channel,
        id,
        count: listing.count,
        members: (!count_only).then_some(listing.members.as_slice()),
        truncated: !count_only && listing.members.len() < listing.count,
    }
    .encode())
}
