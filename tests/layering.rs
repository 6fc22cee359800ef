//! The module layering of `src/`, checked by reading the code: every `crate::` path
//! points down the layers, the transports never reach past the service into the store
//! or each other, and the service names no transport crate.
//!
//! Layers, lowest first (a module may use its own layer and those below):
//!
//! 0. `domain`, `proto`, `error`: pure types and rules;
//! 1. `telemetry`: tracing and trace propagation;
//! 2. `store`, `cache`, `auth`: the ports and their adapters;
//! 3. `service`: the use cases;
//! 4. `http`, `broker`: the transports, driving the service;
//! 5. `app`, `config`, `healthcheck`, `main`, `lib`: the composition root.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn rank(module: &str) -> Option<u8> {
    Some(match module {
        "domain" | "proto" | "error" => 0,
        "telemetry" => 1,
        "store" | "cache" | "auth" => 2,
        "service" => 3,
        "http" | "broker" => 4,
        "app" | "config" | "healthcheck" | "migrate" | "main" | "lib" => 5,
        _ => return None,
    })
}

/// Arrows that point down but skip the service: a transport talks to the use cases.
const FORBIDDEN: &[(&str, &str)] = &[
    ("http", "store"),
    ("http", "broker"),
    ("http", "cache"),
    ("broker", "http"),
];

/// Crates that are transports or drivers: never named by the use cases or the domain
/// (`proto` is generated wire code and names tonic by design).
const TRANSPORT_CRATES: &[&str] = &[
    "async_nats",
    "axum",
    "prost",
    "tonic",
    "redis",
    "mongodb",
    "sqlx",
    "tower_http",
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).expect("src/ is readable");
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/http/twins.rs` -> `http`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src/");
    let first = rel
        .components()
        .next()
        .expect("a path")
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    first.trim_end_matches(".rs").to_owned()
}

/// The code of a file without its comments (doc links name modules freely).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> String {
    s.chars()
        .skip_while(|c| c.is_whitespace())
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Top-level modules a piece of code names through `crate::`.
fn used_modules(code: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::b, c};`: the first name of each entry, nested groups
            // included.
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name = ident_at(part.trim_start_matches('{'));
                if !name.is_empty() {
                    used.insert(name);
                }
            }
        } else {
            let name = ident_at(rest);
            if !name.is_empty() {
                used.insert(name);
            }
        }
    }
    used
}

fn names_crate(code: &str, krate: &str) -> bool {
    code.match_indices(&format!("{krate}::")).any(|(i, _)| {
        code[..i]
            .chars()
            .last()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == ':'))
    })
}

#[test]
fn every_module_uses_only_its_layer_and_those_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    assert!(files.len() > 20, "read the sources: {files:?}");
    let mut violations = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        let Some(own) = rank(&module) else {
            violations.push(format!("{}: module {module} has no layer", file.display()));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("source is readable");
        let code = code(&text);
        for used in used_modules(&code) {
            if used == module {
                continue;
            }
            match rank(&used) {
                None => violations.push(format!(
                    "{}: crate::{used} is not a known module",
                    file.display()
                )),
                Some(r) if r > own => violations.push(format!(
                    "{}: {module} (layer {own}) uses {used} (layer {r})",
                    file.display()
                )),
                Some(_) if FORBIDDEN.contains(&(module.as_str(), used.as_str())) => violations
                    .push(format!(
                        "{}: {module} must not use {used} directly",
                        file.display()
                    )),
                Some(_) => {}
            }
        }
        if module == "domain" || module == "service" {
            for krate in TRANSPORT_CRATES {
                if names_crate(&code, krate) {
                    violations.push(format!("{}: {module} names {krate}", file.display()));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layering violations:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_grouped_and_inline_paths() {
    let code = "use crate::{domain::twin::Twin, store};\nfn f() { crate::http::router(); }";
    let used: Vec<String> = used_modules(code).into_iter().collect();
    assert_eq!(used, ["domain", "http", "store"]);
    assert!(names_crate("let c: async_nats::Client;", "async_nats"));
    assert!(!names_crate("let c: my_async_nats::Client;", "async_nats"));
}
