//! The crate's layers run one way (issue 10, section 5): no module of src/ names a module of a layer
//! above its own. Read from the source: every `crate::x` path in code (comments aside), with the
//! names lib.rs re-exports at the root (`crate::Vppo`) resolved to the module they come from.
//!
//! A new top-level module must be added to [`LAYERS`], so its place is decided once, here.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Bottom to top. A module may use modules of its own layer or of a layer below.
const LAYERS: &[(&str, &[&str])] = &[
    ("errors", &["error"]),
    (
        "kernel parameters (bindgen mirror of kernels/vppo_params.h)",
        &["params", "params_bindgen"],
    ),
    ("tensor views", &["tensor"]),
    ("devices", &["device"]),
    ("config", &["config"]),
    ("outputs", &["output"]),
    ("batch and validated batch", &["batch"]),
    ("GRPO helper", &["grpo"]),
    ("oracle", &["reference"]),
    ("backends", &["simt", "cuda"]),
    ("pipeline", &["exec"]),
    ("API", &["api", "hooks", "kl_div", "parallel"]),
    ("apps", &["io", "options", "cli", "bench", "train", "bin"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file, without `//` comments (line and doc comments; no string in src/ holds `//`
/// followed by a crate path, and a string that did would only make this test stricter).
fn code(text: &str) -> String {
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

/// The first path segment of every item of `crate::{ ... }` starting at `s` (just after the brace).
fn group_heads(s: &str) -> Vec<&str> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut item_start = true;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => item_start = true,
            c if item_start && (c.is_ascii_alphabetic() || c == '_') && depth == 0 => {
                heads.push(ident_at(&s[i..]));
                item_start = false;
            }
            _ => {}
        }
    }
    heads
}

/// Every name that follows `crate::` in `code`.
fn crate_paths(code: &str) -> Vec<&str> {
    let mut names = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            names.extend(group_heads(group));
        } else {
            names.push(ident_at(rest));
        }
    }
    names
}

/// The modules behind the names lib.rs re-exports at the root (`pub use api::{Device, ...}`).
fn root_reexports(lib: &str) -> HashMap<String, String> {
    let mut map = HashMap::new();
    for stmt in code(lib).split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let module = ident_at(rest).to_string();
        let items = &rest[module.len()..];
        let items = items.strip_prefix("::").unwrap_or(items);
        let names: Vec<&str> = match items.strip_prefix('{') {
            Some(g) => g
                .trim_end_matches('}')
                .split(',')
                .map(|n| n.trim())
                .collect(),
            None => vec![items.rsplit("::").next().unwrap_or(items).trim()],
        };
        for n in names.into_iter().filter(|n| !n.is_empty()) {
            map.insert(n.to_string(), module.clone());
        }
    }
    map
}

#[test]
fn no_module_uses_a_module_of_a_layer_above() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = fs::read_to_string(src.join("lib.rs")).unwrap();
    let reexports = root_reexports(&lib);
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut unknown = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" {
            continue;
        }
        let Some(own) = layer_of(&module) else {
            unknown.push(module);
            continue;
        };
        let text = fs::read_to_string(file).unwrap();
        for name in crate_paths(&code(&text)) {
            let target = reexports.get(name).cloned().unwrap_or(name.to_string());
            if target == module || target.is_empty() {
                continue;
            }
            match layer_of(&target) {
                Some(t) if t > own => violations.push(format!(
                    "{} ({}) uses crate::{name}, of the layer {} above it",
                    rel.display(),
                    LAYERS[own].0,
                    LAYERS[t].0
                )),
                Some(_) => {}
                None if target.chars().next().is_some_and(|c| c.is_uppercase()) => {
                    violations.push(format!(
                        "{}: crate::{name} is neither a module nor a root re-export of lib.rs",
                        rel.display()
                    ))
                }
                None => unknown.push(target),
            }
        }
    }
    unknown.sort();
    unknown.dedup();
    assert!(
        unknown.is_empty(),
        "modules of src/ missing from LAYERS in tests/layers.rs: {unknown:?}"
    );
    assert!(
        violations.is_empty(),
        "imports against the layer order:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_every_form_of_path() {
    let c = code("use crate::{a::{b, c}, d};\nfn f() { crate::e::g(); } // crate::h\n");
    assert_eq!(crate_paths(&c), ["a", "d", "e"]);
    let m = root_reexports("pub use api::{Device, Vppo};\npub use grpo::grpo_advantages;");
    assert_eq!(m["Vppo"], "api");
    assert_eq!(m["grpo_advantages"], "grpo");
}
