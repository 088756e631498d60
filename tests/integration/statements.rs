//! Every SQL statement the store runs is named, listed by
//! `txrelay::store::statements()`, and prepared here against a migrated
//! schema: a statement that names a missing column, a wrong type or a bad
//! predicate fragment fails here, not on the one code path that runs it.
//!
//! The list stays complete by construction checked below: no statement in
//! `src/store/` is written inline (a literal, `concat!` or `format!` handed
//! to sqlx), so each one is a `const NAME: &str` (or a `fn …_sql` when it is
//! built at run time), and each such name must be listed by `statements()`
//! or `unprepared_statements()`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::common::TestDb;

/// `const` items of `src/store/` typed `&str` that are not statements.
const NOT_STATEMENTS: &[&str] = &[
    // The prefix of the LISTEN/NOTIFY channel name (`due_channel`).
    "PREFIX",
    // A `#[cfg(test)]` alias of `STATS`, for the unit test in outbox.rs.
    "STATS_SQL",
];

#[tokio::test]
async fn every_store_statement_prepares_against_the_migrated_schema() {
    let db = TestDb::new().await;
    let statements = txrelay::store::statements();
    assert!(statements.len() >= 40, "only {} statements listed: is the list complete?", statements.len());

    let mut names = BTreeSet::new();
    for (name, sql) in &statements {
        assert!(names.insert(*name), "{name} is listed twice");
        assert!(!sql.trim().is_empty(), "{name} is empty");
    }
    for (name, _) in txrelay::store::unprepared_statements() {
        assert!(names.insert(name), "{name} is listed both as prepared and as unprepared");
    }

    let mut connection = db.store.pool().acquire().await.expect("a connection");
    let mut failures = Vec::new();
    for (name, sql) in &statements {
        let prepared =
            sqlx::Executor::prepare(&mut *connection, sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(sql.clone())))
                .await;
        if let Err(error) = prepared {
            failures.push(format!("{name}: {error}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} store statements do not prepare against the migrated schema:\n{}",
        failures.len(),
        statements.len(),
        failures.join("\n")
    );
}

/// The store's source files, with their names.
fn store_sources() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/store");
    let mut sources = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("src/store") {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("a source file");
            sources.push((path.file_name().unwrap().to_string_lossy().into_owned(), text));
        }
    }
    sources.sort();
    assert!(sources.len() >= 5, "src/store/*.rs not found in {}", dir.display());
    sources
}

/// Whether `arg` (what follows a call's opening parenthesis) begins with SQL
/// written in place rather than a named statement.
fn inline_sql(arg: &str) -> bool {
    let arg = arg.trim_start();
    let arg = arg.strip_prefix('&').unwrap_or(arg).trim_start();
    if let Some(inner) = arg.strip_prefix("sqlx::AssertSqlSafe(").or_else(|| arg.strip_prefix("AssertSqlSafe(")) {
        return inline_sql(inner);
    }
    ["\"", "r\"", "r#", "concat!", "format!", "std::format!"].iter().any(|start| arg.starts_with(start))
}

#[test]
fn no_store_statement_is_written_inline() {
    // Functions of sqlx that take a statement's text as first argument.
    let calls = [
        "sqlx::query",
        "sqlx::query_as",
        "sqlx::query_scalar",
        "sqlx::query_with",
        "sqlx::query_as_with",
        "sqlx::query_scalar_with",
        "sqlx::raw_sql",
        "sqlx::AssertSqlSafe",
    ];
    // Executor methods that take a statement's text.
    let methods = [".execute(", ".fetch(", ".fetch_one(", ".fetch_all(", ".fetch_optional(", ".prepare("];
    let mut inline = Vec::new();
    for (file, text) in store_sources() {
        for (number, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            // Sqlx calls (with or without a turbofish) and executor methods,
            // read up to the end of the file so a first argument on the next
            // line is seen too.
            let rest_of_file = &text[byte_offset(&text, number)..];
            for call in calls {
                for (at, _) in line.match_indices(call) {
                    let after = &rest_of_file[at + call.len()..];
                    // `sqlx::query_as` also starts `sqlx::query_as_with`, and
                    // `sqlx::query` also starts `sqlx::query::QueryAs`: only
                    // the exact name, called, counts.
                    let after = match after.strip_prefix("::<") {
                        Some(generics) => match generics.find(">(") {
                            Some(end) => &generics[end + 1..],
                            None => continue,
                        },
                        None => after,
                    };
                    if let Some(arg) = after.strip_prefix('(')
                        && inline_sql(arg)
                    {
                        inline.push(format!("{file}:{}: {}", number + 1, line.trim()));
                    }
                }
            }
            for method in methods {
                for (at, _) in line.match_indices(method) {
                    if inline_sql(&rest_of_file[at + method.len()..]) {
                        inline.push(format!("{file}:{}: {}", number + 1, line.trim()));
                    }
                }
            }
            // A statement bound to a local first (`let sql = "…"`) is inline too.
            if let Some(value) = line.trim_start().strip_prefix("let sql = ")
                && inline_sql(value)
            {
                inline.push(format!("{file}:{}: {}", number + 1, line.trim()));
            }
        }
    }
    assert!(
        inline.is_empty(),
        "SQL written inline in src/store/: name it (a `const NAME: &str`, or a `fn …_sql` for text built at \
         run time) and list it in store::statements() or store::unprepared_statements():\n{}",
        inline.join("\n")
    );
}

/// Where line `number` (from 0) of `text` begins.
fn byte_offset(text: &str, number: usize) -> usize {
    text.split_inclusive('\n').take(number).map(str::len).sum()
}

/// The identifier of an item declared on `line` as `<keyword> NAME…`, after
/// any visibility, when it is one.
fn declared<'a>(line: &'a str, keyword: &str) -> Option<&'a str> {
    let mut line = line.trim_start();
    for visibility in ["pub(crate) ", "pub(super) ", "pub "] {
        line = line.strip_prefix(visibility).unwrap_or(line);
    }
    let rest = line.strip_prefix(keyword)?;
    let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

#[test]
fn every_named_store_statement_is_listed() {
    let listed: BTreeSet<&str> = txrelay::store::statements()
        .into_iter()
        .map(|(name, _)| name)
        .chain(txrelay::store::unprepared_statements().into_iter().map(|(name, _)| name))
        .collect();
    let mut unlisted = Vec::new();
    let mut found = 0;
    for (file, text) in store_sources() {
        for (number, line) in text.lines().enumerate() {
            // `const NAME: &str = …`: a statement, unless known not to be.
            if let Some(name) = declared(line, "const ") {
                let typed = line.trim_start().trim_start_matches(|c: char| c != ':');
                let is_str = typed.starts_with(": &str") || typed.starts_with(": &'static str");
                if is_str && !NOT_STATEMENTS.contains(&name) {
                    found += 1;
                    if !listed.contains(name) {
                        unlisted.push(format!("{file}:{}: const {name}", number + 1));
                    }
                }
            }
            // `fn name_sql(…) -> String`: a statement built at run time.
            if let Some(name) = declared(line, "fn ")
                && name.ends_with("_sql")
            {
                found += 1;
                if !listed.contains(name) {
                    unlisted.push(format!("{file}:{}: fn {name}", number + 1));
                }
            }
        }
    }
    assert!(found >= 40, "only {found} named statements found in src/store/: has the scan gone blind?");
    assert!(
        unlisted.is_empty(),
        "named statements in src/store/ missing from store::statements() and store::unprepared_statements() \
         (the name listed must be the const's or fn's identifier):\n{}",
        unlisted.join("\n")
    );
}
