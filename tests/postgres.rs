//! What only the PostgreSQL store has to show: migrations that several instances may run
//! at once, a query plan on an index for every statement a request or a message makes,
//! and no password in its errors. The behaviour it shares with the other stores is in
//! store_conformance.rs. Runs on the server named by `TWINS_TEST_POSTGRES_URL`.

mod common;

use futures::future::join_all;
use sqlx::Connection as _;

use common::backend::{self, Backend};
use twins::store::{Store, sql};

/// Instances starting together on an empty database all come up, and the schema is
/// migrated once.
#[tokio::test]
async fn instances_starting_together_migrate_once() {
    backend::run(Backend::Postgres, async {
        let url = backend::database_url(&std::env::temp_dir());
        let opened = join_all((0..4).map(|_| Store::connect(&url))).await;
        for store in &opened {
            if let Err(e) = store {
                panic!("a store did not open: {e}");
            }
        }
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        let migrations: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&mut conn)
                .await
                .expect("count migrations");
        let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
            .expect("the migrations folder")
            .count();
        assert_eq!(usize::try_from(migrations).ok(), Some(files));
        // And once more on a migrated database.
        Store::connect(&url).await.expect("reopen");
    })
    .await;
}

/// A connection to a migrated database of the test's own whose planner prices
/// sequential scans out, so that a plan still holding one has no index to use.
async fn planner_without_seqscan() -> sqlx::PgConnection {
    let url = backend::database_url(&std::env::temp_dir());
    Store::connect(&url).await.expect("open");
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::raw_sql("SET enable_seqscan = off")
        .execute(&mut conn)
        .await
        .expect("set");
    conn
}

/// The plan of `query`, which must have no sequential scan.
async fn indexed_plan(conn: &mut sqlx::PgConnection, query: &str) -> String {
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {query}")))
        .fetch_all(conn)
        .await
        .unwrap_or_else(|e| panic!("EXPLAIN {query}: {e}"));
    let plan = plan.join("\n");
    assert!(
        !plan.contains("Seq Scan"),
        "no index serves {query}:\n{plan}"
    );
    plan
}

/// Every statement of a request or of ingestion can run on an index: with sequential
/// scans priced out, none is left in its plan.
#[tokio::test]
async fn every_query_has_an_index() {
    backend::run(Backend::Postgres, async {
        let mut conn = planner_without_seqscan().await;
        let queries = [
            "SELECT * FROM twins WHERE id = 'a' AND owner = 'o'",
            "SELECT * FROM twins WHERE owner = 'o' ORDER BY pos LIMIT 10 OFFSET 0",
            "SELECT COUNT(*) FROM twins WHERE owner = 'o' AND name = 'n'",
            "SELECT COUNT(*) FROM twins WHERE owner = 'o' AND metadata @> '{\"a\": 1}'",
            "SELECT DISTINCT twin_id FROM twin_attributes WHERE channel = 'c' AND (subtopic = 's' OR subtopic = '*')",
            "DELETE FROM twin_attributes WHERE twin_id = 't'",
            "SELECT * FROM states WHERE twin_id = 't' ORDER BY id DESC LIMIT 1",
            "SELECT * FROM states WHERE twin_id = 't' AND id >= 10 ORDER BY id LIMIT 10",
            "SELECT * FROM states WHERE twin_id = 't' AND created >= 0 AND created < 10",
            "SELECT * FROM documents WHERE twin_id = 't' ORDER BY name",
            "SELECT * FROM documents WHERE twin_id = 't' AND name = 'desired'",
            "SELECT seq FROM ingest_cursors WHERE twin_id = ANY(ARRAY['a', 'b'])",
            "SELECT seq FROM ingest_groups WHERE grp = 'g'",
        ];
        for query in queries {
            indexed_plan(&mut conn, query).await;
        }
    })
    .await;
}

/// A statement of the store with its numbered parameters replaced by these literals.
fn with_literals(statement: &str, literals: &[&str]) -> String {
    // From the highest number down, so that `$1` never eats the start of `$10`.
    literals
        .iter()
        .enumerate()
        .rev()
        .fold(statement.to_owned(), |q, (i, lit)| {
            q.replace(&format!("${}", i + 1), lit)
        })
}

/// The statements of the history endpoints and of retention, as the store sends them,
/// each read through an index: with sequential scans priced out, none is left in their
/// plans, and none sorts a twin's states.
#[tokio::test]
async fn history_queries_have_an_index() {
    use twins::store::{postgres, sql};
    backend::run(Backend::Postgres, async {
        let mut conn = planner_without_seqscan().await;
        // Plans of tables with rows and statistics, as in service: an empty table is
        // priced as if sorting it cost nothing.
        sqlx::raw_sql(
            "INSERT INTO twins (id, owner, name, revision, created, updated, definitions, metadata)
                SELECT 't' || g, 'o', 'n', 0, 0, 0, '[]', '{}' FROM generate_series(1, 2000) g;
             INSERT INTO states (twin_id, id, definition, created, payload)
                SELECT 't', g, 0, g * 1000, '{\"temp\": 1}' FROM generate_series(0, 19999) g;
             ANALYZE",
        )
        .execute(&mut conn)
        .await
        .expect("fill");
        let window = ["'t'", "0", "9000000000000000000"];
        let queries = [
            with_literals(sql::STATE_ID_BOUNDS, &["'t'"]),
            with_literals(sql::RANGE_COUNT, &window),
            with_literals(
                sql::RANGE_PAGE,
                &["'t'", "0", "9000000000000000000", "100", "500000"],
            ),
            with_literals(sql::STATE_AT, &["'t'", "5"]),
            with_literals(sql::WINDOW_SHAPE, &window),
            with_literals(sql::STATES_BETWEEN, &["'t'", "500000", "500099"]),
            with_literals(postgres::SUMMARY, &window),
            with_literals(postgres::VALUE_AT[0], &["'t'", "5", "'temp'"]),
            with_literals(postgres::VALUE_AT[1], &["'t'", "5", "'temp'"]),
            with_literals(sql::TWIN_IDS_AFTER, &["''", "100"]),
            with_literals(sql::FIRST_STATES, &["'t'", "1000"]),
            with_literals(sql::DELETE_STATES_BEFORE, &["'t'", "1000"]),
        ];
        for query in queries {
            let plan = indexed_plan(&mut conn, &query).await;
            // The outer sort of a range page orders its page only (LIMIT rows).
            let sorts = plan.matches("Sort Key").count();
            let page_sort = usize::from(query.contains("ORDER BY s.created, s.id"));
            assert!(
                sorts <= page_sort,
                "{query} sorts the states instead of reading them in index order:\n{plan}"
            );
        }
    })
    .await;
}

/// The statements of document revisions, as the store sends them, run on the primary key
/// (twin_id, name, version): no history query scans a table.
#[tokio::test]
async fn document_revision_queries_use_the_primary_key() {
    backend::run(Backend::Postgres, async {
        let mut conn = planner_without_seqscan().await;
        let with_twin = sql::DELETE_TWIN_ROWS
            .into_iter()
            .find(|s| s.contains("document_revisions"))
            .expect("deleting a twin deletes its revisions");
        let statements = [
            (sql::COUNT_REVISIONS, "'t', 'd'"),
            (sql::REVISION_PAGE, "'t', 'd', 10, 20"),
            (sql::SELECT_REVISION, "'t', 'd', 3"),
            (sql::REVISION_AT, "'t', 'd', 1588668099142000000"),
            (sql::PRUNE_REVISIONS, "'t', 'd', 3"),
            (sql::DELETE_REVISIONS, "'t', 'd'"),
            (with_twin, "'t'"),
        ];
        for (i, (statement, args)) in statements.into_iter().enumerate() {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "PREPARE revisions_{i} AS {statement}"
            )))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("PREPARE {statement}: {e}"));
            let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "EXPLAIN EXECUTE revisions_{i}({args})"
            )))
            .fetch_all(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("EXPLAIN {statement}: {e}"));
            let plan = plan.join("\n");
            assert!(
                !plan.contains("Seq Scan") && plan.contains("document_revisions_pkey"),
                "the primary key does not serve {statement}:\n{plan}"
            );
        }
    })
    .await;
}

/// A failed connection names the server but never the password.
#[tokio::test]
async fn connection_errors_never_show_the_password() {
    let url = "postgres://twins:s3cr3t-pw@127.0.0.1:1/twins";
    let err = match Store::connect(url).await {
        Ok(_) => panic!("nothing listens on port 1"),
        Err(e) => twins::error::chain(&e),
    };
    assert!(!err.contains("s3cr3t-pw"), "{err}");
    let err = match Store::connect("postgres://twins:s3cr3t-pw@[::1/x").await {
        Ok(_) => panic!("not a URL"),
        Err(e) => twins::error::chain(&e),
    };
    assert!(!err.contains("s3cr3t-pw"), "{err}");
}

/// `sslmode` in the URL is followed through rustls: `require` encrypts (the store's
/// connections show up as TLS in `pg_stat_ssl`), `verify-full` refuses a server whose
/// certificate no trusted root signed (the machine's self-signed one).
#[tokio::test]
async fn tls_follows_the_url() {
    backend::run(Backend::Postgres, async {
        let url = backend::database_url(&std::env::temp_dir());
        let database = url.rsplit('/').next().expect("a database").to_owned();
        let store = Store::connect(&format!("{url}?sslmode=require"))
            .await
            .expect("a TLS connection (the server must have ssl = on)");
        store.ping().await.expect("ping over TLS");
        let mut plain = sqlx::PgConnection::connect(&format!("{url}?sslmode=disable"))
            .await
            .expect("connect without TLS");
        let (tls, clear): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE s.ssl), COUNT(*) FILTER (WHERE NOT s.ssl)
             FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid
             WHERE a.datname = $1",
        )
        .bind(&database)
        .fetch_one(&mut plain)
        .await
        .expect("read pg_stat_ssl");
        assert!(tls >= 1, "no TLS connection of the store");
        assert_eq!(clear, 1, "only this check's own connection is in the clear");
        let refused = Store::connect(&format!("{url}?sslmode=verify-full")).await;
        assert!(
            refused.is_err(),
            "a self-signed server certificate was accepted"
        );
    })
    .await;
}
