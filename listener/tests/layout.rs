//! The listener's module layout: the `crate::` import graph of `src/` (test modules excluded)
//! has no cycle, so each area can be read, changed and tested on top of the ones below it.
//!
//! A module is a file (`sink/mod.rs` is `sink`); a path `crate::a::b::Item` points at the
//! longest prefix that is a module, `super::` is resolved, and a `mod.rs` depends on the child
//! modules it declares (it re-exports them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `src/` files as module paths (`sink::sql`), with their text.
fn modules(src: &Path) -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    files
        .into_iter()
        .filter_map(|path| {
            let relative = path.strip_prefix(src).expect("under src");
            // The binary (`src/bin/`) is a client of the library, not part of its graph.
            if relative.starts_with("bin") {
                return None;
            }
            let mut parts: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            let file = parts.pop().expect("file name");
            let stem = file.trim_end_matches(".rs");
            match stem {
                // The crate root wires everything together by design.
                "lib" if parts.is_empty() => return None,
                "mod" => {}
                _ => parts.push(stem.to_string()),
            }
            let text = std::fs::read_to_string(&path).expect("read module");
            Some((parts.join("::"), without_test_modules(&text)))
        })
        .collect()
}

/// The text up to the first `#[cfg(test)]` (test modules sit at the end of their file).
fn without_test_modules(text: &str) -> String {
    match text.find("#[cfg(test)]") {
        Some(at) => text[..at].to_string(),
        None => text.to_string(),
    }
}

/// Code without comments (line and doc comments; block comments are not used).
fn code_lines(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path written after `crate::` or `super::` (expanding `{a, b::c}` groups), as
/// segments relative to the crate root.
fn paths(module: &str, code: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    for (at, _) in code
        .match_indices("crate::")
        .chain(code.match_indices("super::"))
    {
        if at > 0 && code[..at].ends_with(|c: char| is_ident(c) || c == ':') {
            continue;
        }
        let mut base: Vec<String> = Vec::new();
        let mut rest = &code[at..];
        if let Some(after) = rest.strip_prefix("crate::") {
            rest = after;
        } else {
            base = module.split("::").map(str::to_string).collect();
            while let Some(after) = rest.strip_prefix("super::") {
                base.pop();
                rest = after;
            }
        }
        expand(&base, rest, &mut found);
    }
    found
}

fn expand(base: &[String], rest: &str, found: &mut Vec<Vec<String>>) {
    let mut segments = base.to_vec();
    let mut rest = rest;
    loop {
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let close = group
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map(|(i, _)| i)
                .unwrap_or(group.len());
            for item in split_top_level(&group[..close]) {
                expand(&segments, item.trim(), found);
            }
            return;
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if end > 0 {
            segments.push(rest[..end].to_string());
        }
        rest = &rest[end..];
        if let Some(after) = rest.strip_prefix("::") {
            rest = after.trim_start();
            continue;
        }
        found.push(segments);
        return;
    }
}

fn split_top_level(group: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&group[start..]);
    items
}

/// The module a path points at: its longest prefix that is a module.
fn target(path: &[String], known: &BTreeSet<String>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|candidate| known.contains(candidate))
}

fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules(src);
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in &modules {
        let code = code_lines(text);
        let mut out: BTreeSet<String> = paths(module, &code)
            .iter()
            .filter_map(|p| target(p, &known))
            .collect();
        // A facade depends on the children it declares.
        for line in code.lines() {
            let line = line.trim();
            let declared = line
                .strip_prefix("pub mod ")
                .or_else(|| line.strip_prefix("pub(crate) mod "))
                .or_else(|| line.strip_prefix("mod "));
            if let Some(name) = declared.and_then(|d| d.strip_suffix(';')) {
                let child = if module.is_empty() {
                    name.to_string()
                } else {
                    format!("{module}::{name}")
                };
                if known.contains(&child) {
                    out.insert(child);
                }
            }
        }
        out.remove(module);
        edges.insert(module.clone(), out);
    }
    edges
}

/// A cycle of the graph, if there is one.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(node.to_string(), Mark::Open);
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            match marks.get(next).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let from = stack.iter().position(|n| n == next).expect("on the stack");
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(cycle) = visit(next, edges, marks, stack) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in edges.keys() {
        if marks.get(node).copied().unwrap_or(Mark::New) == Mark::New {
            if let Some(cycle) = visit(node, edges, &mut marks, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}

#[test]
fn the_crate_import_graph_has_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = graph(&src);
    assert!(edges.len() > 10, "modules found: {:?}", edges.keys());
    if let Some(cycle) = find_cycle(&edges) {
        panic!(
            "import cycle: {}\n(edges of each: {:#?})",
            cycle.join(" -> "),
            cycle
                .iter()
                .map(|m| (m, &edges[m]))
                .collect::<BTreeMap<_, _>>()
        );
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle_through_groups_super_and_facades() {
    // A throwaway tree: a -> b (a group import), b::c -> a (through super), b -> b::c (facade).
    let dir = std::env::temp_dir().join(format!("layout-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("b")).expect("mkdir");
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\n").expect("lib");
    std::fs::write(src.join("a.rs"), "use crate::{lsn, b::Thing};\n").expect("a");
    std::fs::write(src.join("lsn.rs"), "// crate::a::X in a comment\n").expect("lsn");
    std::fs::write(src.join("b/mod.rs"), "mod c;\npub use c::Thing;\n").expect("b");
    std::fs::write(
        src.join("b/c.rs"),
        "use super::super::a;\npub struct Thing;\n",
    )
    .expect("c");
    let edges = graph(&src);
    std::fs::remove_dir_all(&dir).expect("clean up");
    assert!(
        edges["lsn"].is_empty(),
        "comments are not imports: {edges:?}"
    );
    let cycle = find_cycle(&edges).unwrap_or_else(|| panic!("no cycle in {edges:?}"));
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4, "{cycle:?}");
}
