//! Cluster-wide presence in Redis, whose steady-state cost is per node, not per member.
//!
//! Keys (every per-channel key carries the hash tag of the channel's Redis name, so a script on
//! it touches one slot; the node keys share the tag of the nodes set):
//! - `<prefix>__presence:{<prefix><channel>}`: hash conn_id -> member JSON (which names the node);
//! - `<prefix>__nodes`: sorted set node id -> heartbeat expiry (ms, Redis clock);
//! - `<prefix>__node_channels:{<prefix>__nodes}<node>`: set of the channels a node has members in;
//! - `<prefix>__reap:{<prefix>__nodes}<node>`: the short lock of whoever reaps that node.
//!
//! A member is written once when it joins and deleted when it leaves; nothing is refreshed per
//! member. Each node beats every tenth of the TTL, pushing its expiry two thirds of the TTL
//! ahead; a survivor that sees an expired node takes its lock and removes the node's members
//! channel by channel (from the index), publishing their leaves. So a crashed node's members
//! are gone within about 0.77 TTL (2/3 + 1/10), and a live node survives a stall of 0.57 TTL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::redis::{self, Pipeline, Script};

use super::{Heartbeat, Listing, Member, Presence, EVENTS_PREFIX};
use crate::error::BrokerError;
use crate::redis_commands::RedisCommands;

/// Script invocations sent in one pipeline at most (bounds a single round trip's size).
const BATCH: usize = 256;

/// Presence stored in Redis, shared by every node using the same prefix.
pub struct RedisPresence {
    commands: Arc<RedisCommands>,
    prefix: String,
    node_id: String,
    /// How far ahead each heartbeat pushes this node's expiry.
    beat_ttl_ms: u64,
    /// How long a reaper may hold a dead node's lock.
    lock_ms: u64,
    scripts: Scripts,
    /// Script sources as loaded: in cluster mode they SPUBLISH their events (sharded pub/sub).
    sources: Vec<String>,
    /// Redis Cluster: events go to the sharded name of the events channel.
    cluster: bool,
}

struct Scripts {
    add: Script,
    remove: Script,
    list: Script,
    heartbeat: Script,
    claim: Script,
    reap: Script,
    finish: Script,
}

const SOURCES: [&str; 7] = [
    include_str!("add.lua"),
    include_str!("remove.lua"),
    include_str!("list.lua"),
    include_str!("heartbeat.lua"),
    include_str!("claim.lua"),
    include_str!("reap.lua"),
    include_str!("finish.lua"),
];

impl RedisPresence {
    /// `ttl` is `PUBGATE_PRESENCE_TTL`: a crashed node's members are gone within it.
    pub fn new(
        commands: Arc<RedisCommands>,
        prefix: String,
        ttl: Duration,
        node_id: String,
    ) -> Self {
        let ttl_ms = ttl.as_millis().max(3) as u64;
        let cluster = commands.is_cluster();
        // In a cluster the events are published with SPUBLISH on a shard channel in the slot of
        // the channel's presence key (see `redis_client::slots::sharded_name`), the only channel a
        // script may publish to there.
        let sources: Vec<String> = SOURCES
            .iter()
            .map(|s| {
                if cluster {
                    s.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
                } else {
                    (*s).to_owned()
                }
            })
            .collect();
        RedisPresence {
            commands,
            prefix,
            node_id,
            beat_ttl_ms: ttl_ms * 2 / 3,
            lock_ms: ttl_ms.max(5000),
            scripts: Scripts {
                add: Script::new(&sources[0]),
                remove: Script::new(&sources[1]),
                list: Script::new(&sources[2]),
                heartbeat: Script::new(&sources[3]),
                claim: Script::new(&sources[4]),
                reap: Script::new(&sources[5]),
                finish: Script::new(&sources[6]),
            },
            sources,
            cluster,
        }
    }

    /// How often [`Presence::heartbeat`] should run for a given TTL.
    pub fn beat_interval(ttl: Duration) -> Duration {
        ttl / 10
    }

    fn members_key(&self, channel: &str) -> String {
        format!("{p}__presence:{{{p}{channel}}}", p = self.prefix)
    }

    fn events_key(&self, channel: &str) -> String {
        if self.cluster {
            crate::redis_client::slots::sharded_name(
                &self.prefix,
                &format!("{EVENTS_PREFIX}{channel}"),
            )
        } else {
            format!("{}{EVENTS_PREFIX}{channel}", self.prefix)
        }
    }

    fn nodes_key(&self) -> String {
        format!("{}__nodes", self.prefix)
    }

    fn index_key(&self, node: &str) -> String {
        format!("{p}__node_channels:{{{p}__nodes}}{node}", p = self.prefix)
    }

    fn lock_key(&self, node: &str) -> String {
        format!("{p}__reap:{{{p}__nodes}}{node}", p = self.prefix)
    }

    /// Appends one per-channel script call (`add`, `remove` or `reap`) to `pipe`.
    fn channel_call<'a>(
        &self,
        pipe: &'a mut Pipeline,
        script: &Script,
        channel: &str,
    ) -> &'a mut Pipeline {
        pipe.cmd("EVALSHA")
            .arg(script.get_hash())
            .arg(1)
            .arg(self.members_key(channel))
            .arg(self.events_key(channel))
            .arg(json_string(channel))
    }

    /// Runs a pipeline whose replies are counts and returns their sum. EVALSHA fails with
    /// NOSCRIPT after a Redis restart; then the scripts are loaded and the pipeline sent again
    /// (the failing call changed nothing: NOSCRIPT is raised before a script runs).
    async fn run_counts(&self, pipe: Pipeline) -> Result<usize, BrokerError> {
        let result = self.query::<Vec<redis::Value>>(&pipe).await;
        let replies = match result {
            Err(BrokerError::Redis(e)) if e.code() == Some("NOSCRIPT") => {
                self.load_scripts().await?;
                self.query::<Vec<redis::Value>>(&pipe).await?
            }
            other => other?,
        };
        Ok(replies
            .iter()
            .map(|v| match v {
                redis::Value::Int(n) => *n as usize,
                _ => 0,
            })
            .sum())
    }

    async fn query<T: redis::FromRedisValue + Send + 'static>(
        &self,
        pipe: &Pipeline,
    ) -> Result<T, BrokerError> {
        let pipe = pipe.clone();
        self.commands
            .run(|mut c| async move { pipe.query_async::<T>(&mut c).await })
            .await
    }

    async fn load_scripts(&self) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        for source in &self.sources {
            pipe.cmd("SCRIPT").arg("LOAD").arg(source).ignore();
        }
        self.query::<()>(&pipe).await
    }

    /// Runs `script` once per channel group, pipelined in batches; returns the summed counts.
    /// `args` writes one group's trailing arguments.
    async fn per_channel<T>(
        &self,
        script: &Script,
        groups: &HashMap<&str, Vec<&T>>,
        args: impl Fn(&mut Pipeline, &T),
    ) -> Result<usize, BrokerError>
    where
        T: ?Sized,
    {
        let mut total = 0;
        let mut pipe = redis::pipe();
        let mut queued = 0;
        for (channel, items) in groups {
            let cmd = self.channel_call(&mut pipe, script, channel);
            for item in items {
                args(cmd, item);
            }
            queued += 1;
            if queued == BATCH {
                total += self
                    .run_counts(std::mem::replace(&mut pipe, redis::pipe()))
                    .await?;
                queued = 0;
            }
        }
        if queued > 0 {
            total += self.run_counts(pipe).await?;
        }
        Ok(total)
    }

    /// Adds members grouped by channel and indexes the channels under their nodes.
    async fn add_many(&self, members: &[(String, Member)]) -> Result<usize, BrokerError> {
        if members.is_empty() {
            return Ok(0);
        }
        let mut index: HashMap<&str, Vec<&str>> = HashMap::new();
        for (channel, member) in members {
            let channels = index.entry(&member.node).or_default();
            if !channels.contains(&channel.as_str()) {
                channels.push(channel);
            }
        }
        // Indexed first: a member is never stored where a reaper could not find it.
        let mut pipe = redis::pipe();
        for (node, channels) in &index {
            for chunk in channels.chunks(BATCH) {
                pipe.sadd(self.index_key(node), chunk).ignore();
            }
        }
        self.query::<()>(&pipe).await?;
        let jsons: Vec<String> = members.iter().map(|(_, m)| m.to_json()).collect();
        let mut pairs: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
        for ((channel, member), json) in members.iter().zip(&jsons) {
            pairs
                .entry(channel)
                .or_default()
                .push((&member.conn_id, json));
        }
        let groups: HashMap<&str, Vec<&(&str, &str)>> = pairs
            .iter()
            .map(|(c, v)| (*c, v.iter().collect()))
            .collect();
        self.per_channel(&self.scripts.add, &groups, |cmd, (conn_id, json)| {
            cmd.arg(*conn_id).arg(*json);
        })
        .await
    }

    async fn remove_iter<'a>(
        &self,
        pairs: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> Result<usize, BrokerError> {
        let mut groups: HashMap<&str, Vec<&str>> = HashMap::new();
        for (channel, conn_id) in pairs {
            groups.entry(channel).or_default().push(conn_id);
        }
        if groups.is_empty() {
            return Ok(0);
        }
        self.per_channel(&self.scripts.remove, &groups, |cmd, conn_id| {
            cmd.arg(conn_id);
        })
        .await
    }
}

/// A channel name or node id as a JSON string (channel names never need escaping; node ids
/// might).
fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

#[async_trait]
impl Presence for RedisPresence {
    async fn add(&self, channel: &str, member: &Member) -> Result<bool, BrokerError> {
        let joins = self
            .add_many(&[(channel.to_owned(), member.clone())])
            .await?;
        Ok(joins > 0)
    }

    async fn remove_pairs(&self, pairs: &[(&str, &str)]) -> Result<usize, BrokerError> {
        self.remove_iter(pairs.iter().copied()).await
    }

    async fn list(&self, channel: &str, max: usize) -> Result<Listing, BrokerError> {
        let key = self.members_key(channel);
        let (count, raw): (usize, Vec<String>) = self
            .commands
            .run(|mut c| async move {
                self.scripts
                    .list
                    .key(key)
                    .arg(max)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(Listing {
            count,
            members: raw
                .iter()
                .filter_map(|json| serde_json::from_str(json).ok())
                .collect(),
        })
    }

    async fn restore(&self, members: &[(String, Member)]) -> Result<usize, BrokerError> {
        self.add_many(members).await
    }

    async fn unindex(&self, channel: &str) -> Result<(), BrokerError> {
        let key = self.index_key(&self.node_id);
        self.commands
            .run(|mut c| async move {
                redis::cmd("SREM")
                    .arg(key)
                    .arg(channel)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
    }

    async fn heartbeat(&self) -> Result<Heartbeat, BrokerError> {
        let (nodes, lock) = (self.nodes_key(), self.lock_key(&self.node_id));
        let (lost, being_reaped, dead): (u8, u8, Vec<String>) = self
            .commands
            .run(|mut c| async move {
                self.scripts
                    .heartbeat
                    .key(nodes)
                    .key(lock)
                    .arg(&self.node_id)
                    .arg(self.beat_ttl_ms)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(Heartbeat {
            lost: lost == 1,
            being_reaped: being_reaped == 1,
            dead: dead.into_iter().filter(|n| *n != self.node_id).collect(),
        })
    }

    async fn reap(&self, node: &str) -> Result<usize, BrokerError> {
        let token = format!("{}:{:x}", self.node_id, rand::random::<u64>());
        let token = token.as_str();
        let (nodes, lock, index) = (self.nodes_key(), self.lock_key(node), self.index_key(node));
        let claimed: u8 = {
            let (nodes, lock) = (nodes.clone(), lock.clone());
            self.commands
                .run(|mut c| async move {
                    self.scripts
                        .claim
                        .key(nodes)
                        .key(lock)
                        .arg(node)
                        .arg(token)
                        .arg(self.lock_ms)
                        .invoke_async(&mut c)
                        .await
                })
                .await?
        };
        if claimed == 0 {
            return Ok(0);
        }
        let want = format!("{},\"user\":", json_string(node));
        let mut leaves = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.lock_ms * 4 / 5);
        loop {
            let channels: Vec<String> = {
                let index = index.clone();
                self.commands
                    .run(|mut c| async move {
                        redis::cmd("SRANDMEMBER")
                            .arg(index)
                            .arg(BATCH)
                            .query_async(&mut c)
                            .await
                    })
                    .await?
            };
            if channels.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            let groups: HashMap<&str, Vec<&str>> = channels
                .iter()
                .map(|c| (c.as_str(), vec![want.as_str()]))
                .collect();
            leaves += self
                .per_channel(&self.scripts.reap, &groups, |cmd, want| {
                    cmd.arg(want);
                })
                .await?;
            let mut pipe = redis::pipe();
            pipe.srem(&index, &channels).ignore();
            self.query::<()>(&pipe).await?;
        }
        self.commands
            .run(|mut c| async move {
                self.scripts
                    .finish
                    .key(nodes)
                    .key(lock)
                    .key(index)
                    .arg(node)
                    .arg(token)
                    .invoke_async::<()>(&mut c)
                    .await
            })
            .await?;
        tracing::info!(node, leaves, "reaped the members of a dead node");
        Ok(leaves)
    }
}
