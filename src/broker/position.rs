//! A message's place in its channel's history, as it travels between nodes: the header a
//! positioned payload carries on the broker, its encoder and its parser.
//!
//! It lives in the broker seam, which the history builds on: the brokers parse it, the history
//! writes it (the Redis function writes the same bytes as [`encode_positioned`]).

/// Where a delivered message sits in its channel's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position<'a> {
    /// 1, 2, 3 ... within the epoch.
    pub offset: u64,
    /// The channel's epoch when the message was published.
    pub epoch: &'a str,
}

/// First byte of a positioned payload on the broker: ASCII RS (record separator), which no JSON
/// text may start with (JSON allows only space, tab, CR and LF before a value).
pub const POSITION_MARK: u8 = 0x1E;

/// `RS <offset> ":" <epoch> LF <payload>`: the positioned message as the Redis function
/// publishes it (the memory history never encodes one). Kept here beside its parser.
pub fn encode_positioned(offset: u64, epoch: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + epoch.len() + 24);
    out.push(POSITION_MARK);
    out.extend_from_slice(offset.to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(epoch.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload);
    out
}

/// Splits a broker payload into its position and the raw payload, without allocating. A payload
/// that does not start with a well-formed header is raw (v1: no offset) and returned whole.
pub fn parse_positioned(payload: &[u8]) -> (Option<Position<'_>>, &[u8]) {
    let raw = (None, payload);
    if payload.first() != Some(&POSITION_MARK) {
        return raw;
    }
    // Header: at most 20 digits, ':', an epoch of at most 64 bytes, '\n'.
    let head = &payload[1..payload.len().min(1 + 20 + 1 + 64 + 1)];
    let Some(nl) = head.iter().position(|&b| b == b'\n') else {
        return raw;
    };
    let Some(colon) = head[..nl].iter().position(|&b| b == b':') else {
        return raw;
    };
    let digits = &head[..colon];
    let epoch = &head[colon + 1..nl];
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return raw;
    }
    let (Ok(offset), Ok(epoch)) = (
        std::str::from_utf8(digits).unwrap_or("").parse::<u64>(),
        std::str::from_utf8(epoch),
    ) else {
        return raw;
    };
    if offset == 0 || epoch.is_empty() {
        return raw;
    }
    (Some(Position { offset, epoch }), &payload[1 + nl + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positioned_payloads_round_trip() {
        let encoded = encode_positioned(18, "1733300000123456", br#"{"x":1}"#);
        assert_eq!(&encoded[..], b"\x1e18:1733300000123456\n{\"x\":1}");
        let (pos, payload) = parse_positioned(&encoded);
        assert_eq!(
            pos,
            Some(Position {
                offset: 18,
                epoch: "1733300000123456"
            })
        );
        assert_eq!(payload, br#"{"x":1}"#);
        // The payload may itself contain newlines and colons.
        let encoded = encode_positioned(1, "e", b"a:b\nc");
        assert_eq!(parse_positioned(&encoded).1, b"a:b\nc");
    }

    #[test]
    fn anything_else_is_a_raw_payload() {
        for raw in [
            &b""[..],
            b"{\"x\":1}",
            b"hello",
            b"\x1e",
            b"\x1e12",
            b"\x1e12:e",
            b"\x1e:e\n{}",
            b"\x1e0:e\n{}",
            b"\x1e12:\n{}",
            b"\x1ex2:e\n{}",
            b"\x1e99999999999999999999999:e\n{}",
        ] {
            assert_eq!(parse_positioned(raw), (None, raw), "{raw:?}");
        }
    }
}
