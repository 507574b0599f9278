//! The etcd `veer demo --fleet` shares its rollout through: a one-member etcd of its own,
//! started on loopback ephemeral ports with a throwaway data dir, or one the user already runs
//! (`--etcd URL`).
//!
//! The demo's own etcd is started like the test harness starts it: ports chosen by the kernel
//! and handed to etcd (a start that loses a port to another process is retried on fresh ones),
//! tight Raft timing so leases of a couple of seconds are granted as asked, readiness polled on
//! `GET /health` with a deadline. It runs in its own process group, so a Ctrl-C in the terminal
//! reaches veer only and veer stops it; dropping [`DemoEtcd`] kills it and removes its files.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Where to look for `etcd` after `PATH`, colon-separated; `VEER_DEMO_ETCD_DIRS` replaces it
/// (empty: `PATH` only). Debian's `etcd-server` installs `/usr/bin/etcd`, and some accounts'
/// `PATH` lacks the sbin directories.
const FALLBACK_DIRS: &str = "/usr/sbin:/usr/bin";

/// How many times a start is retried on fresh ports after one was taken before etcd bound it.
const START_ATTEMPTS: usize = 4;

/// How long etcd may take to answer healthy on a loaded machine.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// Why the demo has no etcd to run against.
#[derive(Debug, thiserror::Error)]
pub(super) enum EtcdError {
    /// No `etcd` binary: what to install, or how to use an existing etcd instead.
    #[error(
        "`veer demo --fleet` needs etcd, and no `etcd` binary is on PATH or in {dirs}.\n\
         Install one (Debian/Ubuntu: `apt-get install etcd-server`; elsewhere: \
         https://etcd.io/docs/latest/install/) and run the demo again, or point it at an etcd \
         you already run: `veer demo --fleet --etcd http://127.0.0.1:2379` (its keys go under \
         a fresh /veer-demo/ prefix, deleted at the end)"
    )]
    Missing {
        /// The directories searched after `PATH`.
        dirs: String,
    },
    /// etcd could not be started or did not become healthy.
    #[error("cannot start etcd ({bin}): {why}")]
    Start {
        /// The binary that was run.
        bin: String,
        /// What went wrong, with the end of etcd's log when there is one.
        why: String,
    },
}

/// The etcd of one demo run.
pub(super) struct DemoEtcd {
    url: String,
    /// The process and its files, when the demo started it.
    own: Option<Own>,
}

/// The demo's own etcd process.
struct Own {
    child: Child,
    /// Its data and logs, removed with it.
    dir: PathBuf,
    /// The log of this process.
    log: PathBuf,
}

impl DemoEtcd {
    /// An etcd the user runs at `url`.
    pub(super) fn existing(url: String) -> DemoEtcd {
        DemoEtcd { url, own: None }
    }

    /// Starts a one-member etcd with its files in `dir` (created; removed on drop).
    pub(super) async fn start(dir: &Path) -> Result<DemoEtcd, EtcdError> {
        let bin = find_etcd()?;
        let fail = |why: String| EtcdError::Start { bin: bin.display().to_string(), why };
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
        for attempt in 1..=START_ATTEMPTS {
            // Held together so the two ports differ, released just before etcd binds them.
            let held: Vec<TcpListener> = (0..2)
                .map(|_| TcpListener::bind("127.0.0.1:0"))
                .collect::<Result<_, _>>()
                .map_err(|e| fail(format!("cannot bind a loopback port: {e}")))?;
            let ports: Vec<u16> = held.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.port()).collect();
            let (client, peer) = (format!("http://127.0.0.1:{}", ports[0]), format!("http://127.0.0.1:{}", ports[1]));
            let log_path = dir.join(format!("etcd-{attempt}.log"));
            let log =
                File::create(&log_path).map_err(|e| fail(format!("cannot create {}: {e}", log_path.display())))?;
            let log2 = log.try_clone().map_err(|e| fail(e.to_string()))?;
            drop(held);
            let child = Command::new(&bin)
                .args(["--name", "demo", "--data-dir"])
                .arg(dir.join(format!("data-{attempt}")))
                .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("demo={peer}"), "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &format!("veer-demo-{}-{attempt}", std::process::id())])
                // Fast Raft timing: etcd then grants leases down to 1 s, as the demo's 2 s asks.
                .args(["--heartbeat-interval=50", "--election-timeout=600"])
                .args(["--quota-backend-bytes=134217728", "--logger=zap", "--log-outputs=stderr"])
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .process_group(0)
                .spawn()
                .map_err(|e| fail(format!("cannot run it: {e}")))?;
            let own = Own { child, dir: dir.to_path_buf(), log: log_path.clone() };
            let mut etcd = DemoEtcd { url: client, own: Some(own) };
            match etcd.ready().await {
                Ok(()) => return Ok(etcd),
                Err(Exit::PortTaken) if attempt < START_ATTEMPTS => {
                    // Only the process goes; the directory holds the next attempt.
                    if let Some(mut own) = etcd.own.take() {
                        let _ = own.child.kill();
                        let _ = own.child.wait();
                    }
                }
                Err(Exit::PortTaken) => return Err(fail(format!("a port was taken every time:\n{}", tail(&log_path)))),
                Err(Exit::Failed(why)) => return Err(fail(format!("{why}; the end of its log:\n{}", tail(&log_path)))),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// The client URL.
    pub(super) fn url(&self) -> &str {
        &self.url
    }

    /// Waits until the demo's etcd answers healthy, or says why it will not.
    async fn ready(&mut self) -> Result<(), Exit> {
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let uri: http::Uri = format!("{}/health", self.url).parse().map_err(|e| Exit::Failed(format!("{e}")))?;
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(own) = &mut self.own
                && let Ok(Some(status)) = own.child.try_wait()
            {
                let taken = std::fs::read_to_string(&own.log).is_ok_and(|l| l.contains("address already in use"));
                return Err(if taken { Exit::PortTaken } else { Exit::Failed(format!("it exited ({status})")) });
            }
            let answer = tokio::time::timeout(Duration::from_secs(1), client.get(uri.clone())).await;
            if let Ok(Ok(resp)) = answer
                && let Ok(body) = resp.into_body().collect().await
                && String::from_utf8_lossy(&body.to_bytes()).contains(r#""health":"true""#)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Exit::Failed(format!("not healthy within {}s", READY_WITHIN.as_secs())));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deletes the demo's keys from an etcd the user runs (the demo's own etcd goes whole).
    pub(super) async fn clean(&self, prefix: &str) {
        if self.own.is_some() {
            return;
        }
        let opts = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
        if let Ok(mut c) = etcd_client::Client::connect([self.url.as_str()], Some(opts)).await {
            let del = c.delete(format!("{prefix}/"), Some(etcd_client::DeleteOptions::new().with_prefix()));
            let _ = tokio::time::timeout(Duration::from_secs(2), del).await;
        }
    }
}

impl Drop for DemoEtcd {
    fn drop(&mut self) {
        if let Some(mut own) = self.own.take() {
            let _ = own.child.kill();
            let _ = own.child.wait();
            let _ = std::fs::remove_dir_all(&own.dir);
        }
    }
}

/// Why a started etcd is not ready.
enum Exit {
    /// It lost a port to another process before binding it: try fresh ones.
    PortTaken,
    /// Anything else.
    Failed(String),
}

/// The `etcd` binary: on `PATH`, else in [`FALLBACK_DIRS`] (or `VEER_DEMO_ETCD_DIRS`).
fn find_etcd() -> Result<PathBuf, EtcdError> {
    let dirs = std::env::var("VEER_DEMO_ETCD_DIRS").unwrap_or_else(|_| FALLBACK_DIRS.to_string());
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(dirs.split(':').filter(|d| !d.is_empty()).map(PathBuf::from))
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .ok_or(EtcdError::Missing {
            dirs: if dirs.is_empty() { "nowhere else".into() } else { dirs.replace(':', ", ") },
        })
}

/// The last lines of etcd's log, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
