//! txrelay: a transactional-outbox relay. Every payment transaction is
//! committed to PostgreSQL before it is handed to SQS, and whatever is not
//! sent yet is delivered by a relay loop that survives outages, replicas
//! and restarts.

pub mod auth;
pub mod cli;
pub mod duration;
pub mod hex;
pub mod http;
pub mod metrics;
pub mod operator;
pub mod queue;
pub mod relay;
pub mod runtime;
pub mod secret;
pub mod spec;
pub mod store;
pub mod telemetry;
pub mod transaction;

/// The house's layering, checked on the source: data flows one way, `cli`
/// → (`operator`, `http`) → `runtime` (the assembly floor: config,
/// settings, the registry, the lifecycle) → `relay` → (`store`, `queue`) → (`spec`, `transaction`,
/// `metrics`) → the small helpers. No module imports a higher one, and no
/// two modules import each other.
#[cfg(test)]
mod layering {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    const LEVELS: &[(&str, u8)] = &[
        ("cli", 6),
        ("operator", 5),
        ("http", 5),
        ("runtime", 4),
        ("relay", 3),
        ("store", 2),
        ("queue", 2),
        ("spec", 1),
        ("transaction", 1),
        ("metrics", 1),
        ("auth", 0),
        ("secret", 0),
        ("duration", 0),
        ("hex", 0),
        ("telemetry", 0),
    ];

    fn level(module: &str) -> u8 {
        LEVELS
            .iter()
            .find(|(m, _)| *m == module)
            .map(|(_, l)| *l)
            .unwrap_or_else(|| panic!("{module}: give it a level"))
    }

    /// `crate::X` references of every module, from its files.
    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut files = vec![src.clone()];
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            let relative = path.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
            let module = relative.split(['/', '.']).next().unwrap().to_owned();
            if module == "lib" || module == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let uses = found.entry(module.clone()).or_default();
            for (i, _) in text.match_indices("crate::") {
                let name: String =
                    text[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if name != module && !name.is_empty() {
                    uses.insert(name);
                }
            }
        }
        found
    }

    #[test]
    fn no_module_imports_a_higher_one() {
        for (module, uses) in imports() {
            for used in uses {
                assert!(
                    level(&used) <= level(&module),
                    "{module} (level {}) uses crate::{used} (level {})",
                    level(&module),
                    level(&used)
                );
            }
        }
    }

    #[test]
    fn no_two_modules_import_each_other() {
        let imports = imports();
        for (module, uses) in &imports {
            for used in uses {
                let back = imports.get(used).is_some_and(|u| u.contains(module));
                assert!(!back, "{module} and {used} import each other");
            }
        }
    }

    #[test]
    fn the_operator_and_the_relay_stay_where_they_belong() {
        let imports = imports();
        for forbidden in ["cli", "http"] {
            assert!(!imports["operator"].contains(forbidden), "operator uses crate::{forbidden}");
        }
        for forbidden in ["runtime", "http", "operator", "cli"] {
            assert!(!imports["relay"].contains(forbidden), "relay uses crate::{forbidden}");
        }
    }

    /// The relay is built by the assembly floor and never reaches back up
    /// into it: settings, the registry and the lifecycle stay out of it.
    #[test]
    fn the_relay_imports_no_runtime() {
        let imports = imports();
        assert!(!imports["relay"].contains("runtime"), "relay uses crate::runtime");
        assert!(imports["runtime"].contains("relay"), "the layering scan no longer sees src/runtime/");
    }
}
