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

use crate::common::{TestDb, bulk_insert};

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

/// While VACUUM is held back, `unsent_transactions` is almost all dead
/// tuples, and ANALYZE (or VACUUM) records it as holding almost no rows.
/// The planner then prices a lookup by a column an index holds second as
/// low as a lookup by its first: to it, either reads about one entry. In
/// fact the first walks the whole index, dead entries included, for each
/// row (100–240 ms per recorded batch in the held run's collapsed minute,
/// docs/benchmarks-history.md). So every statement that reads the listing
/// must reach it through an index's leading column, whatever the
/// statistics say: checked here on each statement's generic plan, with and
/// without sequential scans (the bookkeeping and the ingest connections),
/// right after an ANALYZE that saw only dead rows.
#[tokio::test]
async fn with_the_listing_analyzed_as_empty_every_statement_reads_it_by_a_leading_key() {
    let db = TestDb::new().await;
    // Autovacuum would race the statistics this test sets.
    db.execute("ALTER TABLE unsent_transactions SET (autovacuum_enabled = false)").await;
    db.execute(&bulk_insert("dead", 20_000, 100)).await;
    // Sent by hand: the triggers delete each listing, which stays a dead
    // tuple and a dead index entry until a VACUUM.
    db.execute("UPDATE transactions SET message_id = 'm-' || id, queue_sent_at = now()").await;
    db.execute("ANALYZE unsent_transactions").await;
    db.execute(&bulk_insert("live", 5, 5)).await;
    let leading = [
        ("unsent_transactions_pkey", "id"),
        ("unsent_transactions_due_idx", "due_at"),
        ("unsent_transactions_wallet_idx", "wallet_address"),
    ];
    let mut connection = db.store.pool().acquire().await.expect("a connection");
    let mut wrong = Vec::new();
    for (name, sql) in txrelay::store::statements() {
        if !sql.contains("unsent_transactions") {
            continue;
        }
        for seqscan in ["off", "on"] {
            let mut tx = sqlx::Connection::begin(&mut *connection).await.unwrap();
            let settings = format!(
                "SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = {seqscan}; \
                 SET LOCAL txrelay.relay_writes = on"
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(settings)).execute(&mut *tx).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PREPARE planned AS {sql}"))).execute(&mut *tx).await.unwrap();
            let parameters: i64 = sqlx::query_scalar(
                "SELECT coalesce(cardinality(parameter_types), 0)::int8 FROM pg_prepared_statements WHERE name = 'planned'",
            )
            .fetch_one(&mut *tx)
            .await
            .unwrap();
            let arguments = vec!["NULL"; usize::try_from(parameters).unwrap()].join(", ");
            let explain = if arguments.is_empty() {
                "EXPLAIN (FORMAT JSON) EXECUTE planned".to_owned()
            } else {
                format!("EXPLAIN (FORMAT JSON) EXECUTE planned({arguments})")
            };
            let plan: serde_json::Value =
                sqlx::query_scalar(sqlx::AssertSqlSafe(explain)).fetch_one(&mut *tx).await.unwrap();
            tx.rollback().await.unwrap();
            sqlx::raw_sql("DEALLOCATE planned").execute(&mut *connection).await.unwrap();
            let mut nodes = Vec::new();
            plan_nodes(&plan[0]["Plan"], &mut nodes);
            for node in nodes {
                let index = node["Index Name"].as_str().unwrap_or_default();
                let condition = node["Index Cond"].as_str().unwrap_or_default();
                let on_the_listing = node["Relation Name"] == "unsent_transactions";
                let found = match node["Node Type"].as_str().unwrap_or_default() {
                    "Seq Scan" if on_the_listing => Some("a sequential scan".to_owned()),
                    "Index Scan" | "Index Only Scan" | "Bitmap Index Scan" => leading
                        .iter()
                        .find(|(known, _)| *known == index)
                        .filter(|(_, column)| !led_by(condition, column))
                        .map(|(_, column)| format!("{index} with `{condition}`, not by {column}")),
                    _ => None,
                };
                if let Some(found) = found
                    && !READ_WHOLE.contains(&name)
                {
                    wrong.push(format!("{name} (enable_seqscan = {seqscan}): {found}"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{} reads of the listing walk an index:\n{}", wrong.len(), wrong.join("\n"));
}

/// Statements that read the whole listing by design: the gauges count it,
/// and `doctor` counts the rows missing from it.
const READ_WHOLE: &[&str] = &["GAUGES", "COUNT_DRIFT"];

/// Whether an index condition bounds the scan by `column`: one of its
/// conjuncts compares `column` itself (or a row that starts with it).
fn led_by(condition: &str, column: &str) -> bool {
    condition.split(" AND ").any(|conjunct| {
        let operand = conjunct.trim_start_matches('(');
        let operand = operand.strip_prefix("ROW(").unwrap_or(operand);
        operand.strip_prefix(column).is_some_and(|rest| rest.starts_with([' ', ')', ',']))
    })
}

/// Every node of an `EXPLAIN (FORMAT JSON)` plan, depth first.
fn plan_nodes<'a>(node: &'a serde_json::Value, into: &mut Vec<&'a serde_json::Value>) {
    into.push(node);
    for child in node["Plans"].as_array().into_iter().flatten() {
        plan_nodes(child, into);
    }
}
