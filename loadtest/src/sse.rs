//! Counting a server-sent-event stream as it arrives, without keeping it:
//! events, bytes, keep-alive comments and each event's `kind` (the tag of
//! the orchestrator's `Change`). Pure: bytes in, counts out; the reading
//! loop is in `scenario::console`.
//!
//! Lines end with LF, CRLF or CR (the SSE grammar allows all three), also
//! when a chunk boundary falls between the CR and the LF. An event is its
//! `data:` lines, dispatched by an empty line; an event without data is no
//! event (as in a browser's `EventSource`).

use std::collections::BTreeMap;

/// What a stream has delivered so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Events dispatched (one per `Change`).
    pub events: u64,
    /// Bytes of the response body, keep-alives included.
    pub bytes: u64,
    /// Comment lines (`:` first), i.e. the server's keep-alives.
    pub comments: u64,
    /// Events per `kind`; `?` for data without a readable kind.
    pub by_kind: BTreeMap<String, u64>,
}

impl Tally {
    /// `lagged` events: changes the server dropped for this subscriber.
    pub fn lagged(&self) -> u64 {
        self.by_kind.get("lagged").copied().unwrap_or(0)
    }

    /// What arrived between `earlier` and `self` (a later reading of the
    /// same stream).
    pub fn since(&self, earlier: &Tally) -> Tally {
        let mut by_kind = BTreeMap::new();
        for (k, v) in &self.by_kind {
            let d = v.saturating_sub(earlier.by_kind.get(k).copied().unwrap_or(0));
            if d > 0 {
                by_kind.insert(k.clone(), d);
            }
        }
        Tally {
            events: self.events.saturating_sub(earlier.events),
            bytes: self.bytes.saturating_sub(earlier.bytes),
            comments: self.comments.saturating_sub(earlier.comments),
            by_kind,
        }
    }
}

/// Splits a byte stream into SSE lines and counts what they make.
#[derive(Debug, Default)]
pub struct SseCounter {
    tally: Tally,
    /// The line being read (without its end).
    line: Vec<u8>,
    /// The last line ended with CR: an LF right after it belongs to it.
    after_cr: bool,
    /// The current event's data so far (its `data:` lines, LF-joined).
    data: Option<Vec<u8>>,
}

impl SseCounter {
    pub fn new() -> SseCounter {
        SseCounter::default()
    }

    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// Takes the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.tally.bytes += chunk.len() as u64;
        for &b in chunk {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    self.end_line(&line);
                }
                _ => {
                    self.after_cr = false;
                    self.line.push(b);
                }
            }
        }
    }

    fn end_line(&mut self, line: &[u8]) {
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                self.tally.events += 1;
                let kind = kind_of(&data).unwrap_or("?").to_string();
                *self.tally.by_kind.entry(kind).or_insert(0) += 1;
            }
            return;
        }
        if line[0] == b':' {
            self.tally.comments += 1;
            return;
        }
        let (field, value) = match line.iter().position(|&c| c == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        // `event:`, `id:` and `retry:` change nothing counted here.
        if field == b"data" {
            let d = self.data.get_or_insert_with(Vec::new);
            if !d.is_empty() {
                d.push(b'\n');
            }
            d.extend_from_slice(value);
        }
    }
}

/// The `kind` of a change as the orchestrator serialises it: serde writes
/// an internally tagged enum's tag first, so the first `"kind":"…"` is it.
/// Not a JSON parser: a count per kind is all this is for.
pub fn kind_of(data: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b"\"kind\":\"";
    let start = data.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let len = data[start..].iter().position(|&c| c == b'"')?;
    std::str::from_utf8(&data[start..start + len]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(chunks: &[&[u8]]) -> Tally {
        let mut c = SseCounter::new();
        for ch in chunks {
            c.feed(ch);
        }
        c.tally().clone()
    }

    #[test]
    fn events_are_counted_by_kind_and_keep_alives_apart() {
        let body = b"data: {\"kind\":\"telemetry\",\"device\":\"a\"}\n\n:\n\ndata: {\"kind\":\"device\",\"online\":true}\n\ndata: {\"kind\":\"telemetry\"}\n\n";
        let t = count(&[body]);
        assert_eq!(t.events, 3);
        assert_eq!(t.comments, 1);
        assert_eq!(t.bytes, body.len() as u64);
        assert_eq!(t.by_kind.get("telemetry"), Some(&2));
        assert_eq!(t.by_kind.get("device"), Some(&1));
        assert_eq!(t.lagged(), 0);
    }

    #[test]
    fn any_chunking_gives_the_same_counts() {
        let body: &[u8] = b"data: {\"kind\":\"lagged\",\"missed\":3}\r\n\r\nevent: x\r\nid: 7\r\ndata: {\"kind\":\r\ndata: \"state\"}\r\n\r\n: keep-alive\r\rdata:{\"kind\":\"app\"}\r\r";
        let whole = count(&[body]);
        for split in 1..body.len() {
            let (a, b) = body.split_at(split);
            assert_eq!(count(&[a, b]), whole, "split at {split}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(count(&bytes), whole);
        // Multi-line data is joined with LF, so its kind is not found: "?".
        assert_eq!(whole.events, 3);
        assert_eq!(whole.lagged(), 1);
        assert_eq!(whole.by_kind.get("?"), Some(&1));
        assert_eq!(whole.by_kind.get("app"), Some(&1));
        assert_eq!(whole.comments, 1);
    }

    #[test]
    fn an_event_needs_data_and_its_end() {
        let t = count(&[b"event: ping\nid: 1\n\n\n\ndata: {\"kind\":\"app\"}\n"]);
        assert_eq!(t.events, 0, "no data, and the last event is not ended yet");
        let mut c = SseCounter::new();
        c.feed(b"data: {\"kind\":\"app\"}\n");
        c.feed(b"\n");
        assert_eq!(c.tally().events, 1);
        // A field without a colon is a field with an empty value.
        c.feed(b"data\n\n");
        assert_eq!(c.tally().by_kind.get("?"), Some(&1));
    }

    #[test]
    fn kinds_are_read_from_the_tag() {
        assert_eq!(
            kind_of(br#"{"kind":"rollout","rollout":{"kind":"x"}}"#),
            Some("rollout")
        );
        assert_eq!(kind_of(br#"{"device":"a"}"#), None);
        assert_eq!(kind_of(br#"{"kind":"unterminated"#), None);
    }

    #[test]
    fn a_window_is_the_difference_of_two_readings() {
        let mut c = SseCounter::new();
        c.feed(b"data: {\"kind\":\"telemetry\"}\n\n:\n");
        let t0 = c.tally().clone();
        c.feed(b"data: {\"kind\":\"telemetry\"}\n\ndata: {\"kind\":\"lagged\"}\n\n");
        let w = c.tally().since(&t0);
        assert_eq!((w.events, w.comments, w.lagged()), (2, 0, 1));
        assert_eq!(w.by_kind.get("telemetry"), Some(&1));
        assert_eq!(w.bytes, c.tally().bytes - t0.bytes);
    }
}
