//! Cluster-wide presence in Redis, with expiry so a crashed node's members vanish.
//!
//! Per channel, a HASH maps conn_id to the member's JSON and a ZSET maps conn_id to its expiry
//! time (Redis's clock). Nodes refresh their own members every third of the TTL in one pipelined
//! round trip; a query is one script call that first drops expired members. Both keys also carry
//! a key TTL so abandoned channels disappear from Redis entirely.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::redis::{self, Script};

use super::{Member, Presence};
use crate::error::BrokerError;
use crate::redis_commands::RedisCommands;

/// Presence stored in Redis, shared by every node using the same prefix.
pub struct RedisPresence {
    commands: Arc<RedisCommands>,
    prefix: String,
    ttl_ms: u64,
    add: Script,
    refresh: Script,
    list: Script,
}

impl RedisPresence {
    pub fn new(commands: Arc<RedisCommands>, prefix: String, ttl: Duration) -> Self {
        RedisPresence {
            commands,
            prefix,
            ttl_ms: ttl.as_millis().max(1) as u64,
            add: Script::new(include_str!("add.lua")),
            refresh: Script::new(include_str!("refresh.lua")),
            list: Script::new(include_str!("list.lua")),
        }
    }

    /// Both keys carry the channel's Redis name as hash tag, so they share its slot and a script
    /// touching both runs on one Redis Cluster node.
    fn keys(&self, channel: &str) -> [String; 2] {
        let p = &self.prefix;
        [
            format!("{p}__presence:{{{p}{channel}}}"),
            format!("{p}__presence_exp:{{{p}{channel}}}"),
        ]
    }

    /// Runs one script per channel in a single pipelined round trip. EVALSHA fails with NOSCRIPT
    /// after a Redis restart; then the script is loaded and the batch sent once more.
    async fn per_channel<'m>(
        &self,
        script: &Script,
        groups: HashMap<&'m str, Vec<&'m Member>>,
        with_json: bool,
    ) -> Result<(), BrokerError> {
        if groups.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (channel, members) in &groups {
            let [hash, zset] = self.keys(channel);
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(script.get_hash())
                .arg(2)
                .arg(hash)
                .arg(zset)
                .arg(self.ttl_ms);
            for m in members {
                cmd.arg(&m.conn_id);
                if with_json {
                    cmd.arg(member_json(m));
                }
            }
            cmd.ignore();
        }
        let result = self
            .commands
            .run(|mut c| {
                let pipe = pipe.clone();
                async move { pipe.query_async::<()>(&mut c).await }
            })
            .await;
        match result {
            Err(BrokerError::Redis(e)) if e.code() == Some("NOSCRIPT") => {
                let source = script_source(script);
                self.commands
                    .run(|mut c| async move {
                        redis::cmd("SCRIPT")
                            .arg("LOAD")
                            .arg(source)
                            .query_async::<String>(&mut c)
                            .await
                    })
                    .await?;
                self.commands
                    .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
                    .await
            }
            other => other,
        }
    }
}

fn script_source(script: &Script) -> &'static str {
    // Script keeps no public accessor to its code; map back by hash.
    for source in [
        include_str!("add.lua"),
        include_str!("refresh.lua"),
        include_str!("list.lua"),
    ] {
        if Script::new(source).get_hash() == script.get_hash() {
            return source;
        }
    }
    unreachable!("only this module's scripts are run")
}

fn member_json(m: &Member) -> String {
    // A struct of strings always serialises.
    serde_json::to_string(m).unwrap_or_default()
}

fn group(members: &[(String, Member)]) -> HashMap<&str, Vec<&Member>> {
    let mut groups: HashMap<&str, Vec<&Member>> = HashMap::new();
    for (channel, member) in members {
        groups.entry(channel).or_default().push(member);
    }
    groups
}

#[async_trait]
impl Presence for RedisPresence {
    async fn add(&self, channel: &str, member: &Member) -> Result<(), BrokerError> {
        let [hash, zset] = self.keys(channel);
        let json = member_json(member);
        self.commands
            .run(|mut c| async move {
                self.add
                    .key(hash)
                    .key(zset)
                    .arg(self.ttl_ms)
                    .arg(&member.conn_id)
                    .arg(json)
                    .invoke_async::<()>(&mut c)
                    .await
            })
            .await
    }

    async fn remove(&self, channel: &str, conn_id: &str) -> Result<(), BrokerError> {
        self.remove_all(conn_id, &[channel.to_owned()]).await
    }

    async fn remove_all(&self, conn_id: &str, channels: &[String]) -> Result<(), BrokerError> {
        if channels.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for channel in channels {
            let [hash, zset] = self.keys(channel);
            pipe.hdel(hash, conn_id).ignore();
            pipe.zrem(zset, conn_id).ignore();
        }
        self.commands
            .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    async fn list(&self, channel: &str) -> Result<Vec<Member>, BrokerError> {
        let [hash, zset] = self.keys(channel);
        let raw: Vec<String> = self
            .commands
            .run(|mut c| async move { self.list.key(hash).key(zset).invoke_async(&mut c).await })
            .await?;
        Ok(raw
            .iter()
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect())
    }

    async fn refresh(&self, members: &[(String, Member)]) -> Result<(), BrokerError> {
        self.per_channel(&self.refresh, group(members), false).await
    }

    async fn restore(&self, members: &[(String, Member)]) -> Result<(), BrokerError> {
        self.per_channel(&self.add, group(members), true).await
    }
}
