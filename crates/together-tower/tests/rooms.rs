//! The folders of `src/limit/` import one way: no circle between them comes back.
//!
//! Reads the `use` paths of every source file below `src/limit/` (comments and `#[cfg(test)]`
//! modules left out), maps each file to its folder, and fails on any circle between folders,
//! naming the files that close it. The layout it holds the code to is in the `limit` module's
//! docs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The folders of `limit/`, top first: each may import only the ones after it.
const FOLDERS: [&str; 5] = ["admission", "bucket", "learn", "jobs", "backend"];

/// Every `.rs` file below `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(sources(&path));
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            files.push(path);
        }
    }
    files
}

/// The folder of `limit/` a file is in, if any (`limit/bucket/map.rs`: `bucket`).
fn folder_of(limit: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(limit).unwrap();
    let mut parts = relative.components();
    let first = parts.next()?.as_os_str().to_str()?.to_owned();
    parts.next().map(|_| first)
}

/// The folders of `limit/` that a file's code names, by `crate::limit::NAME` or by `super::`
/// paths that climb to `limit`.
fn folders_named(limit: &Path, file: &Path, code: &str) -> BTreeSet<String> {
    // How many `super::` reach `limit` from this file's module.
    let depth = file.strip_prefix(limit).unwrap().components().count();
    let is_mod = file.file_name().is_some_and(|name| name == "mod.rs");
    let supers_to_limit = if is_mod { depth - 1 } else { depth };
    let to_limit = format!(
        "{}::",
        "super::".repeat(supers_to_limit).trim_end_matches("::")
    );
    let mut named = BTreeSet::new();
    for line in code.lines() {
        let line = line.trim();
        if line.starts_with("//") {
            continue;
        }
        for prefix in ["crate::limit::".to_owned(), to_limit.clone()] {
            if prefix == "::" {
                continue;
            }
            for (at, _) in line.match_indices(prefix.as_str()) {
                // `super::super::x` must not also count as `super::x`.
                if prefix.starts_with("super") && line[..at].ends_with("super::") {
                    continue;
                }
                let rest = &line[at + prefix.len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if FOLDERS.contains(&name.as_str()) {
                    named.insert(name);
                }
            }
        }
    }
    named
}

/// The code of a file without its `#[cfg(test)]` module (tests may reach anywhere).
fn without_tests(code: &str) -> &str {
    code.find("#[cfg(test)]\nmod tests")
        .map_or(code, |at| &code[..at])
}

#[test]
fn the_folders_of_limit_import_one_way() {
    let limit = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/limit");
    let mut edges: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for file in sources(&limit) {
        let Some(from) = folder_of(&limit, &file) else {
            continue;
        };
        if from == "tests" {
            continue;
        }
        let code = std::fs::read_to_string(&file).unwrap();
        for to in folders_named(&limit, &file, without_tests(&code)) {
            if to != from {
                let shown = file.strip_prefix(&limit).unwrap().display().to_string();
                edges.entry((from.clone(), to)).or_default().push(shown);
            }
        }
    }
    assert!(!edges.is_empty(), "no import between the folders was read");
    let rank = |folder: &str| FOLDERS.iter().position(|known| *known == folder);
    let upward: Vec<String> = edges
        .iter()
        .filter(|((from, to), _)| rank(from) >= rank(to))
        .map(|((from, to), files)| format!("{from} -> {to} (in {})", files.join(", ")))
        .collect();
    assert!(
        upward.is_empty(),
        "imports against the order {FOLDERS:?}, which a circle needs: {upward:#?}"
    );
}

#[test]
fn the_reader_sees_an_import_and_its_climb() {
    let limit = Path::new("/x/src/limit");
    let file = limit.join("bucket/learn.rs");
    let code = "use super::super::learn::Feedback;\nuse super::Bucket;\n// crate::limit::admission\nuse crate::limit::backend::Cost;";
    let named = folders_named(limit, &file, code);
    assert_eq!(
        named,
        BTreeSet::from(["backend".to_owned(), "learn".to_owned()])
    );
    let module = limit.join("learn/mod.rs");
    let named = folders_named(limit, &module, "use super::jobs::Slots;");
    assert_eq!(named, BTreeSet::from(["jobs".to_owned()]));
}
