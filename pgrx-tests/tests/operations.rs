//! What an operator sees: `GET /metrics` (off by default, a token when set, counters that move,
//! a scrape `promtool` accepts) and the inspector page (embedded files, security headers, and
//! driven in headless Chromium).

use realtime_integration_tests::{Cluster, Socket, eventually, js_dir, jwt, run_js};
use serde_json::json;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// An HTTP answer: status, headers (names in lower case), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`, so the body ends with it).
fn http(
    cluster: &Cluster,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", cluster.ws_port)).expect("connect");
    s.set_read_timeout(Some(WAIT)).ok();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

fn get(cluster: &Cluster, path: &str, headers: &[(&str, &str)]) -> Answer {
    http(cluster, "GET", path, headers, "")
}

/// The value of one series in a scrape, e.g. `realtime_joins_total{result="ok",reason="none"}`.
fn try_value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

fn value(scrape: &str, series: &str) -> f64 {
    try_value(scrape, series).unwrap_or_else(|| panic!("no series {series} in\n{scrape}"))
}

fn scrape(cluster: &Cluster) -> String {
    let a = get(cluster, "/metrics", &[]);
    assert_eq!(a.status, 200, "{}", a.text());
    a.text()
}

/// `ALTER SYSTEM` (which may not share a transaction with anything), then a reload.
fn reload(cluster: &Cluster, alter_system: &str) {
    cluster.execute(alter_system);
    cluster.execute("SELECT pg_reload_conf()");
}

/// `promtool check metrics` on a scrape; fails the test when promtool is not installed
/// (`scripts/deps.sh` installs Debian's `prometheus` package, which has it).
fn promtool_check(scrape: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!(
            "promtool is needed to check the metrics scrape ({e}); install Debian's `prometheus` \
             package (scripts/deps.sh does)"
        ),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(scrape.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check metrics refused the scrape:\n{}{}\n--- scrape ---\n{scrape}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_are_off_until_turned_on_count_what_happens_and_pass_promtool() {
    let cluster = Cluster::start("ops_metrics", &[]);
    assert_eq!(get(&cluster, "/metrics", &[]).status, 404, "off by default");

    reload(&cluster, "ALTER SYSTEM SET realtime.metrics = on");
    assert!(
        eventually(WAIT, || get(&cluster, "/metrics", &[]).status == 200),
        "a reload turns them on"
    );
    let before = scrape(&cluster);
    assert!(
        before.contains("# TYPE realtime_authorization_seconds histogram"),
        "{before}"
    );
    assert!(value(&before, "realtime_worker_cpu_seconds_total") > 0.0);

    // A public join, a client broadcast, a message from SQL, one over REST, a refused private
    // join (no policy lets anon read).
    let token = jwt(json!({}));
    let mut s = Socket::connect(&cluster, &token, "1.0.0");
    let config = json!({"broadcast": {"self": true}, "private": false});
    assert_eq!(s.join("ops-room", config)["status"], "ok");
    let r = s.next_ref();
    s.push(
        Some("1"),
        &r,
        "realtime:ops-room",
        "broadcast",
        json!({"type": "broadcast", "event": "hi", "payload": {"n": 1}}),
    );
    assert!(
        s.recv_event("broadcast", WAIT).is_some(),
        "own broadcast back"
    );
    cluster.execute("SELECT realtime.send('{\"n\": 2}', 'db', 'ops-room', false)");
    assert!(
        s.recv_event("broadcast", WAIT).is_some(),
        "database message"
    );
    let body = json!({"messages": [{"topic": "ops-room", "event": "rest", "payload": {"n": 3}}]});
    let rest = http(
        &cluster,
        "POST",
        "/realtime/v1/api/broadcast",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &format!("Bearer {token}")),
        ],
        &body.to_string(),
    );
    assert_eq!(rest.status, 202, "{}", rest.text());
    assert!(s.recv_event("broadcast", WAIT).is_some(), "REST message");
    let refused = s.join("ops-private", json!({"private": true}));
    assert_eq!(refused["status"], "error", "{refused}");
    // A message-only transaction that skips the disk wait.
    cluster.execute(
        "SET realtime.send_synchronous_commit = off; \
         SELECT realtime.send('{\"n\": 4}', 'db', 'ops-room', false)",
    );

    let grew = |series: &str, by: f64| {
        let series = series.to_string();
        let base = value(&before, &series);
        move |now: &str| value(now, &series) >= base + by
    };
    let checks = [
        grew("realtime_joins_total{result=\"ok\",reason=\"none\"}", 1.0),
        grew(
            "realtime_joins_total{result=\"refused\",reason=\"read_denied\"}",
            1.0,
        ),
        grew("realtime_messages_in_total{source=\"client\"}", 1.0),
        grew("realtime_messages_in_total{source=\"database\"}", 1.0),
        grew("realtime_messages_in_total{source=\"rest\"}", 1.0),
        grew("realtime_messages_out_total", 4.0),
        grew("realtime_bytes_out_total", 100.0),
        grew("realtime_authorization_seconds_count", 1.0),
    ];
    let mut last = String::new();
    assert!(
        eventually(WAIT, || {
            last = scrape(&cluster);
            checks.iter().all(|check| check(&last))
        }),
        "the counters moved:\n{last}"
    );
    assert!(value(&last, "realtime_connections") >= 1.0);
    // What the worker reports once a second: the commit queue, its counters, its memory.
    assert!(
        eventually(WAIT, || {
            last = scrape(&cluster);
            try_value(&last, "realtime_committed_messages_total").is_some_and(|v| v >= 1.0)
                && try_value(&last, "realtime_commit_queue_size_bytes").is_some_and(|v| v > 0.0)
                && try_value(&last, "realtime_worker_memory_bytes").is_some_and(|v| v > 0.0)
                && try_value(&last, "realtime_async_commits_total").is_some_and(|v| v >= 1.0)
                && try_value(&last, "realtime_unwatched_commits_total").is_some()
        }),
        "the worker's figures:\n{last}"
    );
    assert!(value(&last, "realtime_channels") >= 1.0);
    promtool_check(&last);

    // Counters stay when their connection ends.
    let out = value(&last, "realtime_messages_out_total");
    drop(s);
    assert!(eventually(WAIT, || {
        let now = scrape(&cluster);
        value(&now, "realtime_connections") == 0.0
            && value(&now, "realtime_messages_out_total") >= out
    }));

    // With a token, only a scraper that sends it gets the numbers.
    reload(
        &cluster,
        "ALTER SYSTEM SET realtime.metrics_token = 'scrape-s3cret'",
    );
    assert!(
        eventually(WAIT, || get(&cluster, "/metrics", &[]).status == 401),
        "a token is required once set"
    );
    let wrong = get(
        &cluster,
        "/metrics",
        &[("Authorization", "Bearer scrape-s3cres")],
    );
    assert_eq!(wrong.status, 401);
    assert!(wrong.text().is_empty(), "no numbers without the token");
    let right = get(
        &cluster,
        "/metrics",
        &[("Authorization", "Bearer scrape-s3cret")],
    );
    assert_eq!(right.status, 200);
    assert!(right.text().contains("realtime_connections"));
    let shown: String = cluster
        .connect()
        .query_one("SHOW realtime.metrics_token", &[])
        .unwrap()
        .get(0);
    assert_eq!(shown, "********", "the token is not shown");

    reload(&cluster, "ALTER SYSTEM SET realtime.metrics = off");
    assert!(eventually(WAIT, || get(
        &cluster,
        "/metrics",
        &[("Authorization", "Bearer scrape-s3cret")]
    )
    .status
        == 404));
}

/// The page's files are the ones in the repository, served with the security headers, and the
/// status endpoint needs a valid token; `realtime.inspector = off` removes all of it.
#[test]
fn the_inspector_is_served_from_the_binary_and_can_be_turned_off() {
    let cluster = Cluster::start("ops_inspector", &[]);
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/realtime-server/assets");
    for (path, file, kind) in [
        ("/inspector", "inspector.html", "text/html"),
        ("/inspector/inspector.js", "inspector.js", "text/javascript"),
        ("/inspector/inspector.css", "inspector.css", "text/css"),
        ("/inspector/supabase.js", "supabase.js", "text/javascript"),
        ("/inspector/favicon.svg", "favicon.svg", "image/svg+xml"),
    ] {
        let a = get(&cluster, path, &[]);
        assert_eq!(a.status, 200, "{path}");
        assert_eq!(
            a.body,
            std::fs::read(assets.join(file)).expect("asset"),
            "{path} is {file}"
        );
        assert!(
            a.header("content-type")
                .is_some_and(|t| t.starts_with(kind))
        );
        assert_eq!(
            a.header("content-security-policy"),
            Some("default-src 'self'; connect-src 'self' ws: wss:"),
            "{path}"
        );
        assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(
            a.header("access-control-allow-origin"),
            None,
            "{path}: not readable by pages of other origins"
        );
    }
    assert_eq!(get(&cluster, "/inspector/other.js", &[]).status, 404);

    assert_eq!(get(&cluster, "/inspector/status", &[]).status, 401);
    let bad = get(
        &cluster,
        "/inspector/status",
        &[("Authorization", "Bearer not-a-jwt")],
    );
    assert_eq!(bad.status, 401);
    let token = jwt(json!({}));
    let _socket = Socket::connect(&cluster, &token, "2.0.0");
    let auth = format!("Bearer {token}");
    let status = get(&cluster, "/inspector/status", &[("Authorization", &auth)]);
    assert_eq!(status.status, 200, "{}", status.text());
    let body: serde_json::Value = serde_json::from_slice(&status.body).expect("JSON");
    assert!(
        body["connections"].as_u64().is_some_and(|n| n >= 1),
        "{body}"
    );

    reload(&cluster, "ALTER SYSTEM SET realtime.inspector = off");
    assert!(
        eventually(WAIT, || get(&cluster, "/inspector", &[]).status == 404),
        "a reload turns the page off"
    );
    assert_eq!(get(&cluster, "/inspector/supabase.js", &[]).status, 404);
    assert_eq!(
        get(&cluster, "/inspector/status", &[("Authorization", &auth)]).status,
        404
    );
}

/// The vendored supabase-js UMD build is the pinned npm package's file, byte for byte.
#[test]
fn vendored_supabase_js_is_the_pinned_package() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let package = js_dir("@supabase/supabase-js").join("node_modules/@supabase/supabase-js");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(package.join("package.json")).expect("package.json"))
            .expect("JSON");
    let readme = std::fs::read_to_string(root.join("../crates/realtime-server/assets/README.md"))
        .expect("assets README");
    let version = manifest["version"].as_str().expect("a version");
    assert!(
        readme.contains(&format!("**{version}**")),
        "the assets README names supabase-js {version}"
    );
    let vendored = std::fs::read(root.join("../crates/realtime-server/assets/supabase.js"))
        .expect("vendored supabase.js");
    let pinned = std::fs::read(package.join("dist/umd/supabase.js")).expect("the package's file");
    assert!(
        vendored == pinned,
        "crates/realtime-server/assets/supabase.js differs from supabase-js {version}'s \
         dist/umd/supabase.js: copy it again (see crates/realtime-server/assets/README.md)"
    );
}

/// Where test artifacts go: `<target>/test-artifacts`.
fn artifacts() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("test-artifacts")
}

/// The inspector in a real headless Chromium (`js/inspector/inspector.mjs`): join a public topic
/// with a pasted token, see a `realtime.send` and the page's own broadcast, the presence and the
/// connection count, then the refusal reason of a private join; nothing fetched from elsewhere.
#[test]
fn the_inspector_works_in_headless_chromium() {
    js_dir("playwright-core");
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "the inspector test needs Debian's `chromium` package (scripts/deps.sh installs it)"
    );
    let cluster = Cluster::start("ops_chromium", &[]);
    let screenshot = artifacts().join("inspector.png");
    let _ = std::fs::remove_file(&screenshot);
    let (ok, said) = run_js(
        "node",
        &["inspector/inspector.mjs"],
        &[
            (
                "PG_REALTIME_HTTP_URL",
                format!("http://127.0.0.1:{}", cluster.ws_port),
            ),
            (
                "PG_REALTIME_PG_URL",
                format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.pg_port),
            ),
            ("PG_REALTIME_TOKEN", jwt(json!({}))),
            ("PG_REALTIME_PUBLIC_TOPIC", "inspector-room".to_owned()),
            ("PG_REALTIME_PRIVATE_TOPIC", "inspector-secret".to_owned()),
            ("PG_REALTIME_SCREENSHOT", screenshot.display().to_string()),
        ],
        Duration::from_secs(300),
    );
    if !ok {
        eprintln!("--- server log ---\n{}", cluster.log());
    }
    assert!(ok, "the inspector run failed:\n{said}");
    assert!(
        screenshot.exists(),
        "a screenshot at {}",
        screenshot.display()
    );
}
