//! Channel permissions from a token's `subscribe` and `publish` claims.
//!
//! Pure data and matching, no I/O: the commands ask [`Permissions`] before they touch the hub or
//! the broker. Patterns follow the contract: an exact name, a prefix followed by a final `*`
//! (`chat:*` matches `chat:` and `chat:1`, not `chat`), or a lone `*` for every name; a `*`
//! anywhere else is a literal character (which no valid channel name contains).

/// One channel pattern of a `subscribe` or `publish` claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// `*`: every channel.
    Any,
    /// `prefix*`: every channel starting with `prefix` (the prefix itself included).
    Prefix(String),
    /// A plain name.
    Exact(String),
}

impl Pattern {
    /// Reads one pattern as written in a claim.
    pub fn parse(text: &str) -> Pattern {
        if text == "*" {
            Pattern::Any
        } else if let Some(prefix) = text.strip_suffix('*') {
            Pattern::Prefix(prefix.to_owned())
        } else {
            Pattern::Exact(text.to_owned())
        }
    }

    /// Whether `channel` is covered by this pattern.
    pub fn matches(&self, channel: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Prefix(prefix) => channel.starts_with(prefix.as_str()),
            Pattern::Exact(name) => name == channel,
        }
    }
}

/// What one connection may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permissions {
    /// Anonymous mode (no key configured): every channel is open to everyone.
    Open,
    /// What a verified token grants.
    Granted {
        subscribe: Vec<Pattern>,
        publish: Vec<Pattern>,
        /// The user's own channel `user:<sub>`: always subscribable, presence included.
        own_channel: String,
    },
}

impl Permissions {
    /// Permissions of user `sub` from the pattern lists of its token (absent claim = empty list).
    pub fn granted(sub: &str, subscribe: &[String], publish: &[String]) -> Permissions {
        Permissions::Granted {
            subscribe: subscribe.iter().map(|p| Pattern::parse(p)).collect(),
            publish: publish.iter().map(|p| Pattern::parse(p)).collect(),
            own_channel: format!("user:{sub}"),
        }
    }

    /// Whether the connection may subscribe to `channel` (and query its presence).
    pub fn can_subscribe(&self, channel: &str) -> bool {
        match self {
            Permissions::Open => true,
            Permissions::Granted {
                subscribe,
                own_channel,
                ..
            } => own_channel == channel || subscribe.iter().any(|p| p.matches(channel)),
        }
    }

    /// Whether the connection may publish to `channel` (its own channel needs a pattern too).
    pub fn can_publish(&self, channel: &str) -> bool {
        match self {
            Permissions::Open => true,
            Permissions::Granted { publish, .. } => publish.iter().any(|p| p.matches(channel)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn patterns_follow_the_contract() {
        let p = Pattern::parse("chat:*");
        assert!(p.matches("chat:"));
        assert!(p.matches("chat:1"));
        assert!(p.matches("chat:1:2"));
        assert!(!p.matches("chat"));
        assert!(!p.matches("chatroom"));
        assert!(!p.matches("xchat:1"));
        assert!(Pattern::parse("*").matches("anything/at:all"));
        let exact = Pattern::parse("news");
        assert!(exact.matches("news"));
        assert!(!exact.matches("news2"));
        assert!(!exact.matches("new"));
        // `*` elsewhere is a literal, so it only matches a name containing `*` (none is valid).
        assert_eq!(Pattern::parse("a*b"), Pattern::Exact("a*b".into()));
        assert!(!Pattern::parse("a*b").matches("ab"));
        assert!(!Pattern::parse("*a").matches("ba"));
        assert_eq!(Pattern::parse("a**"), Pattern::Prefix("a*".into()));
        assert!(!Pattern::parse("a**").matches("ab"));
        // The empty prefix (`*` alone is Any; a lone empty string is exact-empty, matching nothing).
        assert!(!Pattern::parse("").matches("news"));
    }

    #[test]
    fn own_channel_is_subscribable_but_not_publishable() {
        let perms = Permissions::granted("alice", &[], &[]);
        assert!(perms.can_subscribe("user:alice"));
        assert!(!perms.can_subscribe("user:bob"));
        assert!(!perms.can_subscribe("user:alice2"));
        assert!(!perms.can_publish("user:alice"));
        let perms = Permissions::granted("alice", &[], &strings(&["user:alice"]));
        assert!(perms.can_publish("user:alice"));
    }

    #[test]
    fn granted_lists_are_separate() {
        let perms = Permissions::granted("u", &strings(&["news", "chat:*"]), &strings(&["chat:1"]));
        assert!(perms.can_subscribe("news"));
        assert!(perms.can_subscribe("chat:7"));
        assert!(!perms.can_subscribe("sports"));
        assert!(perms.can_publish("chat:1"));
        assert!(!perms.can_publish("chat:2"));
        assert!(!perms.can_publish("news"));
        assert!(Permissions::Open.can_subscribe("x"));
        assert!(Permissions::Open.can_publish("x"));
    }
}
