//! Runs the supabase-js suite (`pgrx-tests/js`, real `@supabase/supabase-js` from npm) against a
//! fresh cluster. `scripts/test` installs the npm packages first (`npm ci`).

use realtime_integration_tests::{Cluster, JWT_SECRET, run_js};
use std::time::Duration;

/// Longer than the suite ever takes; only a hang reaches it.
const SUITE_LIMIT: Duration = Duration::from_secs(900);

#[test]
fn supabase_js_suite() {
    let cluster = Cluster::start("supabase_js", &[]);
    // database.test.js SIGKILLs the worker to show that clients come back.
    cluster.expect_kill();
    let (ok, said) = run_js(
        "npm",
        &["test"],
        &[
            (
                "PG_REALTIME_HTTP_URL",
                format!("http://127.0.0.1:{}", cluster.ws_port),
            ),
            (
                "PG_REALTIME_PG_URL",
                format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.pg_port),
            ),
            ("PG_REALTIME_JWT_SECRET", JWT_SECRET.to_owned()),
        ],
        SUITE_LIMIT,
    );
    println!("{said}");
    if !ok {
        eprintln!("--- server log ---\n{}", cluster.log());
    }
    assert!(ok, "the supabase-js suite failed");
}
