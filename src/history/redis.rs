//! History in Redis: the `pubgate` function library.
//!
//! Publishing is `FCALL pubgate_publish 1 <prefix><channel> <payload>`: in one atomic step the
//! function bumps the channel's offset (creating its epoch if absent), appends to a Stream whose
//! entry IDs are `<offset>-0` (exact MAXLEN trim), sets both keys' TTL and PUBLISHes the
//! positioned payload. Backends call the same function, so every message a channel receives
//! through pubgate has an offset, and all nodes see the same one. Reads go through
//! `pubgate_read`, which creates the epoch on first use too.
//!
//! The library source is generated from `pubgate.lua` with this deployment's prefix, size and TTL
//! baked in (one Redis serves one deployment's settings). Every node loads it at start, in the
//! background until Redis takes it: it first asks the loaded library for its version string and
//! replaces it only when that differs (logged loudly: nodes disagree on settings, or an upgrade),
//! so nodes starting together do not fight. A Redis that lost its functions (restarted without
//! persistence) answers "Function not found"; the call then loads the library and retries once.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_redis::redis::{self, RedisError};

use super::{History, Read, Snapshot};
use crate::error::BrokerError;
use crate::redis_commands::RedisCommands;

const LIBRARY: &str = include_str!("pubgate.lua");
/// Bumped whenever `pubgate.lua` changes shape.
const LIBRARY_REVISION: u32 = 1;

/// Settings baked into the function library.
#[derive(Debug, Clone)]
pub struct RedisHistoryOptions {
    pub prefix: String,
    pub size: usize,
    pub ttl: Duration,
}

/// History over the `pubgate` Redis function library.
pub struct RedisHistory {
    inner: Arc<Inner>,
}

struct Inner {
    commands: Arc<RedisCommands>,
    prefix: String,
    source: String,
    version: String,
}

impl RedisHistory {
    /// Builds the library source and starts loading it in the background.
    pub fn new(commands: Arc<RedisCommands>, options: RedisHistoryOptions) -> Self {
        let cluster = commands.is_cluster();
        let version = format!(
            "pubgate-library r{LIBRARY_REVISION} prefix={} size={} ttl_ms={}{}",
            options.prefix,
            options.size,
            options.ttl.as_millis(),
            if cluster { " sharded" } else { "" }
        );
        // In a Redis Cluster the message goes out with SPUBLISH (sharded pub/sub): its channel is
        // the function's key, so it is in the slot the function runs on.
        let library = if cluster {
            LIBRARY.replace(
                "redis.call('PUBLISH', channel,",
                "redis.call('SPUBLISH', channel,",
            )
        } else {
            LIBRARY.to_owned()
        };
        let source = library
            .replace("__VERSION__", &lua_escape(&version))
            .replace("__PREFIX__", &lua_escape(&options.prefix))
            .replace("__SIZE__", &options.size.to_string())
            .replace("__TTL_MS__", &options.ttl.as_millis().to_string());
        let inner = Arc::new(Inner {
            commands,
            prefix: options.prefix,
            source,
            version,
        });
        tokio::spawn(load_until_done(Arc::downgrade(&inner)));
        RedisHistory { inner }
    }
}

/// Escapes every byte that is not alphanumeric as a Lua decimal escape (`\ddd`), so any prefix
/// is safe inside a single-quoted Lua string.
fn lua_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b' ' || b == b'_' || b == b'=' {
                (b as char).to_string()
            } else {
                format!("\\{b:03}")
            }
        })
        .collect()
}

fn missing_function(e: &BrokerError) -> bool {
    matches!(e, BrokerError::Redis(e) if e.to_string().contains("Function not found"))
}

impl Inner {
    /// Loads the library unless the loaded one has this node's version string.
    async fn ensure_loaded(&self) -> Result<(), BrokerError> {
        // In a cluster the version check would ask one random node; FUNCTION LOAD REPLACE goes to
        // every master (redis-rs routes it so), which is what a cluster needs, and is idempotent.
        let loaded = if self.commands.is_cluster() {
            Err(BrokerError::Down)
        } else {
            self.commands
                .run(|mut c| async move {
                    redis::cmd("FCALL")
                        .arg("pubgate_version")
                        .arg(0)
                        .query_async::<String>(&mut c)
                        .await
                })
                .await
        };
        match loaded {
            Ok(v) if v == self.version => return Ok(()),
            Ok(other) => tracing::error!(
                loaded = %other,
                ours = %self.version,
                "the pubgate Redis function library differs from this node's settings: replacing it; \
                 every node of a deployment must share PUBGATE_CHANNEL_PREFIX and the history settings"
            ),
            Err(e) if missing_function(&e) => {}
            Err(BrokerError::Down) if self.commands.is_cluster() => {}
            Err(e) => return Err(e),
        }
        let source = self.source.clone();
        self.commands
            .run(|mut c| async move {
                redis::cmd("FUNCTION")
                    .arg("LOAD")
                    .arg("REPLACE")
                    .arg(source)
                    .query_async::<String>(&mut c)
                    .await
            })
            .await?;
        tracing::info!(version = %self.version, "redis function library loaded");
        Ok(())
    }

    /// Runs an FCALL; loads the library and retries once if Redis does not know the function.
    async fn fcall<T: redis::FromRedisValue + Send + 'static>(
        &self,
        build: impl Fn() -> redis::Cmd,
    ) -> Result<T, BrokerError> {
        let call = || {
            let cmd = build();
            self.commands
                .run(|mut c| async move { cmd.query_async::<T>(&mut c).await })
        };
        match call().await {
            Err(e) if missing_function(&e) => {
                self.ensure_loaded().await?;
                call().await
            }
            other => other,
        }
    }

    fn key(&self, channel: &str) -> String {
        format!("{}{channel}", self.prefix)
    }
}

/// Loads the library at start, retrying with a capped backoff while Redis is unreachable.
async fn load_until_done(inner: Weak<Inner>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        match strong.ensure_loaded().await {
            Ok(()) => return,
            Err(e) => tracing::debug!(error = %e, "redis function library not loaded yet"),
        }
        drop(strong);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

#[async_trait]
impl History for RedisHistory {
    async fn publish(&self, channel: &str, payload: Bytes) -> Result<u64, BrokerError> {
        let key = self.inner.key(channel);
        self.inner
            .fcall::<u64>(|| {
                let mut cmd = redis::cmd("FCALL");
                cmd.arg("pubgate_publish")
                    .arg(1)
                    .arg(&key)
                    .arg(payload.as_ref());
                cmd
            })
            .await
    }

    async fn read(&self, channel: &str, read: Read<'_>) -> Result<Snapshot, BrokerError> {
        let key = self.inner.key(channel);
        let reply: Vec<Vec<u8>> = self
            .inner
            .fcall(|| {
                let mut cmd = redis::cmd("FCALL");
                cmd.arg("pubgate_read").arg(1).arg(&key);
                match read {
                    Read::State => cmd.arg("state"),
                    // Lua numbers are doubles: anything above 2^53 is beyond every offset anyway.
                    Read::Since { epoch, offset } => {
                        cmd.arg("since").arg(epoch).arg(offset.min(1 << 53))
                    }
                    Read::Latest { limit } => cmd.arg("latest").arg(limit),
                };
                cmd
            })
            .await?;
        parse_read(reply).ok_or_else(|| {
            BrokerError::Redis(RedisError::from((
                redis::ErrorKind::Parse,
                "unexpected reply from pubgate_read",
            )))
        })
    }
}

fn parse_read(reply: Vec<Vec<u8>>) -> Option<Snapshot> {
    let mut it = reply.into_iter();
    let epoch = String::from_utf8(it.next()?).ok()?;
    let number = |b: Vec<u8>| std::str::from_utf8(&b).ok()?.parse::<u64>().ok();
    let offset = number(it.next()?)?;
    let mut messages = Vec::with_capacity(it.len() / 2);
    while let Some(o) = it.next() {
        messages.push((number(o)?, Bytes::from(it.next()?)));
    }
    Some(Snapshot {
        epoch,
        offset,
        messages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_escaped_for_lua() {
        assert_eq!(lua_escape("pubgate:"), "pubgate\\058");
        assert_eq!(lua_escape("a'\\"), "a\\039\\092");
    }
}
