//! MQTT topic filter arithmetic, for the broker's authorization rules.
//! Pure functions over `/`-separated levels; `+` matches one level, `#`
//! (last level only) matches any number of remaining levels, including
//! none.

/// Whether `filter` is syntactically valid: `#` only as the whole last
/// level, `+` only as a whole level, no NUL, not empty.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Whether a concrete topic name (no wildcards) matches `filter`.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.contains(['+', '#']) {
        return false;
    }
    covers(filter, topic)
}

/// Whether every topic that `inner` matches is also matched by `outer`:
/// a subscription to `inner` can never deliver anything `outer` would not.
pub fn covers(outer: &str, inner: &str) -> bool {
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some(_), None) | (None, Some(_)) => return false,
            (Some("+"), Some(l)) => {
                if l == "#" {
                    return false;
                }
            }
            (Some(a), Some(b)) => {
                if a != b {
                    return false;
                }
            }
        }
    }
}

/// Whether some topic name exists that both filters match.
pub fn intersects(a: &str, b: &str) -> bool {
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some(_), None) | (None, Some(_)) => return false,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) => {
                if p != q {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity() {
        for f in ["a", "a/b", "+", "#", "a/+/c", "a/#", "+/+/#"] {
            assert!(valid_filter(f), "{f}");
        }
        for f in ["", "a/#/b", "a#", "a/b+", "#/a", "a\0"] {
            assert!(!valid_filter(f), "{f:?}");
        }
    }

    #[test]
    fn matching() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(!matches("a/+/c", "a/b/d"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(!matches("a/b", "a/+"), "a wildcard is not a topic name");
    }

    #[test]
    fn coverage() {
        assert!(covers("a/#", "a/+/c"));
        assert!(covers("a/+/c", "a/x/c"));
        assert!(covers("#", "anything/#"));
        assert!(!covers("a/+/c", "a/#"));
        assert!(!covers("a/+/c", "a/+/+"));
        assert!(!covers("a/+", "a/+/c"));
        assert!(!covers("a/b/c", "a/+/c"));
        assert!(!covers("a/+", "a/#"), "'+' cannot stand for any depth");
    }

    #[test]
    fn intersection() {
        assert!(intersects("drover/#", "drover/v1/dev/+/cmd"));
        assert!(intersects("#", "x/y"));
        assert!(intersects("drover/v1/dev/a/+", "drover/v1/dev/+/cmd"));
        assert!(!intersects(
            "drover/v1/dev/+/telemetry",
            "drover/v1/dev/+/cmd"
        ));
        assert!(!intersects("a/b", "a/b/c"));
        assert!(intersects("a/b/#", "a/b"), "'#' also matches the parent");
    }
}
