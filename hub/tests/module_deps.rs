//! Each module of `store`, `router` and `hub` depends one way only (ARCHITECTURE.md): no two
//! top-level modules of a crate import each other, directly or round a longer cycle, and the
//! protocol heads (`mqtt`, `amqp`) and the cloud connection (`upstream`) import none of each
//! other. Read from the sources' `crate::` paths outside `#[cfg(test)]` code.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → the top-level modules its code names through `crate::`.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The crate's module graph. `lib.rs` and `main.rs` (the roots) are left out.
fn graph(crate_dir: &str) -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(crate_dir)
        .join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g = Graph::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let first = rel
            .components()
            .next()
            .expect("a component")
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if first == "lib" || first == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read source");
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let names = g.entry(first.clone()).or_default();
        for line in code.lines() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            names.extend(crate_names(line));
        }
        names.remove(&first);
        names.remove("self");
    }
    g
}

/// The first segments after every `crate::` in `line`, including each name of a
/// `crate::{a, b::c}` group.
fn crate_names(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in line.match_indices("crate::") {
        let rest = &line[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0usize;
            let mut start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if c.is_whitespace() => {}
                    _ if start && depth == 0 => {
                        let name = ident(&group[j..]);
                        if !name.is_empty() {
                            out.push(name);
                        }
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

/// Groups of modules that reach each other (Tarjan's strongly connected components, size > 1).
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    struct Walk<'a> {
        g: &'a Graph,
        next: usize,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.g.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.g.contains_key(w) {
                    continue; // a crate-root item (a re-export in lib.rs), not a module
                }
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut group = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    group.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if group.len() > 1 {
                    group.sort();
                    self.out.push(group);
                }
            }
        }
    }
    let mut walk = Walk {
        g,
        next: 0,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.out
}

#[test]
fn the_scanner_sees_plain_paths_and_groups() {
    assert_eq!(
        crate_names("use crate::head::{context::HeadContext, sink};"),
        ["head"]
    );
    assert_eq!(
        crate_names("use crate::{fsutil::write_atomically, settings::{A, B}, limits};"),
        ["fsutil", "settings", "limits"]
    );
    assert_eq!(
        crate_names("let x = crate::store::Store::open(crate::options::X);"),
        ["store", "options"]
    );
    let mut g = Graph::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e")] {
        g.entry(a.into()).or_default().insert(b.into());
        g.entry(b.into()).or_default();
    }
    assert_eq!(cycles(&g), [["a", "b", "c"]]);
}

#[test]
fn every_module_of_store_router_and_hub_depends_one_way() {
    for krate in ["store", "router", "hub"] {
        let g = graph(krate);
        assert!(g.len() > 5, "{krate}: too few modules found: {g:?}");
        let found = cycles(&g);
        assert!(
            found.is_empty(),
            "{krate}: modules that import each other, directly or round a cycle: {found:?}\n\
             graph: {g:#?}"
        );
    }
}

#[test]
fn the_heads_and_the_cloud_connection_import_none_of_each_other() {
    let g = graph("hub");
    for from in ["mqtt", "amqp", "upstream"] {
        for to in ["mqtt", "amqp", "upstream"] {
            assert!(
                from == to || !g[from].contains(to),
                "{from} imports {to}: what both need belongs in head/ or a wire module"
            );
        }
    }
}
