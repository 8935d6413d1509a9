//! Which shard of a sharded map a key belongs to (the hub's channels, the users index, the
//! node's channel locks, the memory history).

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

/// The shard index of `key` among `shards`.
pub fn index(key: &str, shards: usize) -> usize {
    (BuildHasherDefault::<DefaultHasher>::default().hash_one(key) as usize) % shards
}
