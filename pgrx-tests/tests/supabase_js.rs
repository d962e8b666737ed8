//! Runs the supabase-js suite (`pgrx-tests/js`, real `@supabase/supabase-js` from npm) against a
//! fresh cluster. `scripts/test` installs the npm packages first (`npm ci`).

use realtime_integration_tests::{Cluster, JWT_SECRET};
use std::path::Path;
use std::process::Command;

#[test]
fn supabase_js_suite() {
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("js");
    assert!(
        js.join("node_modules/@supabase/supabase-js").exists(),
        "run `npm ci` in {} first (scripts/test does)",
        js.display()
    );
    let cluster = Cluster::start("supabase_js", &[]);
    // database.test.js SIGKILLs the worker to show that clients come back.
    cluster.expect_kill();
    let status = Command::new("npm")
        .arg("test")
        .current_dir(&js)
        .env(
            "PG_REALTIME_HTTP_URL",
            format!("http://127.0.0.1:{}", cluster.ws_port),
        )
        .env(
            "PG_REALTIME_PG_URL",
            format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.pg_port),
        )
        .env("PG_REALTIME_JWT_SECRET", JWT_SECRET)
        .status()
        .expect("npm runs");
    if !status.success() {
        eprintln!("--- server log ---\n{}", cluster.log());
    }
    assert!(status.success(), "the supabase-js suite failed");
}
