//! `presence`: every connection subscribed to the channel, on every node.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::{unavailable, Session};
use crate::protocol::{Rejection, Reply};

pub async fn apply<'a>(
    session: &mut Session,
    id: Option<&'a RawValue>,
    channel: &str,
) -> Result<Bytes, Rejection<'a>> {
    let members = session
        .node
        .presence(channel)
        .await
        .map_err(|e| unavailable(id, "presence", &e))?;
    Ok(Reply::Presence {
        channel,
        id,
        count: members.len(),
        members: &members,
    }
    .encode())
}
