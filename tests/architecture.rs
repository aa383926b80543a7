//! The layout keeps its shape: the modules of `src/` import each other without a cycle, so a
//! record's way reads one way (README, "How a record travels"), and `pipeline.rs`, the contract
//! between the stages, imports no stage.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → the top-level modules its files name as `crate::{module}`.
fn module_imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        // Only the code: a unit test module may reach anywhere.
        let code = text.split("#[cfg(test)]").next().unwrap();
        let imports = graph.entry(module.clone()).or_default();
        for (index, _) in code.match_indices("crate::") {
            let rest = &code[index + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module && name != "self" {
                imports.insert(name);
            }
        }
        // `use crate::{a, b}` groups.
        for (index, _) in code.match_indices("crate::{") {
            let rest = &code[index + "crate::{".len()..];
            let group = &rest[..rest.find('}').unwrap_or(0)];
            for item in group.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    imports.insert(name);
                }
            }
        }
    }
    graph
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// A cycle through `module`, if any (depth-first search).
fn cycle_from(
    graph: &BTreeMap<String, BTreeSet<String>>,
    module: &str,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    if let Some(start) = path.iter().position(|m| m == module) {
        let mut cycle = path[start..].to_vec();
        cycle.push(module.to_string());
        return Some(cycle);
    }
    path.push(module.to_string());
    for next in graph.get(module).into_iter().flatten() {
        if let Some(cycle) = cycle_from(graph, next, path) {
            return Some(cycle);
        }
    }
    path.pop();
    None
}

#[test]
fn the_modules_import_each_other_without_a_cycle() {
    let graph = module_imports();
    assert!(graph.contains_key("pipeline") && graph.contains_key("buffer"));
    for module in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, module, &mut Vec::new()) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_pipeline_imports_no_stage() {
    let graph = module_imports();
    let stages = ["consume", "route", "buffer", "upload", "commit", "app"];
    let imported: Vec<&String> = graph["pipeline"]
        .iter()
        .filter(|m| stages.contains(&m.as_str()))
        .collect();
    assert!(imported.is_empty(), "pipeline.rs imports {imported:?}");
}

/// The stages that run as their own threads or tasks, in the order a record meets them. Each
/// imports only what lies downstream of it; `route` (the pure function the buffer workers call
/// on each record) and `checkpoint` (the state they persist, which sealed batches carry on)
/// import no stage at all.
#[test]
fn no_stage_imports_one_upstream_of_it() {
    let graph = module_imports();
    let stages = ["consume", "buffer", "upload", "commit"];
    for (position, stage) in stages.iter().enumerate() {
        let upstream: Vec<&String> = graph[*stage]
            .iter()
            .filter(|m| stages[..position].contains(&m.as_str()))
            .collect();
        assert!(upstream.is_empty(), "{stage} imports {upstream:?}");
    }
    for library in [
        "route",
        "checkpoint",
        "layout",
        "rules",
        "retry",
        "schedule",
    ] {
        let imported: Vec<&String> = graph[library]
            .iter()
            .filter(|m| stages.contains(&m.as_str()) || *m == "app")
            .collect();
        assert!(imported.is_empty(), "{library} imports {imported:?}");
    }
}
