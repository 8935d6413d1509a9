//! `presence`: every connection subscribed to the channel, on every node. Needs subscribe
//! permission on the channel (whoever may not listen may not see who listens either).

use bytes::Bytes;
use serde_json::value::RawValue;

use super::{broker_failed, forbidden, Session};
use crate::protocol::{Rejection, Reply};

pub async fn apply<'a>(
    session: &mut Session,
    id: Option<&'a RawValue>,
    channel: &str,
) -> Result<Bytes, Rejection<'a>> {
    if !session.permissions.can_subscribe(channel) {
        return Err(forbidden(id, "query presence of", channel));
    }
    let members = session
        .node
        .presence(channel)
        .await
        .map_err(|e| broker_failed(id, "presence", &e))?;
    Ok(Reply::Presence {
        channel,
        id,
        count: members.len(),
        members: &members,
    }
    .encode())
}
