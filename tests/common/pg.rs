//! Integration tests on PostgreSQL: with `SWITCHBOARD_TEST_STORAGE=postgres` (and the server in
//! `SWITCHBOARD_TEST_POSTGRES`, which scripts/test starts), the servers these tests start keep
//! their store in a PostgreSQL schema of their own instead of a SQLite file.
#![allow(dead_code)]

use std::path::Path;

/// The node name test servers run under on PostgreSQL (what `with_store` writes calls as).
pub const NODE: &str = "test-node";

/// Whether this run is the PostgreSQL one.
pub fn enabled() -> bool {
    std::env::var("SWITCHBOARD_TEST_STORAGE").is_ok_and(|v| v == "postgres")
}

/// The connection string for the schema standing for the database file `db`: the same file name
/// gives the same schema (so a restarted server finds its calls), created empty the first time.
/// `None` when this is not the PostgreSQL run.
pub fn url_for(db: &Path) -> Option<String> {
    if !enabled() {
        return None;
    }
    assert!(
        server().is_some(),
        "SWITCHBOARD_TEST_STORAGE=postgres needs SWITCHBOARD_TEST_POSTGRES"
    );
    schema_url(db)
}

/// The test server's connection string, if there is one; under CI there must be.
pub fn server() -> Option<String> {
    match std::env::var("SWITCHBOARD_TEST_POSTGRES") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "SWITCHBOARD_TEST_POSTGRES is not set: CI runs the PostgreSQL tests (scripts/test starts a server)"
            );
            None
        }
    }
}

/// The connection string for the schema standing for `db` (see [`url_for`]), whichever run this
/// is; `None` without a test server.
pub fn schema_url(db: &Path) -> Option<String> {
    let admin = server()?;
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    db.hash(&mut h);
    let schema = format!("it_{:016x}", h.finish());
    let admin2 = admin.clone();
    let create = schema.clone();
    // The driver blocks on a runtime of its own: never on a test's tokio thread.
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&admin2, postgres::NoTls).expect("test PostgreSQL");
        c.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {create}"))
            .expect("creates the schema");
    })
    .join()
    .expect("schema thread");
    Some(format!("{admin} options='-c search_path={schema}'"))
}

/// Runs `f` on the store the server at `db` uses (SQLite file or PostgreSQL schema), on a thread of
/// its own.
pub fn with_store<T: Send>(
    db: &Path,
    f: impl FnOnce(&mut switchboard::storage::Store) -> T + Send,
) -> T {
    let url = url_for(db);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut store = match url {
                Some(u) => {
                    let mut s = switchboard::storage::Store::open_postgres(&u).expect("connects");
                    s.set_node(NODE);
                    s
                }
                None => switchboard::storage::Store::open(db).expect("opens"),
            };
            f(&mut store)
        })
        .join()
        .expect("store thread")
    })
}

/// Runs `f` on a PostgreSQL store at `url`, on a thread of its own.
pub fn with_postgres<T: Send>(
    url: &str,
    f: impl FnOnce(&mut switchboard::storage::Store) -> T + Send,
) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut store = switchboard::storage::Store::open_postgres(url).expect("connects");
            f(&mut store)
        })
        .join()
        .expect("store thread")
    })
}
