//! Label selectors in the Kubernetes syntax, and the label keys and values
//! they name.
//!
//! ```text
//! selector    := "" | requirement ("," requirement)*
//! requirement := "!" KEY | KEY | KEY ("=" | "==" | "!=") VALUE
//!              | KEY ("in" | "notin") "(" VALUE ("," VALUE)* ")"
//! ```
//!
//! Commas mean AND; whitespace around every token is ignored. An empty
//! selector matches every device. Keys are `[prefix/]name`: the prefix a
//! DNS subdomain of at most 253 characters, the name at most 63 characters
//! of `[A-Za-z0-9._-]` beginning and ending alphanumeric. Values are empty
//! or like a name. As in Kubernetes, `k!=v` and `k notin (…)` also match a
//! device without the key.
//!
//! Hand-written: the Rust crates that parse this syntax either come with
//! the whole kube client tree or cover only `k=v`; this is a small
//! recursive-descent parser, pure, with errors that point at the term.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Longest selector accepted, in bytes.
pub const MAX_SELECTOR_LEN: usize = 4_096;
/// Most requirements in one selector.
pub const MAX_REQUIREMENTS: usize = 64;
/// Most values in one `in`/`notin` set.
pub const MAX_SET_VALUES: usize = 64;
const MAX_NAME: usize = 63;
const MAX_PREFIX: usize = 253;

/// One term of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |vs: &BTreeSet<String>| vs.iter().cloned().collect::<Vec<_>>().join(",");
        match self {
            Requirement::Equals(k, v) => write!(f, "{k}={v}"),
            Requirement::NotEquals(k, v) => write!(f, "{k}!={v}"),
            Requirement::In(k, vs) => write!(f, "{k} in ({})", set(vs)),
            Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", set(vs)),
            Requirement::Exists(k) => write!(f, "{k}"),
            Requirement::DoesNotExist(k) => write!(f, "!{k}"),
        }
    }
}

/// A parsed selector: every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    pub fn parse(input: &str) -> Result<Selector, SelectorError> {
        if input.len() > MAX_SELECTOR_LEN {
            return Err(SelectorError::new(
                MAX_SELECTOR_LEN,
                format!(
                    "the selector is {} bytes long, over the limit of {MAX_SELECTOR_LEN}",
                    input.len()
                ),
            ));
        }
        Parser::new(input).selector()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Matches every device.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// The canonical form: parsing it gives the same selector.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

/// Why a selector was refused, and where: `position` counts characters
/// from 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at character {position}: {message}")]
pub struct SelectorError {
    pub position: usize,
    pub message: String,
}

impl SelectorError {
    fn new(position: usize, message: impl Into<String>) -> Self {
        SelectorError {
            position,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Word(String),
    Eq,
    DoubleEq,
    NotEq,
    Bang,
    Open,
    Close,
    Comma,
    End,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Word(w) => write!(f, "{w:?}"),
            Tok::Eq => f.write_str("\"=\""),
            Tok::DoubleEq => f.write_str("\"==\""),
            Tok::NotEq => f.write_str("\"!=\""),
            Tok::Bang => f.write_str("\"!\""),
            Tok::Open => f.write_str("\"(\""),
            Tok::Close => f.write_str("\")\""),
            Tok::Comma => f.write_str("\",\""),
            Tok::End => f.write_str("the end"),
        }
    }
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
}

impl Parser {
    fn new(input: &str) -> Parser {
        Parser {
            chars: input.chars().collect(),
            pos: 0,
        }
    }

    fn skip_ws(&mut self) {
        while self.chars.get(self.pos).is_some_and(|c| c.is_whitespace()) {
            self.pos += 1;
        }
    }

    /// The next token and where it starts, without consuming it.
    fn peek(&mut self) -> Result<(usize, Tok), SelectorError> {
        self.skip_ws();
        let start = self.pos;
        let save = self.pos;
        let t = self.lex()?;
        self.pos = save;
        Ok((start, t))
    }

    fn next(&mut self) -> Result<(usize, Tok), SelectorError> {
        self.skip_ws();
        let start = self.pos;
        Ok((start, self.lex()?))
    }

    fn lex(&mut self) -> Result<Tok, SelectorError> {
        let Some(&c) = self.chars.get(self.pos) else {
            return Ok(Tok::End);
        };
        let at = self.pos;
        self.pos += 1;
        let next_is_eq = self.chars.get(self.pos) == Some(&'=');
        Ok(match c {
            '=' if next_is_eq => {
                self.pos += 1;
                Tok::DoubleEq
            }
            '=' => Tok::Eq,
            '!' if next_is_eq => {
                self.pos += 1;
                Tok::NotEq
            }
            '!' => Tok::Bang,
            '(' => Tok::Open,
            ')' => Tok::Close,
            ',' => Tok::Comma,
            c if is_word_char(c) => {
                while self.chars.get(self.pos).is_some_and(|&c| is_word_char(c)) {
                    self.pos += 1;
                }
                Tok::Word(self.chars[at..self.pos].iter().collect())
            }
            other => {
                return Err(SelectorError::new(
                    at,
                    format!(
                        "unexpected character {:?}; keys and values are made of letters, digits, '-', '_', '.' and '/'",
                        other
                    ),
                ))
            }
        })
    }

    fn selector(mut self) -> Result<Selector, SelectorError> {
        let mut requirements = Vec::new();
        if self.peek()?.1 == Tok::End {
            return Ok(Selector { requirements });
        }
        loop {
            if requirements.len() == MAX_REQUIREMENTS {
                return Err(SelectorError::new(
                    self.pos,
                    format!("more than {MAX_REQUIREMENTS} requirements"),
                ));
            }
            requirements.push(self.requirement()?);
            match self.next()? {
                (_, Tok::End) => break,
                (_, Tok::Comma) => continue,
                (at, t) => {
                    return Err(SelectorError::new(
                        at,
                        format!("expected \",\" or the end after a requirement, found {t}"),
                    ))
                }
            }
        }
        Ok(Selector { requirements })
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        match self.next()? {
            (at, Tok::Word(w)) => {
                validate_key(&w).map_err(|m| SelectorError::new(at, format!("key {w:?}: {m}")))?;
                Ok(w)
            }
            (at, t) => Err(SelectorError::new(
                at,
                format!("expected a label key, found {t}"),
            )),
        }
    }

    fn value(&mut self) -> Result<String, SelectorError> {
        match self.peek()? {
            (at, Tok::Word(w)) => {
                self.next()?;
                validate_value(&w)
                    .map_err(|m| SelectorError::new(at, format!("value {w:?}: {m}")))?;
                Ok(w)
            }
            // An empty value: `k=` or `k in (a,)`.
            (_, Tok::Comma | Tok::Close | Tok::End) => Ok(String::new()),
            (at, t) => Err(SelectorError::new(
                at,
                format!("expected a label value, found {t}"),
            )),
        }
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        if let (_, Tok::Bang) = self.peek()? {
            self.next()?;
            return Ok(Requirement::DoesNotExist(self.key()?));
        }
        let key = self.key()?;
        match self.peek()? {
            (_, Tok::Comma | Tok::End) => Ok(Requirement::Exists(key)),
            (_, Tok::Eq | Tok::DoubleEq) => {
                self.next()?;
                Ok(Requirement::Equals(key, self.value()?))
            }
            (_, Tok::NotEq) => {
                self.next()?;
                Ok(Requirement::NotEquals(key, self.value()?))
            }
            (_, Tok::Word(w)) if w == "in" || w == "notin" => {
                self.next()?;
                let set = self.set()?;
                Ok(if w == "in" {
                    Requirement::In(key, set)
                } else {
                    Requirement::NotIn(key, set)
                })
            }
            (at, t) => Err(SelectorError::new(
                at,
                format!(
                    "after key {key:?} expected \"=\", \"==\", \"!=\", \"in\", \"notin\", \",\" or the end, found {t}"
                ),
            )),
        }
    }

    fn set(&mut self) -> Result<BTreeSet<String>, SelectorError> {
        match self.next()? {
            (_, Tok::Open) => {}
            (at, t) => {
                return Err(SelectorError::new(
                    at,
                    format!("expected \"(\" to open the set of values, found {t}"),
                ))
            }
        }
        let mut values = BTreeSet::new();
        loop {
            let at = self.pos;
            if values.len() == MAX_SET_VALUES {
                return Err(SelectorError::new(
                    at,
                    format!("more than {MAX_SET_VALUES} values in one set"),
                ));
            }
            values.insert(self.value()?);
            match self.next()? {
                (_, Tok::Comma) => continue,
                (_, Tok::Close) => break,
                (at, Tok::End) => {
                    return Err(SelectorError::new(
                        at,
                        "the set of values is not closed: expected \")\"",
                    ))
                }
                (at, t) => {
                    return Err(SelectorError::new(
                        at,
                        format!("expected \",\" or \")\" in the set of values, found {t}"),
                    ))
                }
            }
        }
        Ok(values)
    }
}

fn validate_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("the name part must not be empty".into());
    }
    if s.len() > MAX_NAME {
        return Err(format!(
            "the name part is {} characters, over {MAX_NAME}",
            s.len()
        ));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err("only letters, digits, '-', '_' and '.' are allowed".into());
    }
    let first = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let last = s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first || !last {
        return Err("must begin and end with a letter or digit".into());
    }
    Ok(())
}

/// A label key: `[prefix/]name`, as Kubernetes has it.
pub fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if p.is_empty() || p.len() > MAX_PREFIX {
            return Err(format!(
                "the prefix before '/' must be a DNS subdomain of 1 to {MAX_PREFIX} characters"
            ));
        }
        for part in p.split('.') {
            let ok = !part.is_empty()
                && part.len() <= 63
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !part.starts_with('-')
                && !part.ends_with('-');
            if !ok {
                return Err(format!(
                    "the prefix {p:?} is not a DNS subdomain (lowercase letters, digits, '-' and '.')"
                ));
            }
        }
    }
    validate_name(name)
}

/// A label value: empty, or like the name part of a key.
pub fn validate_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    validate_name(value)
}

/// Checks a whole set of labels; the error names the offending key.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), (String, String)> {
    for (k, v) in labels {
        validate_key(k).map_err(|m| (k.clone(), format!("label key {k:?}: {m}")))?;
        validate_value(v).map_err(|m| (k.clone(), format!("label {k} value {v:?}: {m}")))?;
    }
    Ok(())
}

/// A device's effective labels: the device-set ones overlaid by the
/// operator-set ones (the operator wins on a key both set).
pub fn effective_labels(
    device_set: &BTreeMap<String, String>,
    operator_set: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out = device_set.clone();
    out.extend(operator_set.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn m(sel: &str, l: &[(&str, &str)]) -> bool {
        Selector::parse(sel)
            .unwrap_or_else(|e| panic!("{sel}: {e}"))
            .matches(&labels(l))
    }

    fn err(sel: &str) -> SelectorError {
        match Selector::parse(sel) {
            Ok(s) => panic!("{sel:?} parsed as {s:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn every_operator() {
        let l = [("env", "prod"), ("region", "eu"), ("canary", "")];
        assert!(m("env=prod", &l));
        assert!(m("env==prod", &l));
        assert!(!m("env=dev", &l));
        assert!(m("env!=dev", &l));
        assert!(!m("env!=prod", &l));
        assert!(m("missing!=x", &l), "!= matches a device without the key");
        assert!(m("region in (eu,us)", &l));
        assert!(!m("region in (us)", &l));
        assert!(!m("missing in (us)", &l));
        assert!(m("region notin (us)", &l));
        assert!(!m("region notin (eu, us)", &l));
        assert!(m("missing notin (us)", &l));
        assert!(m("canary", &l));
        assert!(!m("!canary", &l));
        assert!(m("!missing", &l));
        assert!(m("canary=", &l), "an empty value");
    }

    #[test]
    fn commas_are_and_and_whitespace_is_free() {
        let l = [("env", "prod"), ("region", "eu")];
        assert!(m("env=prod,region in (eu,us),!canary", &l));
        assert!(m("  env = prod ,\tregion  in(eu , us ) , ! canary  ", &l));
        assert!(!m("env=prod,region=us", &l));
        assert!(m("", &l), "empty matches all");
        assert!(m("   ", &[]));
    }

    #[test]
    fn canonical_form_round_trips() {
        let s = Selector::parse(" env = prod , region in ( us,eu ) , !canary,x notin(a),k!=v ,e")
            .expect("parse");
        let text = s.to_string();
        assert_eq!(
            text,
            "env=prod,region in (eu,us),!canary,x notin (a),k!=v,e"
        );
        assert_eq!(Selector::parse(&text).expect("again"), s);
    }

    #[test]
    fn prefixed_keys() {
        assert!(m("drover.io/role=edge", &[("drover.io/role", "edge")]));
        assert!(err("Drover.io/role=edge").message.contains("DNS subdomain"));
        assert!(err("/role").message.contains("prefix"));
    }

    #[test]
    fn errors_point_at_the_term() {
        let e = err("env=prod,region in (eu");
        assert!(e.message.contains("not closed"), "{e}");
        assert_eq!(e.position, 22);
        let e = err("env=prod,,x");
        assert_eq!(e.position, 9, "{e}");
        assert!(e.message.contains("label key"));
        let e = err("env=prod)");
        assert_eq!(e.position, 8, "{e}");
        let e = err("env=pr od");
        assert_eq!(e.position, 7, "{e}");
        let e = err("env in eu");
        assert!(e.message.contains("\"(\""), "{e}");
        let e = err("env < 3");
        assert_eq!(e.position, 4, "{e}");
        assert!(e.message.contains("unexpected character"));
        let e = err("env=-bad");
        assert!(e.message.contains("value \"-bad\""), "{e}");
        let e = err("env=prod,");
        assert!(e.message.contains("expected a label key"), "{e}");
        assert!(err("=x").message.contains("expected a label key"));
        assert!(err("!").message.contains("expected a label key"));
        assert!(err("k in ()x").message.contains("\",\" or the end"));
        assert!(err("k in (a b)").message.contains("in the set"));
        assert!(err("k == == v").message.contains("expected a label value"));
        assert_eq!(err("k=v=w").position, 3);
    }

    #[test]
    fn hostile_input() {
        // Unicode is refused, by position in characters.
        let e = err("région=eu");
        assert_eq!(e.position, 1, "{e}");
        let e = err("env=prod,zone=\u{202e}x");
        assert_eq!(e.position, 14, "{e}");
        assert!(err("env=prod\u{0}")
            .message
            .contains("unexpected character"));
        // Unbalanced parentheses, deep nesting.
        assert!(err("k in ((a))").message.contains("label value"));
        assert!(err(&"(".repeat(3000)).message.contains("label key"));
        assert!(err("k in (a))").message.contains("\",\" or the end"));
        assert!(err("k in a)").message.contains("\"(\""));
        // Too long, too many terms, too many values, too long keys.
        let huge = "a".repeat(MAX_SELECTOR_LEN + 1);
        assert!(err(&huge).message.contains("over the limit"));
        let many = (0..=MAX_REQUIREMENTS)
            .map(|i| format!("k{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(err(&many).message.contains("requirements"));
        let set = (0..=MAX_SET_VALUES)
            .map(|i| format!("v{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(err(&format!("k in ({set})"))
            .message
            .contains("values in one set"));
        assert!(err(&format!("{}=v", "k".repeat(64)))
            .message
            .contains("over 63"));
        assert!(err(&format!("k={}", "v".repeat(64)))
            .message
            .contains("over 63"));
        // Within the limit but long, still parsed.
        let ok = (0..MAX_REQUIREMENTS)
            .map(|i| format!("key{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(Selector::parse(&ok).expect("ok").requirements().len(), 64);
    }

    #[test]
    fn label_rules_and_merge() {
        assert!(validate_key("env").is_ok());
        assert!(validate_key("a.b-c_d").is_ok());
        assert!(validate_key("example.com/x").is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key("x/").is_err());
        assert!(validate_key("a/b/c").is_err());
        assert!(validate_value("").is_ok());
        assert!(validate_value("v.").is_err());
        let err = validate_labels(&labels(&[("ok", "1"), ("bad key", "2")])).expect_err("bad");
        assert_eq!(err.0, "bad key");
        let device = labels(&[("env", "dev"), ("arch", "arm64")]);
        let operator = labels(&[("env", "prod"), ("site", "a")]);
        assert_eq!(
            effective_labels(&device, &operator),
            labels(&[("arch", "arm64"), ("env", "prod"), ("site", "a")])
        );
    }
}
