//! The modules import one way: every `crate::` and `super::` path in `src/` (but `src/bin/`)
//! leads into its own module, a module of the same layer or one of a lower layer, and no modules
//! of one layer import each other round a circle. The layers are the table of
//! `docs/architecture.md`, parsed here, so the doc and the test cannot drift.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

/// Where an import was found.
#[derive(Debug, Clone)]
struct Site {
    file: String,
    line: usize,
}

/// Module -> layer, from the ```text block under `## Layers`: rows `layer | modules | owns`, a
/// row with an empty layer cell continuing the one above.
fn parse_layers(doc: &str) -> Result<BTreeMap<String, u32>, String> {
    let section = doc
        .split("\n## Layers")
        .nth(1)
        .ok_or("docs/architecture.md has no `## Layers` section")?;
    let block = section
        .split("```text\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .ok_or("the `## Layers` section has no ```text block")?;
    let mut layers = BTreeMap::new();
    let mut current: Option<u32> = None;
    for row in block.lines() {
        let cells: Vec<&str> = row.split('|').collect();
        if cells.len() < 3 {
            continue;
        }
        let head = cells[0].trim();
        if head == "layer" {
            continue;
        }
        if !head.is_empty() {
            current = Some(
                head.parse()
                    .map_err(|_| format!("bad layer cell: {row:?}"))?,
            );
        }
        let Some(layer) = current else {
            return Err(format!("a continuation row before any layer: {row:?}"));
        };
        for module in cells[1].split(',').map(str::trim).filter(|m| !m.is_empty()) {
            if let Some(old) = layers.insert(module.to_owned(), layer) {
                return Err(format!("`{module}` is in layers {old} and {layer}"));
            }
        }
    }
    if layers.is_empty() {
        return Err("the layer table is empty".into());
    }
    Ok(layers)
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// `src` with comments (doc comments included), strings and char literals blanked out; line
/// breaks are kept, so line numbers still hold.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        let prev_ident = i > 0 && is_ident(b[i - 1]);
        if b[i..].starts_with(b"//") {
            let end = b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |n| i + n);
            blank(&mut out, i, end);
            i = end;
        } else if b[i..].starts_with(b"/*") {
            let (mut depth, mut j) = (1, i + 2);
            while j < b.len() && depth > 0 {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if b[i] == b'r'
            && (!prev_ident || (b[i - 1] == b'b' && (i < 2 || !is_ident(b[i - 2]))))
            && b[i + 1..].iter().find(|&&c| c != b'#') == Some(&b'"')
        {
            // A raw string: r"..." or r#"..."#, maybe after a b.
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            let start = i + 1 + hashes + 1;
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            let end = b[start..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |n| start + n + close.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(b.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\u{..}', 'é'), or else a lifetime or label.
            let rest = &src[i + 1..];
            let end = if rest.starts_with('\\') {
                rest.get(2..)
                    .and_then(|r| r.find('\''))
                    .map(|n| i + 1 + 2 + n + 1)
            } else {
                let c = rest.chars().next().map_or(0, char::len_utf8);
                rest[c..].starts_with('\'').then_some(i + 1 + c + 1)
            };
            match end {
                Some(end) => {
                    blank(&mut out, i, end);
                    i = end;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).expect("only ASCII bytes were written")
}

/// The module path of a file under `src/`: `hub.rs` and `hub/mod.rs` are `[hub]`, `hub/gate.rs`
/// is `[hub, gate]`, the crate roots `lib.rs` and `main.rs` are `[]`.
fn module_path(relative: &str) -> Vec<String> {
    let mut path: Vec<String> = relative
        .strip_suffix(".rs")
        .unwrap_or(relative)
        .split('/')
        .map(str::to_owned)
        .collect();
    if path.last().is_some_and(|last| last == "mod") || path == ["lib"] || path == ["main"] {
        path.pop();
    }
    path
}

/// The top-level module a file under `src/` belongs to: `hub.rs` and `hub/gate.rs` are `hub`.
fn module_of(relative: &str) -> String {
    let first = relative.split('/').next().unwrap_or(relative);
    first.strip_suffix(".rs").unwrap_or(first).to_owned()
}

/// Whether `word` stands alone at `at` in `code` (no identifier character either side).
fn word_at(code: &str, at: usize, word: &str) -> bool {
    let b = code.as_bytes();
    b[at..].starts_with(word.as_bytes())
        && (at == 0 || !is_ident(b[at - 1]))
        && b.get(at + word.len()).is_none_or(|&c| !is_ident(c))
}

/// The index of the first non-whitespace byte of `code` from `at`.
fn skip_space(code: &str, at: usize) -> usize {
    at + code.as_bytes()[at..]
        .iter()
        .take_while(|c| c.is_ascii_whitespace())
        .count()
}

/// Inline modules (`mod tests { .. }`) of `code`: name and byte range of the body.
fn inline_mods(code: &str) -> Vec<(String, usize, usize)> {
    let b = code.as_bytes();
    let mut mods = Vec::new();
    for at in 0..b.len() {
        if !word_at(code, at, "mod") {
            continue;
        }
        let name_at = skip_space(code, at + 3);
        let len = b[name_at..].iter().take_while(|&&c| is_ident(c)).count();
        let open = skip_space(code, name_at + len);
        if len == 0 || b.get(open) != Some(&b'{') {
            continue;
        }
        let mut depth = 0;
        let close = (open..b.len())
            .find(|&j| {
                match b[j] {
                    b'{' => depth += 1,
                    b'}' => depth -= 1,
                    _ => {}
                }
                depth == 0
            })
            .unwrap_or(b.len());
        mods.push((code[name_at..name_at + len].to_owned(), open, close));
    }
    mods
}

/// The top-level module each `crate::` and `super::` path of `code` (the code of a file whose
/// module path is `file`) leads into, with its line. A path that reaches the crate root gives the
/// segment after it, and a group there (`crate::{a::X, b}`) each of its items; `super::` is
/// resolved through the file's path and the inline modules around it (`mod tests`).
fn imports(code: &str, file: &[String]) -> Vec<(usize, String)> {
    let b = code.as_bytes();
    let line_of = |at: usize| b[..at].iter().filter(|&&c| c == b'\n').count() + 1;
    let ident_at = |at: usize| -> (usize, String) {
        let start = skip_space(code, at);
        let len = b[start..].iter().take_while(|&&c| is_ident(c)).count();
        (start, code[start..start + len].to_owned())
    };
    // `word` then `::` at `at`: the index after the `::`.
    let segment = |at: usize, word: &str| -> Option<usize> {
        if !word_at(code, at, word) {
            return None;
        }
        let colons = skip_space(code, at + word.len());
        b[colons..].starts_with(b"::").then_some(colons + 2)
    };
    let mods = inline_mods(code);
    let mut found = Vec::new();
    // A path starts at `at` unless it follows `::` or `$` (`$crate`, `other::crate`).
    let starts_path = |at: usize| {
        let before = &b[..at];
        let end = before.len()
            - before
                .iter()
                .rev()
                .take_while(|c| c.is_ascii_whitespace())
                .count();
        !before[..end].ends_with(b"::") && !before[..end].ends_with(b"$")
    };
    for at in 0..b.len() {
        let mut rest = if let Some(rest) = segment(at, "crate").filter(|_| starts_path(at)) {
            rest
        } else if let Some(mut rest) = segment(at, "super").filter(|_| starts_path(at)) {
            let mut path: Vec<&String> = file.iter().collect();
            path.extend(
                mods.iter()
                    .filter(|(_, open, close)| *open < at && at < *close)
                    .map(|(name, _, _)| name),
            );
            path.pop();
            while let Some(next) = segment(skip_space(code, rest), "super") {
                path.pop();
                rest = next;
            }
            if let Some(top) = path.first() {
                found.push((line_of(at), (*top).clone()));
                continue;
            }
            rest
        } else {
            continue;
        };
        rest = skip_space(code, rest);
        if b.get(rest) != Some(&b'{') {
            found.push((line_of(at), ident_at(rest).1));
            continue;
        }
        // A group: its top-level items.
        let (mut depth, mut item) = (0, rest + 1);
        for (j, &c) in b.iter().enumerate().skip(rest) {
            match c {
                b'{' => depth += 1,
                b'}' | b',' if depth == 1 => {
                    let (start, name) = ident_at(item);
                    if !name.is_empty() && name != "self" {
                        found.push((line_of(start), name));
                    }
                    item = j + 1;
                    if c == b'}' {
                        break;
                    }
                }
                b'}' => depth -= 1,
                _ => {}
            }
        }
    }
    found
}

/// Every rule the files break, as messages: unknown modules, imports of a higher layer, circles
/// within a layer. `files` are (path under `src/`, contents).
fn violations(files: &[(String, String)], layers: &BTreeMap<String, u32>) -> Vec<String> {
    let mut problems = Vec::new();
    // Same-layer edges, with where each was first seen.
    let mut edges: BTreeMap<(String, String), Site> = BTreeMap::new();
    for (path, text) in files {
        let from = module_of(path);
        let file = format!("src/{path}");
        let Some(&from_layer) = layers.get(&from) else {
            problems.push(format!(
                "{file}: module `{from}` has no layer in docs/architecture.md"
            ));
            continue;
        };
        for (line, segment) in imports(&code_only(text), &module_path(path)) {
            if segment.starts_with(|c: char| c.is_ascii_uppercase()) {
                problems.push(format!(
                    "{file}:{line}: `crate::{segment}` goes through the crate root (`lib`, the top \
                     layer): name the module that defines it"
                ));
                continue;
            }
            let to = segment;
            if to == from {
                continue;
            }
            let Some(&to_layer) = layers.get(&to) else {
                problems.push(format!(
                    "{file}:{line}: `crate::{to}` is not a module of the layer table in docs/architecture.md"
                ));
                continue;
            };
            if to_layer > from_layer {
                problems.push(format!(
                    "{file}:{line}: `{from}` (layer {from_layer}) imports `{to}` (layer {to_layer}): \
                     a module may only import its own layer or lower ones"
                ));
            } else if to_layer == from_layer {
                edges.entry((from.clone(), to)).or_insert(Site {
                    file: file.clone(),
                    line,
                });
            }
        }
    }
    // A circle: an edge a -> b where b leads back to a. Each circle is reported once.
    let mut seen: BTreeSet<BTreeSet<String>> = BTreeSet::new();
    for (a, b) in edges.keys() {
        let Some(path) = shortest_path(&edges, b, a) else {
            continue;
        };
        let members: BTreeSet<String> = path.iter().cloned().collect();
        if !seen.insert(members) {
            continue;
        }
        let mut circle = vec![a.clone()];
        circle.extend(path);
        let steps: Vec<String> = circle
            .windows(2)
            .map(|w| {
                let site = &edges[&(w[0].clone(), w[1].clone())];
                format!(
                    "`{}` imports `{}` ({}:{})",
                    w[0], w[1], site.file, site.line
                )
            })
            .collect();
        problems.push(format!(
            "circle in layer {}: {}",
            layers[a],
            steps.join(", ")
        ));
    }
    problems
}

/// The modules from `from` to `to` (both included) along `edges`, fewest steps first.
fn shortest_path(
    edges: &BTreeMap<(String, String), Site>,
    from: &str,
    to: &str,
) -> Option<Vec<String>> {
    let mut previous: BTreeMap<String, String> = BTreeMap::new();
    let mut queue = VecDeque::from([from.to_owned()]);
    let mut visited = BTreeSet::from([from.to_owned()]);
    while let Some(at) = queue.pop_front() {
        if at == to {
            let mut path = vec![at];
            while let Some(p) = previous.get(path.last().unwrap()) {
                path.push(p.clone());
            }
            path.reverse();
            return Some(path);
        }
        for (a, b) in edges.keys() {
            if *a == at && visited.insert(b.clone()) {
                previous.insert(b.clone(), a.clone());
                queue.push_back(b.clone());
            }
        }
    }
    None
}

/// Every `.rs` file under `dir`, but `src/bin/`, as (path under `src/`, contents).
fn sources(src: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let relative = path
            .strip_prefix(src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if path.is_dir() {
            if relative != "bin" {
                sources(src, &path, out);
            }
        } else if relative.ends_with(".rs") {
            out.push((relative, std::fs::read_to_string(&path).unwrap()));
        }
    }
}

#[test]
fn modules_import_one_way() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let layers = parse_layers(&doc).unwrap_or_else(|e| panic!("docs/architecture.md: {e}"));
    let src = root.join("src");
    let mut files = Vec::new();
    sources(&src, &src, &mut files);
    assert!(
        files.len() > 20,
        "found only {} files under src/",
        files.len()
    );
    let problems = violations(&files, &layers);
    assert!(
        problems.is_empty(),
        "{} layering problem(s) (see docs/architecture.md):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
    // Every module of the table exists: a stale row would let a new module of that name in.
    let modules: BTreeSet<String> = files.iter().map(|(p, _)| module_of(p)).collect();
    let stale: Vec<&String> = layers.keys().filter(|m| !modules.contains(*m)).collect();
    assert!(
        stale.is_empty(),
        "docs/architecture.md lists modules that do not exist: {stale:?}"
    );
}

#[test]
fn the_check_finds_upward_imports_circles_and_unknown_modules() {
    let layers = parse_layers(
        "# x\n\n## Layers\n\n```text\nlayer | modules | owns\n  2   | node, hub, | top\n      | users | \n  1   | wire | bottom\n```\n",
    )
    .unwrap();
    assert_eq!(layers["users"], 2);
    assert_eq!(layers["wire"], 1);
    let file = |path: &str, text: &str| (path.to_owned(), text.to_owned());
    let clean = [
        file(
            "node.rs",
            "use crate::hub::Hub;\nuse crate::wire::Outbox;\n",
        ),
        file("hub/mod.rs", "use crate::{wire::{Outbox, Push}, users};\n"),
        file("wire/outbox.rs", "use super::member::Member;\n"),
    ];
    assert_eq!(violations(&clean, &layers), Vec::<String>::new());

    let upward = [file(
        "wire/outbox.rs",
        "use std::sync::Arc;\n\nuse crate::{node::Node};\n",
    )];
    let problems = violations(&upward, &layers);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("src/wire/outbox.rs:3: `wire` (layer 1) imports `node` (layer 2)"),
        "{problems:?}"
    );

    let circle = [
        file("node.rs", "fn f() { crate::hub::go() }\n"),
        file("hub/mod.rs", "\nuse crate::users::Users;\n"),
        file("users.rs", "use crate::node;\n"),
    ];
    let problems = violations(&circle, &layers);
    assert_eq!(
        problems,
        [
            "circle in layer 2: `hub` imports `users` (src/hub/mod.rs:2), `users` imports `node` \
          (src/users.rs:1), `node` imports `hub` (src/node.rs:1)"
        ]
    );

    let unknown = [
        file("shiny.rs", "use crate::wire::Outbox;\n"),
        file("node.rs", "use crate::Error;\nuse crate::nowhere::X;\n"),
    ];
    let problems = violations(&unknown, &layers);
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(
        problems[0].contains("module `shiny` has no layer"),
        "{problems:?}"
    );
    assert!(
        problems[1].starts_with("src/node.rs:1: `crate::Error` goes through the crate root"),
        "{problems:?}"
    );
    assert!(
        problems[2].starts_with("src/node.rs:2: `crate::nowhere` is not a module"),
        "{problems:?}"
    );
}

#[test]
fn comments_strings_and_macros_are_not_imports() {
    let text = r####"//! See [`crate::node::Node`].
/// Uses `crate::node` and `super::node`.
// crate::node
/* crate::node /* nested crate::node */ */
pub(crate) fn f<'a>(s: &'a str) -> char {
    let _ = "crate::node \" crate::node";
    let _ = r#"crate::node " super::node"#;
    let _ = b"crate::node";
    let _ = '"';
    let _ = '\'';
    macro_rules! m { () => { $crate::node::x() } }
    other_crate::node::x();
    crate::wire::go();
    'x'
}
"####;
    assert_eq!(
        imports(&code_only(text), &module_path("node.rs")),
        [(13, "wire".to_owned())]
    );
}

#[test]
fn super_paths_resolve_through_the_file_and_its_inline_modules() {
    assert_eq!(module_path("hub.rs"), ["hub"]);
    assert_eq!(module_path("auth/mod.rs"), ["auth"]);
    assert_eq!(module_path("hub/gate.rs"), ["hub", "gate"]);
    assert!(module_path("lib.rs").is_empty());
    let found = |path: &str, text: &str| imports(&code_only(text), &module_path(path));
    let owned = |pairs: &[(usize, &str)]| -> Vec<(usize, String)> {
        pairs.iter().map(|&(l, m)| (l, m.to_owned())).collect()
    };
    // In a top-level file `super` is the crate root; in `mod tests` it is the file's module.
    let text = "use super::wire::Outbox;\npub(super) fn f() {}\nmod tests {\n    use super::*;\n    use super :: super::{hub, node::Node};\n}\nuse super::{node, self};\n";
    assert_eq!(
        found("users.rs", text),
        owned(&[
            (1, "wire"),
            (4, "users"),
            (5, "hub"),
            (5, "node"),
            (7, "node")
        ])
    );
    // In `hub/gate.rs`, `super` is `hub` and `super::super` the crate root.
    let text = "use super::Hub;\nuse super::super::wire::Outbox;\nmod tests { mod deeper { use super::super::super::node; } }\n";
    assert_eq!(
        found("hub/gate.rs", text),
        owned(&[(1, "hub"), (2, "wire"), (3, "hub")])
    );

    let layers =
        parse_layers("# x\n## Layers\n```text\n2 | node, hub | top\n1 | wire | bottom\n```\n")
            .unwrap();
    let file = |path: &str, text: &str| (path.to_owned(), text.to_owned());
    let clean = [
        file(
            "hub/gate.rs",
            "use super::Hub;\nuse super::super::wire::Outbox;\n",
        ),
        file(
            "hub.rs",
            "#[cfg(test)]\nmod tests {\n    use super::*;\n}\n",
        ),
        file("wire/outbox.rs", "use super::Member;\n"),
    ];
    assert_eq!(violations(&clean, &layers), Vec::<String>::new());
    let upward = [
        file("wire/frame.rs", "use super::super::node::Node;\n"),
        file(
            "wire.rs",
            "#[cfg(test)]\nmod tests {\n    use super::super::{hub::Hub, wire};\n}\n",
        ),
    ];
    assert_eq!(
        violations(&upward, &layers),
        [
            "src/wire/frame.rs:1: `wire` (layer 1) imports `node` (layer 2): a module may only \
             import its own layer or lower ones",
            "src/wire.rs:3: `wire` (layer 1) imports `hub` (layer 2): a module may only import \
             its own layer or lower ones",
        ]
    );
}
