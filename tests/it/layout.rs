//! The workspace's layout holds: no import cycle between the modules of any crate.
//!
//! Every `crate::a::b` path in a module's code (comments and `#[cfg(test)]` parts aside) is an
//! edge between two sibling modules: the first components where the importing module's path
//! and the imported path part. A cycle among siblings is a wall crossed both ways.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// The workspace members, from the root `Cargo.toml`.
fn members(root: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let list = text.split("members = [").nth(1).unwrap();
    let list = &list[..list.find(']').unwrap()];
    list.split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
        .map(|m| root.join(m))
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` and `src/a/b/mod.rs` are module `a::b`; `lib.rs` and `main.rs` the root.
fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Module = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The `crate::…` paths in the code of `text` (before its tests, outside comments).
fn crate_paths(text: &str) -> Vec<Module> {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    let mut paths = Vec::new();
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        for (i, _) in line.match_indices("crate::") {
            let rest = &line[i + "crate::".len()..];
            let path: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let parts: Module = path
                .split("::")
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect();
            paths.push(parts);
        }
    }
    paths
}

/// Sibling edges of one crate: (importing sibling, imported sibling), both full paths.
fn edges(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for file in files {
        let from = module_of(src, &file);
        for to in crate_paths(&std::fs::read_to_string(&file).unwrap()) {
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common < from.len() && common < to.len() {
                let (a, b) = (from[..=common].to_vec(), to[..=common].to_vec());
                graph.entry(a).or_default().insert(b);
            }
        }
    }
    graph
}

/// One cycle of `graph`, if it has any (depth-first search with an explicit path).
fn find_cycle(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    fn visit(
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        node: &Module,
        path: &mut Vec<Module>,
        done: &mut BTreeSet<Module>,
    ) -> Option<Vec<Module>> {
        if let Some(at) = path.iter().position(|m| m == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.clone());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(graph, next, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|start| visit(graph, start, &mut Vec::new(), &mut done))
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let crates = members(root);
    assert!(crates.len() >= 10, "{crates:?}");
    // `tests/` holds the integration-test binary itself, not a `src/` tree.
    for krate in crates.iter().filter(|k| k.join("src").is_dir()) {
        let graph = edges(&krate.join("src"));
        if let Some(cycle) = find_cycle(&graph) {
            let shown: Vec<String> = cycle.iter().map(|m| m.join("::")).collect();
            panic!("{}: import cycle {}", krate.display(), shown.join(" -> "));
        }
    }
}

#[test]
fn a_cycle_is_found_and_named() {
    let m = |s: &str| vec![s.to_string()];
    let mut graph: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    graph.entry(m("a")).or_default().insert(m("b"));
    graph.entry(m("b")).or_default().insert(m("c"));
    assert_eq!(find_cycle(&graph), None);
    graph.entry(m("c")).or_default().insert(m("a"));
    assert_eq!(
        find_cycle(&graph),
        Some(vec![m("a"), m("b"), m("c"), m("a")])
    );
    assert_eq!(
        crate_paths("use crate::x::{y, z};\n// crate::w\n#[cfg(test)]\nuse crate::t;"),
        vec![vec!["x".to_string()]]
    );
}
