//! `history`: the newest `limit` kept messages of a channel, oldest first. Needs subscribe
//! permission; `unsupported` with history off. A `limit` above the history size is clamped to it
//! (the contract's "at most"); `0` returns no message, only the epoch and newest offset.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::{broker_failed, forbidden, Session};
use crate::history::Read;
use crate::wire::protocol::{encode_history, ErrorCode, Rejection};

pub async fn apply<'a>(
    session: &mut Session,
    id: Option<&'a RawValue>,
    channel: &str,
    limit: Option<u64>,
) -> Result<Bytes, Rejection<'a>> {
    if !session.node.history_on() {
        return Err(Rejection::new(
            id,
            ErrorCode::Unsupported,
            "history is off on this deployment (PUBGATE_HISTORY_SIZE=0)",
        ));
    }
    if !session.permissions.can_subscribe(channel) {
        return Err(forbidden(id, "read the history of", channel));
    }
    let size = session.node.history_size();
    let limit = limit.map_or(size, |l| l.min(size as u64) as usize);
    let snapshot = session
        .node
        .history_read(channel, Read::Latest { limit })
        .await
        .map_err(|e| broker_failed(id, "history", &e))?;
    Ok(encode_history(
        channel,
        id,
        &snapshot.epoch,
        snapshot.offset,
        &snapshot.messages,
    ))
}
