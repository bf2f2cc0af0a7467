//! The module layering rule, checked on the source (no build needed): every
//! top-level module of `src/` belongs to one layer of [`LAYERS`] and imports
//! (`crate::X`, outside comments and `#[cfg(test)]` modules) only modules of
//! its own layer or lower ones, and no import cycle exists among top-level
//! modules. A new module must be placed in the table; a violation names the
//! offending file and import.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Lowest first. See docs/design.md (Layers) for what each layer is.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "model",
        &[
            "ident",
            "lifecycle",
            "forward",
            "qemu_opts",
            "text",
            "testing",
            "remote",
            "migwire",
            "spec",
            "device",
            "disk",
        ],
    ),
    (
        "host",
        &[
            "trust", "config", "console", "sshkeys", "userkeys", "qmp", "hostdev",
        ],
    ),
    ("store", &["store", "events", "state", "timeline"]),
    ("image, guest", &["image", "seed", "boot"]),
    (
        "vmm",
        &[
            "firmware",
            "net",
            "qemu",
            "ssh",
            "jail",
            "rundir",
            "warm",
            "snapjob",
            "diskplug",
            "systemd",
            "templates",
            "migration",
        ],
    ),
    ("supervisor", &["supervisor"]),
    (
        "ops",
        &["vm", "snapshot", "clone", "template", "migrate", "ops"],
    ),
    ("cli", &["cli"]),
];

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

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules `text` imports: `crate::X` paths and the first
/// segments of `use crate::{X, Y::..}` groups.
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + 7..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: split at commas outside braces.
            let (mut depth, mut start) = (0usize, 0usize);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(ident_at(group[start..i].trim()).to_string());
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident_at(group[start..i].trim()).to_string());
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            out.remove("");
        } else {
            let m = ident_at(rest);
            if !m.is_empty() {
                out.insert(m.to_string());
            }
        }
    }
    out
}

fn rs_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// module -> (imported module -> a file that imports it)
fn graph() -> BTreeMap<String, BTreeMap<String, String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rs_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let entry = g.entry(top.clone()).or_default();
        for m in imports(&code(&text)) {
            if m != top {
                entry.entry(m).or_insert_with(|| rel.display().to_string());
            }
        }
    }
    let known: BTreeSet<String> = g.keys().cloned().collect();
    for deps in g.values_mut() {
        deps.retain(|m, _| known.contains(m));
    }
    g
}

#[test]
fn every_module_imports_only_its_own_layer_or_lower_ones() {
    let g = graph();
    let layer_of: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, (_, ms))| ms.iter().map(move |m| (*m, i)))
        .collect();
    let mut bad = vec![];
    for (m, deps) in &g {
        let Some(&lm) = layer_of.get(m.as_str()) else {
            bad.push(format!("module {m} is in no layer: add it to LAYERS"));
            continue;
        };
        for (d, file) in deps {
            let ld = layer_of.get(d.as_str()).copied().unwrap_or(usize::MAX);
            if ld > lm {
                bad.push(format!(
                    "src/{file}: {m} ({}) imports crate::{d} ({})",
                    LAYERS[lm].0,
                    LAYERS.get(ld).map_or("no layer", |l| l.0)
                ));
            }
        }
    }
    for (m, _) in layer_of {
        assert!(g.contains_key(m), "LAYERS names {m}, which is no module");
    }
    assert!(bad.is_empty(), "layering violations:\n{}", bad.join("\n"));
}

#[test]
fn no_import_cycles_among_top_level_modules() {
    let g = graph();
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
        for d in g[m].keys() {
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
    let mut cycles = vec![];
    for m in g.keys() {
        if colour.get(m.as_str()).copied().unwrap_or(0) == 0 {
            visit(&g, m, &mut colour, &mut vec![], &mut cycles);
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_import_scanner_sees_paths_and_groups() {
    let text = "use crate::{store::{self, VmPaths}, spec::VmSpec};\n\
                let x = crate::qemu::which(\"a\"); // crate::cli in a comment\n\
                #[cfg(test)]\nmod tests { use crate::vm; }";
    let got = imports(&code(text));
    assert_eq!(
        got.into_iter().collect::<Vec<_>>(),
        ["qemu", "spec", "store"]
    );
}
