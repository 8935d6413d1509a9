//! The embedded broker for a single node: a publish is handed straight to the hub.
//!
//! There is no other node to reach, so subscribing a channel only records it, and a publish is
//! delivered synchronously in the publisher's task. That keeps one publisher's messages in order
//! and makes `published` mean "queued to every local subscriber".

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use super::{Broker, MessageSink};
use crate::error::BrokerError;

/// In-process broker; one node only (use Redis to scale out).
pub struct MemoryBroker {
    sink: Arc<dyn MessageSink>,
    /// Channels this node is subscribed to; publishes to others are not delivered, as on Redis.
    channels: Mutex<HashSet<String>>,
}

impl MemoryBroker {
    pub fn new(sink: Arc<dyn MessageSink>) -> Self {
        MemoryBroker {
            sink,
            channels: Mutex::default(),
        }
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.channels().insert(channel.to_owned());
        Ok(())
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.channels().remove(channel);
        Ok(())
    }

    async fn publish(&self, channel: &str, payload: Bytes) -> Result<(), BrokerError> {
        if self.channels().contains(channel) {
            self.sink.deliver(channel, &payload, None);
        }
        Ok(())
    }

    fn is_up(&self) -> bool {
        true
    }
}
