//! A throwaway PostgreSQL 15 cluster with pg_realtime preloaded, for integration tests.
//!
//! The extension must already be installed into the system PostgreSQL (`cargo pgrx install`);
//! `scripts/test` does that. Servers refuse to run as root, so the cluster runs as `postgres`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const BIN: &str = "/usr/lib/postgresql/15/bin";
/// The HS256 secret every test cluster is configured with.
pub const JWT_SECRET: &str = "integration-test-secret-with-at-least-32-bytes";

pub struct Cluster {
    pub data: PathBuf,
    pub pg_port: u16,
    pub ws_port: u16,
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn as_postgres(program: &str, args: &[&str]) -> Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--", program])
        .args(args)
        .output()
        .expect("runuser runs")
}

fn check(what: &str, output: Output) -> Output {
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

impl Cluster {
    /// A new cluster with the extension preloaded and created in database `postgres`.
    /// `settings` are extra postgresql.conf lines.
    pub fn start(name: &str, settings: &[&str]) -> Cluster {
        Self::start_with(name, settings, true)
    }

    /// Like [`Cluster::start`]; `preload: false` leaves pg_realtime out of
    /// shared_preload_libraries and does not create the extension.
    pub fn start_with(name: &str, settings: &[&str], preload: bool) -> Cluster {
        let data = PathBuf::from(format!("/tmp/pg_realtime_it/{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(data.parent().expect("parent")).expect("mkdir");
        std::fs::create_dir_all(&data).expect("mkdir");
        check(
            "chown",
            Command::new("chown")
                .args(["postgres:postgres", "/tmp/pg_realtime_it"])
                .arg(&data)
                .output()
                .expect("chown"),
        );
        let data_str = data.to_str().expect("utf-8 path").to_owned();
        let data_str = data_str.as_str();
        check(
            "initdb",
            as_postgres(
                &format!("{BIN}/initdb"),
                &[
                    "-D",
                    data_str,
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                ],
            ),
        );
        let cluster = Cluster {
            data,
            pg_port: free_port(),
            ws_port: free_port(),
        };
        let mut conf = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\n\
             max_prepared_transactions = 4\nrealtime.port = {}\nrealtime.listen_addresses = '127.0.0.1'\n\
             realtime.jwt_secret = '{JWT_SECRET}'\nrealtime.connect_error_delay = 0\nrealtime.join_error_delay = 0\n",
            cluster.pg_port, data_str, cluster.ws_port
        );
        if preload {
            conf.push_str("shared_preload_libraries = 'pg_realtime'\n");
        }
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        let conf_path = cluster.data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).expect("postgresql.conf");
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).expect("write postgresql.conf");
        cluster.pg_ctl(&["start", "-w"]);
        if preload {
            cluster.execute("CREATE EXTENSION pg_realtime");
            cluster.execute("SELECT realtime.setup_api_roles()");
        }
        cluster
    }

    pub fn pg_ctl(&self, args: &[&str]) {
        let log = self.data.join("server.log");
        let mut all = vec![
            "-D",
            self.data.to_str().expect("utf-8"),
            "-l",
            log.to_str().expect("utf-8"),
        ];
        all.extend_from_slice(args);
        check("pg_ctl", as_postgres(&format!("{BIN}/pg_ctl"), &all));
    }

    pub fn connection_string(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.pg_port
        )
    }

    pub fn connect(&self) -> postgres::Client {
        postgres::Client::connect(&self.connection_string(), postgres::NoTls).expect("connect")
    }

    /// Runs SQL in its own connection; panics on error.
    pub fn execute(&self, sql: &str) {
        self.connect()
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("server.log")).unwrap_or_default()
    }

    /// The pid of the pg_realtime background worker, if it runs (None while the server is
    /// unreachable, e.g. during crash recovery).
    pub fn worker_pid(&self) -> Option<i32> {
        let mut c = postgres::Client::connect(&self.connection_string(), postgres::NoTls).ok()?;
        c.query_opt(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_realtime'",
            &[],
        )
        .ok()
        .flatten()
        .map(|row| row.get(0))
    }

    pub fn path(&self) -> &Path {
        &self.data
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres(
            &format!("{BIN}/pg_ctl"),
            &[
                "-D",
                self.data.to_str().unwrap_or_default(),
                "stop",
                "-m",
                "immediate",
            ],
        );
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// Polls `condition` until it holds or `limit` passes; returns whether it held. Used to wait
/// for asynchronous effects, never to assert how long something took.
pub fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
