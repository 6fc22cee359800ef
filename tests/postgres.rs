//! What only the PostgreSQL store has to show: migrations that several instances may run
//! at once, a query plan on an index for every statement a request or a message makes,
//! and no password in its errors. The behaviour it shares with the other stores is in
//! store_conformance.rs. Runs on the server named by `TWINS_TEST_POSTGRES_URL`.

mod common;

use futures::future::join_all;
use sqlx::Connection as _;

use common::backend::{self, Backend};
use twins::store::Store;

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
        assert_eq!(migrations, 1);
        // And once more on a migrated database.
        Store::connect(&url).await.expect("reopen");
    })
    .await;
}

/// Every statement of a request or of ingestion can run on an index: with sequential
/// scans priced out, none is left in its plan.
#[tokio::test]
async fn every_query_has_an_index() {
    backend::run(Backend::Postgres, async {
        let url = backend::database_url(&std::env::temp_dir());
        Store::connect(&url).await.expect("open");
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        sqlx::raw_sql("SET enable_seqscan = off")
            .execute(&mut conn)
            .await
            .expect("set");
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
            let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "EXPLAIN {query}"
            )))
            .fetch_all(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("EXPLAIN {query}: {e}"));
            let plan = plan.join("\n");
            assert!(
                !plan.contains("Seq Scan"),
                "no index serves {query}:\n{plan}"
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
