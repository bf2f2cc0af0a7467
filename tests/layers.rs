//! The layering rule, checked on the source (no build needed). `src/` holds
//! one directory per layer (lowest first in [`LAYERS`]); a module of a layer
//! imports (`crate::…` and `super::…` paths, outside comments and
//! `#[cfg(test)]` modules) only its own layer or lower ones, and no import
//! cycle exists among the modules of the layers (`vmm::qemu`, `ops::vm`, …,
//! and each layer's own `mod.rs`). A violation names the offending file and
//! import.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest first. See docs/design.md (Layers) for what each layer is.
const LAYERS: &[&str] = &[
    "model",
    "host",
    "store",
    "image",
    "guest",
    "vmm",
    "supervisor",
    "ops",
    "cli",
];

/// Test support (`nox::testing`): imports nothing of the crate.
const SUPPORT: &str = "testing";

/// Source text without line comments and without the trailing
/// `#[cfg(test)] mod tests` (tests may reach anywhere).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_len(s: &str) -> usize {
    s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len())
}

/// Expands the use tree or path at the start of `s` (what follows
/// `crate::`) into its paths: `a::{b, c::{d}}` gives `a::b` and `a::c::d`.
fn paths(s: &str, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let mut cur = prefix.to_vec();
    let mut i = 0;
    loop {
        let rest = &s[i..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut j = 0;
            loop {
                let item = group[j..].trim_start();
                j = group.len() - item.len();
                if item.starts_with('}') {
                    return i + 1 + j + 1;
                }
                j += paths(item, &cur, out);
                let after = group[j..].trim_start();
                j = group.len() - after.len();
                if let Some(a) = after.strip_prefix(',') {
                    j = group.len() - a.len();
                }
            }
        }
        let n = ident_len(rest);
        if n == 0 {
            out.push(cur);
            return i;
        }
        cur.push(rest[..n].to_string());
        i += n;
        match s[i..].strip_prefix("::") {
            Some(_) => i += 2,
            None => {
                out.push(cur);
                return i;
            }
        }
    }
}

/// The absolute module paths (from the crate root) that `text`, the code of
/// the module at `module`, imports.
fn imports(text: &str, module: &[String]) -> Vec<Vec<String>> {
    let mut out = vec![];
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let word_start = i == 0 || {
            let c = text[..i].chars().next_back().unwrap();
            !(c.is_ascii_alphanumeric() || c == '_' || c == ':')
        };
        if word_start && rest.starts_with("crate::") {
            i += 7 + paths(&text[i + 7..], &[], &mut out);
        } else if word_start && rest.starts_with("super::") {
            let mut base = module.to_vec();
            let mut j = i;
            while text[j..].starts_with("super::") {
                base.pop();
                j += 7;
            }
            i = j + paths(&text[j..], &base, &mut out);
        } else {
            i += rest.chars().next().unwrap().len_utf8();
        }
    }
    out
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The module path of a file: `vmm/net/tap.rs` is `vmm::net::tap`,
/// `vmm/net/mod.rs` is `vmm::net`.
fn module_of(rel: &Path) -> Vec<String> {
    let mut m: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_str().unwrap().to_string())
        .collect();
    if m.last().is_some_and(|l| l == "mod") {
        m.pop();
    }
    m
}

/// The graph's node for a module path: a layer's module (`vmm::qemu`) or
/// the layer's own `mod.rs` (`store`), given the modules each layer has.
fn node(path: &[String], subs: &BTreeMap<String, BTreeSet<String>>) -> Option<String> {
    let layer = path.first()?;
    if layer == SUPPORT {
        return Some(layer.clone());
    }
    let mods = subs.get(layer)?;
    Some(match path.get(1) {
        Some(m) if mods.contains(m) => format!("{layer}::{m}"),
        _ => layer.clone(),
    })
}

struct Graph {
    /// node -> (imported node -> a file that imports it)
    edges: BTreeMap<String, BTreeMap<String, String>>,
    /// Files outside any layer directory.
    stray: Vec<String>,
}

fn graph() -> Graph {
    let src = src();
    let mut subs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for layer in LAYERS {
        let mods = subs.entry(layer.to_string()).or_default();
        for e in std::fs::read_dir(src.join(layer)).unwrap().flatten() {
            let name = e.file_name().to_str().unwrap().to_string();
            if name != "mod.rs" {
                mods.insert(name.trim_end_matches(".rs").to_string());
            }
        }
    }
    let mut files = vec![];
    rs_files(&src, &mut files);
    let mut g = Graph {
        edges: BTreeMap::new(),
        stray: vec![],
    };
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let module = module_of(rel);
        if module == ["lib"] || module == ["main"] {
            continue;
        }
        let Some(from) = node(&module, &subs) else {
            g.stray.push(rel.display().to_string());
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        let entry = g.edges.entry(from.clone()).or_default();
        for p in imports(&code(&text), &module) {
            if let Some(to) = node(&p, &subs).filter(|to| *to != from) {
                entry.entry(to).or_insert_with(|| rel.display().to_string());
            }
        }
    }
    g
}

fn layer_index(node: &str) -> Option<usize> {
    let layer = node.split("::").next().unwrap();
    LAYERS.iter().position(|l| *l == layer)
}

#[test]
fn every_module_imports_only_its_own_layer_or_lower_ones() {
    let g = graph();
    let mut bad: Vec<String> = g
        .stray
        .iter()
        .map(|f| format!("src/{f} is in no layer directory ({LAYERS:?})"))
        .collect();
    for (m, deps) in &g.edges {
        for (d, file) in deps {
            let ok = match (layer_index(m), layer_index(d)) {
                (Some(lm), Some(ld)) => ld <= lm,
                // Test support stands alone; everything may use it.
                (None, _) => false,
                (Some(_), None) => true,
            };
            if !ok {
                bad.push(format!("src/{file}: {m} imports crate::{d}"));
            }
        }
    }
    let top: BTreeSet<String> = std::fs::read_dir(src())
        .unwrap()
        .flatten()
        .map(|e| {
            e.file_name()
                .to_str()
                .unwrap()
                .trim_end_matches(".rs")
                .to_string()
        })
        .filter(|n| n != "lib" && n != "main" && n != SUPPORT)
        .collect();
    let want: BTreeSet<String> = LAYERS.iter().map(|l| l.to_string()).collect();
    assert_eq!(top, want, "src/ must hold exactly the layer directories");
    assert!(bad.is_empty(), "layering violations:\n{}", bad.join("\n"));
}

fn cycles(edges: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<String> {
    // Depth-first search with colours; a grey node met again closes a cycle.
    fn visit<'a>(
        g: &'a BTreeMap<String, BTreeMap<String, String>>,
        m: &'a str,
        colour: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
        cycles: &mut Vec<String>,
    ) {
        colour.insert(m, 1);
        path.push(m);
        for d in g
            .get(m)
            .map(|d| d.keys().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            match colour.get(d.as_str()).copied().unwrap_or(0) {
                0 => visit(g, d, colour, path, cycles),
                1 => {
                    let from = path.iter().position(|x| *x == d.as_str()).unwrap();
                    let mut c: Vec<&str> = path[from..].to_vec();
                    c.push(d);
                    cycles.push(c.join(" -> "));
                }
                _ => {}
            }
        }
        path.pop();
        colour.insert(m, 2);
    }
    let mut colour = BTreeMap::new();
    let mut found = vec![];
    for m in edges.keys() {
        if colour.get(m.as_str()).copied().unwrap_or(0) == 0 {
            visit(edges, m, &mut colour, &mut vec![], &mut found);
        }
    }
    found
}

#[test]
fn no_import_cycles_among_modules() {
    let g = graph();
    let found = cycles(&g.edges);
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

#[test]
fn the_import_scanner_sees_paths_groups_and_super() {
    let text = "use crate::{store::{self, VmPaths}, model::spec::VmSpec};\n\
                use super::{jail, net::tap};\n\
                let x = crate::vmm::qemu::which(\"a\"); // crate::cli in a comment\n\
                #[cfg(test)]\nmod tests { use crate::ops::vm; }";
    let module = ["vmm".to_string(), "warm".to_string()];
    let got: BTreeSet<String> = imports(&code(text), &module)
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    assert_eq!(
        got.into_iter().collect::<Vec<_>>(),
        [
            "model::spec::VmSpec",
            "store::VmPaths",
            "store::self",
            "vmm::jail",
            "vmm::net::tap",
            "vmm::qemu::which"
        ]
    );
}

#[test]
fn a_cycle_and_an_upward_import_are_found() {
    let mut g: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let edge = |g: &mut BTreeMap<String, BTreeMap<String, String>>, a: &str, b: &str| {
        g.entry(a.into())
            .or_default()
            .insert(b.into(), "f.rs".into());
    };
    edge(&mut g, "vmm::qemu", "vmm::net");
    edge(&mut g, "vmm::net", "vmm::qemu");
    assert_eq!(cycles(&g), ["vmm::net -> vmm::qemu -> vmm::net"]);
    assert!(layer_index("ops::vm") > layer_index("vmm::qemu"));
}
