//! The documentation held to the code, so neither drifts: every `FOLLOW_*` setting the services
//! read is in `docs/operations.md` with the default the code gives it, and every setting there
//! is read; no source, test or doc points outside the repository for the design.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `FOLLOW_*` names in `text` (`"FOLLOW_X"` literals in code, `` `FOLLOW_X` `` in docs).
fn names(text: &str, quote: char) -> BTreeSet<String> {
    text.split(quote)
        .filter(|piece| {
            piece.starts_with("FOLLOW_")
                && piece[7..]
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                && piece.len() > 7
        })
        .map(str::to_owned)
        .collect()
}

/// The services' code: what they read, and the defaults their `Env` calls give
/// (`env.number("X", 16, …)`, `env.secs("X", 15)`, `env.or("X", "d")`, `env.parsed("X", "d")`).
fn code() -> (BTreeSet<String>, BTreeMap<String, String>) {
    let mut files = Vec::new();
    for service in ["api", "gateway", "service", "bus", "token"] {
        sources(
            &repo().join("services").join(service).join("src"),
            &mut files,
        );
    }
    let (mut read, mut defaults) = (BTreeSet::new(), BTreeMap::new());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        // Code only: doc comments document, they do not read.
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        read.extend(names(&code, '"'));
        for call in ["number(", "secs(", "or(", "parsed("] {
            for (at, _) in code.match_indices(&format!(".{call}")) {
                let args = &code[at + call.len() + 1..];
                let args: String = args.chars().filter(|c| !c.is_whitespace()).collect();
                let Some(rest) = args.strip_prefix('"') else {
                    continue;
                };
                let Some((name, rest)) = rest.split_once("\",") else {
                    continue;
                };
                // A literal default only: a quoted string, or a number followed by `,` or `)`.
                let default = match rest.strip_prefix('"') {
                    Some(text) => text.split('"').next().map(str::to_owned),
                    None => {
                        let number: String = rest
                            .chars()
                            .take_while(|c| c.is_ascii_digit() || *c == '_')
                            .collect();
                        let after = rest[number.len()..].chars().next();
                        (!number.is_empty() && matches!(after, Some(',' | ')')))
                            .then(|| number.replace('_', ""))
                    }
                };
                if let Some(default) = default.filter(|_| name.starts_with("FOLLOW_")) {
                    defaults.insert(name.to_owned(), default);
                }
            }
        }
    }
    (read, defaults)
}

/// The reference's rows: each name with its row's default cell.
fn documented() -> BTreeMap<String, String> {
    let doc = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let mut rows = BTreeMap::new();
    for line in doc.lines().filter(|l| l.starts_with("| `FOLLOW_")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        for name in names(cells[0], '`') {
            rows.insert(name, cells.get(1).copied().unwrap_or_default().to_owned());
        }
    }
    rows
}

#[test]
fn every_setting_is_documented_with_its_default_and_every_documented_one_is_read() {
    let (read, defaults) = code();
    let documented = documented();
    let missing: Vec<_> = read
        .iter()
        .filter(|n| !documented.contains_key(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "read but not in docs/operations.md: {missing:?}"
    );
    let stale: Vec<_> = documented.keys().filter(|n| !read.contains(*n)).collect();
    assert!(
        stale.is_empty(),
        "in docs/operations.md but read by no service: {stale:?}"
    );
    assert!(defaults.len() > 30, "defaults found: {}", defaults.len());
    for (name, default) in &defaults {
        let cell = &documented[name];
        assert!(
            cell.replace(',', "").contains(&format!("`{default}`")),
            "{name}: the code's default is {default}, docs/operations.md says {cell}"
        );
    }
}

#[test]
fn the_design_is_read_in_the_repository() {
    let mut files = Vec::new();
    for dir in ["services", "e2e", "testkit", "proto"] {
        sources(&repo().join(dir), &mut files);
    }
    files.extend(
        [
            "README.md",
            "dev",
            "compose.yaml",
            "docs/operations.md",
            "docs/services.md",
            "docs/development.md",
            "docs/performance.md",
        ]
        .iter()
        .map(|f| repo().join(f)),
    );
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains(&["ARCHITECTURE", ".md"].concat())
                && !text.contains(&["..", "/shared"].concat()),
            "{} points outside the repository for the design: docs/architecture.md is it",
            file.display()
        );
    }
}
