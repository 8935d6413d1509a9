//! `publish`: puts the JSON text of `data` on the broker; `published` once it is accepted.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::{broker_failed, forbidden, Session};
use crate::wire::protocol::{Rejection, Reply};

pub async fn apply<'a>(
    session: &mut Session,
    id: Option<&'a RawValue>,
    channel: &str,
    data: &RawValue,
) -> Result<Bytes, Rejection<'a>> {
    if !session.permissions.can_publish(channel) {
        return Err(forbidden(id, "publish to", channel));
    }
    let offset = session
        .node
        .publish(channel, data.get())
        .await
        .map_err(|e| broker_failed(id, "publish", &e))?;
    Ok(Reply::Published {
        channel,
        id,
        offset,
    }
    .encode())
}
