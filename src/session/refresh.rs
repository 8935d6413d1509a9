//! `refresh`: a new token for the same user replaces the connection's permissions and expiry.
//!
//! Subscriptions the new permissions no longer cover end first, each with an `unsubscribed`
//! carrying `"reason":"forbidden"` and no id, then `refreshed` is the reply. Anything else (no
//! key configured, an invalid token, another `sub`) is `forbidden` and changes nothing.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::Session;
use crate::auth::Identity;
use crate::wire::protocol::{ErrorCode, Rejection, Reply};

pub async fn apply<'a>(
    session: &mut Session,
    id: Option<&'a RawValue>,
    token: &str,
) -> Result<Bytes, Rejection<'a>> {
    let forbidden = |why: String| Rejection::new(id, ErrorCode::Forbidden, why);
    let Some(verifier) = session.node.auth().verifier() else {
        return Err(forbidden(
            "refresh is not available: connections are anonymous".into(),
        ));
    };
    let claims = verifier
        .verify(token)
        .map_err(|e| forbidden(format!("refresh refused: {}", e.reason())))?;
    if session.user.as_deref() != Some(claims.sub.as_str()) {
        return Err(forbidden(
            "refresh refused: the token is for another user".into(),
        ));
    }
    let identity = Identity::from_claims(&claims);
    let mut lost: Vec<String> = session
        .channels
        .iter()
        .filter(|c| !identity.permissions.can_subscribe(c))
        .cloned()
        .collect();
    lost.sort();
    // The new permissions apply before the first await, so no request can slip in under the
    // old ones (the reader runs one request at a time anyway). Deliveries of every revoked
    // channel stop before presence and the broker are cleaned up (see `Node::revoke`): a slow
    // Redis delays the replies, never the revocation.
    session.permissions = identity.permissions;
    let unwatched: Vec<String> = lost
        .iter()
        .filter(|c| session.watched.remove(*c))
        .cloned()
        .collect();
    session
        .node
        .revoke(&session.outbox, &lost, &unwatched)
        .await;
    for channel in &lost {
        session.channels.remove(channel);
        let notice = Reply::Unsubscribed {
            channel,
            id: None,
            reason: Some("forbidden"),
        };
        session.outbox.push(notice.encode()).await;
    }
    if let Some(expiry) = &session.expiry {
        let _ = expiry.send(claims.exp);
    }
    Ok(Reply::Refreshed {
        id,
        exp: claims.exp,
    }
    .encode())
}
