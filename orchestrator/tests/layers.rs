//! The orchestrator's dependency rules (ARCHITECTURE.md, "Layers"), checked
//! on the source: each top-level module may name only the modules and
//! external crates its layer allows, and the allowed graph has no circle.
//! A new `use crate::…` that breaks a rule fails here, naming the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Which of the crate's own modules each module may use.
fn allowed() -> BTreeMap<&'static str, &'static [&'static str]> {
    BTreeMap::from([
        ("contract", &[][..]),
        ("clock", &[][..]),
        ("backoff", &[][..]),
        ("mdns", &[][..]),
        ("metrics", &["core", "contract"][..]),
        ("core", &["contract"][..]),
        ("store", &["core", "contract", "metrics"][..]),
        ("security", &["core", "contract", "store", "clock"][..]),
        ("link", &["core", "metrics", "backoff"][..]),
        ("history", &["core", "contract", "metrics", "clock"][..]),
        ("registry", &["core", "metrics"][..]),
        (
            "engine",
            &[
                "core", "contract", "store", "link", "security", "metrics", "clock", "registry",
            ][..],
        ),
        (
            "http",
            &["engine", "core", "contract", "history", "metrics"][..],
        ),
        (
            "automation",
            &["engine", "core", "contract", "link", "metrics"][..],
        ),
        (
            "rules",
            &[
                "engine", "core", "contract", "link", "metrics", "clock", "backoff",
            ][..],
        ),
        ("cli", &["contract"][..]),
        (
            "server",
            &[
                "contract",
                "core",
                "store",
                "security",
                "link",
                "engine",
                "history",
                "http",
                "automation",
                "metrics",
                "clock",
                "backoff",
                "rules",
                "registry",
                "mdns",
            ][..],
        ),
    ])
}

/// External crates a module must not use: the pure core and the contract
/// do no I/O; the CLI is a client of the REST API and nothing else.
fn forbidden_crates() -> BTreeMap<&'static str, &'static [&'static str]> {
    let io: &[&str] = &[
        "tokio",
        "axum",
        "redb",
        "rumqttc",
        "rumqttd",
        "reqwest",
        "drover_broker",
        "drover_agent",
    ];
    BTreeMap::from([
        ("core", io),
        ("contract", io),
        (
            "cli",
            &["axum", "redb", "rumqttc", "rumqttd", "drover_broker"][..],
        ),
    ])
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/core/fleet.rs` → `core`; `src/server.rs` → `server`.
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel
        .components()
        .next()
        .expect("a component")
        .as_os_str()
        .to_string_lossy()
        .to_string();
    first.trim_end_matches(".rs").to_string()
}

/// Every `crate::name` a source text mentions, outside comments.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            // `drover_crate::x` or `some_crate::` are not ours.
            let before = rest[..i].chars().last();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                refs.insert(name);
            }
        }
        // `use crate::{a, b}` names several at once.
        if let Some(i) = code.find("crate::{") {
            let inner = &code[i + "crate::{".len()..];
            for part in inner.split([',', '}']) {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    refs.insert(name);
                }
            }
        }
    }
    refs
}

/// Whether `text` uses the external crate `name` (`use name::`, `name::x`).
fn uses_crate(text: &str, name: &str) -> bool {
    text.lines().any(|line| {
        let code = line.split("//").next().unwrap_or_default();
        let pat = format!("{name}::");
        code.match_indices(&pat).any(|(i, _)| {
            code[..i]
                .chars()
                .last()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == ':'))
        })
    })
}

#[test]
fn every_module_keeps_to_its_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let allowed = allowed();
    let forbidden = forbidden_crates();
    let mut broken = Vec::new();
    for file in &files {
        let module = top_module(&src, file);
        // The binary sees everything; unit tests in a file of their own
        // (`mod tests;` → `tests.rs`) may reach further, like those at the
        // end of a file.
        if module == "lib" || module == "main" || file.file_name().is_some_and(|n| n == "tests.rs")
        {
            continue;
        }
        let Some(may) = allowed.get(module.as_str()) else {
            broken.push(format!(
                "{}: module `{module}` is in no layer; add it to ARCHITECTURE.md and this test",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read source");
        // Unit tests (at the end of a file, by convention) may reach
        // further, e.g. to check a certificate with the broker's TLS code.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        for r in crate_refs(text) {
            if r != module && !may.contains(&r.as_str()) {
                broken.push(format!(
                    "{}: `{module}` may not use `crate::{r}`",
                    file.display()
                ));
            }
        }
        for c in forbidden.get(module.as_str()).copied().unwrap_or_default() {
            if uses_crate(text, c) {
                broken.push(format!("{}: `{module}` may not use `{c}`", file.display()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "layer rules broken:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_layers_have_no_circle() {
    let allowed = allowed();
    // Depth-first search for a back edge.
    fn visit<'a>(
        n: &'a str,
        g: &BTreeMap<&'a str, &'a [&'a str]>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(n) {
            return;
        }
        assert!(!path.contains(&n), "circle: {} -> {n}", path.join(" -> "));
        path.push(n);
        for m in g.get(n).copied().unwrap_or_default() {
            visit(m, g, path, done);
        }
        path.pop();
        done.insert(n);
    }
    let mut done = BTreeSet::new();
    for n in allowed.keys() {
        visit(n, &allowed, &mut Vec::new(), &mut done);
    }
}

/// The checker itself sees what it must.
#[test]
fn the_checker_finds_crate_paths() {
    let refs = crate_refs(
        "use crate::store::Write;\nuse crate::{core, contract::X};\nlet x = crate::engine::now_ms(); // crate::http\nuse drover_crate::y;",
    );
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        ["contract", "core", "engine", "store"]
    );
    assert!(uses_crate("use tokio::sync::mpsc;", "tokio"));
    assert!(!uses_crate("use my_tokio::x;", "tokio"));
    assert!(!uses_crate("// tokio::spawn", "tokio"));
}
