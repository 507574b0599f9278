//! Real etcd for tests: one or three `etcd` processes on 127.0.0.1, each with its own ephemeral
//! client and peer ports and a data dir in a temp dir, so fleet mode is tested against the
//! server it runs against in production rather than a mock.
//!
//! - Ports are chosen by the kernel (bind `127.0.0.1:0`, then release) and handed to etcd; when
//!   something takes one in between, etcd exits with "address already in use" and the whole
//!   cluster is started again on fresh ports (a bounded number of times).
//! - Every wait polls with a deadline (`GET /health`, the member's status) and prints the tail
//!   of each member's log when it gives up; no wait is a bare sleep.
//! - Members can be stopped (SIGTERM: a leader hands its leadership over first), killed
//!   (SIGKILL), paused and resumed (SIGSTOP/SIGCONT), and restarted on the same data dir and
//!   ports, rejoining the cluster.
//! - Drop kills and reaps every process; the temp dir, data and logs go with it.
#![allow(dead_code)]

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{find_tool, skip_unless_required};

/// The env var that makes a missing `etcd` binary fail the test instead of skipping it
/// (`.ci/run` sets it).
pub const REQUIRE_ETCD: &str = "VEER_REQUIRE_ETCD";

/// How many times a start is retried on fresh ports after a port was taken before etcd bound it.
const START_ATTEMPTS: usize = 5;

/// How long a cluster (or a restarted member) may take to become healthy on a loaded machine
/// before the wait fails with the members' logs.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// How long a SIGTERM'd member may take to exit before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(10);

/// Raft timing of the members.
///
/// The defaults are tighter than etcd's (100 ms / 1000 ms) so failovers in tests take about a
/// second, yet leave a wide margin for a loaded two-core machine: a spurious election needs the
/// leader silent for a whole election timeout. They also keep etcd's minimum lease TTL at 1 s
/// (etcd raises any TTL below `1.5 × election timeout`, rounded up to whole seconds); with
/// etcd's defaults a lease asked for 1 s is granted 2 s.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// `--heartbeat-interval`: how often the leader tells followers it is alive.
    pub heartbeat: Duration,
    /// `--election-timeout`: how long a follower waits without a heartbeat before it starts an
    /// election (randomised by etcd between 1× and 2× this).
    pub election: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing { heartbeat: Duration::from_millis(50), election: Duration::from_millis(600) }
    }
}

impl Timing {
    /// etcd's own defaults, to see what a production cluster does (e.g. lease TTL rounding).
    pub fn etcd_defaults() -> Timing {
        Timing { heartbeat: Duration::from_millis(100), election: Duration::from_millis(1000) }
    }

    /// The shortest lease TTL etcd grants with this timing: `3/2 × election ticks` heartbeats,
    /// rounded up to whole seconds (etcd 3.4 `etcdserver.NewServer`, `lease.NewLessor`).
    pub fn min_lease_ttl(&self) -> Duration {
        let hb = self.heartbeat.as_millis() as u64;
        let ticks = self.election.as_millis() as u64 / hb;
        let min_ms = (3 * ticks / 2) * hb;
        Duration::from_secs(min_ms.div_ceil(1000))
    }
}

/// One member: its ports and files, and its process while it runs.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    /// Length of the log when the current process started: what it wrote comes after.
    log_start: usize,
    child: Option<Child>,
    paused: bool,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// Running and not paused: it takes part in the cluster.
    fn up(&self) -> bool {
        self.child.is_some() && !self.paused
    }
}

/// A running etcd cluster of real processes. See the module doc.
pub struct Etcd {
    bin: PathBuf,
    timing: Timing,
    /// Keeps the data dirs and logs; removed on drop, after the processes are gone.
    dir: tempfile::TempDir,
    token: String,
    members: Vec<Member>,
    /// Which start attempt produced the running cluster (1 unless ports were taken).
    attempts: usize,
}

/// Why a start attempt did not produce a healthy cluster.
enum StartFailure {
    /// A port was taken between choosing it and etcd binding it: try again on fresh ports.
    PortTaken,
}

impl Etcd {
    /// Starts a cluster of `members` (1 or 3) with [`Timing::default`], healthy when it returns.
    /// `None` (after saying so loudly) when no `etcd` binary is installed and
    /// `VEER_REQUIRE_ETCD` is not `1`.
    pub async fn start(members: usize) -> Option<Etcd> {
        Etcd::start_with(members, Timing::default()).await
    }

    /// [`Etcd::start`] with chosen Raft timing.
    pub async fn start_with(members: usize, timing: Timing) -> Option<Etcd> {
        Etcd::launch(members, timing, None).await
    }

    /// [`Etcd::start`], but the first attempt uses `ports` (the client then the peer port of
    /// each member) instead of ports the kernel chose: a test hands it a taken port and sees
    /// the start move to fresh ones.
    pub async fn start_first_on(members: usize, ports: Vec<u16>) -> Option<Etcd> {
        assert_eq!(ports.len(), 2 * members, "a client and a peer port per member");
        Etcd::launch(members, Timing::default(), Some(ports)).await
    }

    async fn launch(members: usize, timing: Timing, mut first: Option<Vec<u16>>) -> Option<Etcd> {
        assert!(members == 1 || members == 3, "an etcd cluster of 1 or 3 members, not {members}");
        let Some(bin) = find_tool("etcd") else {
            let test = std::thread::current().name().unwrap_or("an etcd test").to_string();
            skip_unless_required(REQUIRE_ETCD, &test, "no `etcd` binary (apt-get install etcd-server)");
            return None;
        };
        let dir = tempfile::Builder::new().prefix("veer-etcd-").tempdir().expect("tempdir for etcd");
        let mut etcd = Etcd { bin, timing, dir, token: String::new(), members: Vec::new(), attempts: 0 };
        for attempt in 1..=START_ATTEMPTS {
            etcd.attempts = attempt;
            match etcd.try_start(members, attempt, first.take()).await {
                Ok(()) => return Some(etcd),
                Err(StartFailure::PortTaken) => etcd.discard_members(),
            }
        }
        panic!("etcd: a port was taken before etcd could bind it, {START_ATTEMPTS} times in a row");
    }

    /// One attempt: fresh ports, fresh data dirs, a cluster token of its own (members of an
    /// earlier attempt or another test's cluster that reach these ports are refused).
    async fn try_start(&mut self, n: usize, attempt: usize, given: Option<Vec<u16>>) -> Result<(), StartFailure> {
        // Held together so the 2n ports are distinct, released just before etcd binds them.
        let held: Vec<TcpListener> = match given {
            Some(_) => Vec::new(),
            None => (0..2 * n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")).collect(),
        };
        let ports: Vec<u16> =
            given.unwrap_or_else(|| held.iter().map(|l| l.local_addr().expect("local addr").port()).collect());
        self.token = format!("veer-test-{}-{}-{attempt}", std::process::id(), ports[0]);
        let root = self.dir.path().join(format!("attempt-{attempt}"));
        self.members = (0..n)
            .map(|i| {
                let dir = root.join(format!("m{i}"));
                std::fs::create_dir_all(&dir).expect("member dir");
                Member {
                    name: format!("m{i}"),
                    client_port: ports[2 * i],
                    peer_port: ports[2 * i + 1],
                    data_dir: dir.join("data"),
                    log: dir.join("etcd.log"),
                    log_start: 0,
                    child: None,
                    paused: false,
                }
            })
            .collect();
        drop(held);
        for i in 0..n {
            self.spawn(i, "new");
        }
        // Every member is checked on each round: two that failed to bind leave the third
        // without a quorum, and it must not be waited on until the deadline.
        let deadline = Instant::now() + READY_WITHIN;
        let mut healthy = vec![false; n];
        loop {
            for (i, ok) in healthy.iter_mut().enumerate() {
                self.check_alive(i)?;
                if !*ok {
                    *ok = is_healthy(self.client_addr(i)).await;
                }
            }
            if healthy.iter().all(|h| *h) {
                // Once more: a member that lost its port could have exited just after its
                // check, its port answering for another test's etcd.
                for i in 0..n {
                    self.check_alive(i)?;
                }
                return Ok(());
            }
            let late = healthy.iter().position(|h| !h).expect("a member that is not healthy");
            self.fail_after(deadline, late, r#"answering GET /health with "health":"true""#);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the members of a failed attempt and frees their data dirs (each holds 128 MB of
    /// preallocated WAL); their logs stay until drop.
    fn discard_members(&mut self) {
        for m in &mut self.members {
            reap(m);
            let _ = std::fs::remove_dir_all(&m.data_dir);
        }
        self.members.clear();
    }

    /// Starts member `i`'s process; `state` is `new` for the first boot (a restart on an
    /// existing data dir ignores the initial-cluster flags and rejoins from its WAL).
    fn spawn(&mut self, i: usize, state: &str) {
        let initial_cluster =
            self.members.iter().map(|m| format!("{}={}", m.name, m.peer_url())).collect::<Vec<_>>().join(",");
        let m = &self.members[i];
        let log = File::options().create(true).append(true).open(&m.log).expect("etcd log file");
        let log_start = log.metadata().expect("log metadata").len() as usize;
        let child = Command::new(&self.bin)
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url(), "--advertise-client-urls", &m.client_url()])
            .args(["--listen-peer-urls", &m.peer_url(), "--initial-advertise-peer-urls", &m.peer_url()])
            .args(["--initial-cluster", &initial_cluster, "--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            .arg(format!("--heartbeat-interval={}", self.timing.heartbeat.as_millis()))
            .arg(format!("--election-timeout={}", self.timing.election.as_millis()))
            // A member that was paused or cut off cannot depose a working leader when it returns.
            .arg("--pre-vote=true")
            // Small, so a runaway test hits etcd's NOSPACE alarm rather than filling the disk.
            .arg("--quota-backend-bytes=134217728")
            // Fewer entries kept in memory between snapshots (default 100,000).
            .arg("--snapshot-count=10000")
            .args(["--max-snapshots=2", "--max-wals=2"])
            // No auto compaction: revisions stay where a test expects them; tests compact
            // explicitly when that is what they test.
            .args(["--logger=zap", "--log-outputs=stderr", "--log-level=info"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        let m = &mut self.members[i];
        m.child = Some(child);
        m.log_start = log_start;
        m.paused = false;
    }

    /// How many attempts the start took: 1, plus one per time a chosen port was taken.
    pub fn attempts(&self) -> usize {
        self.attempts
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// The client URLs of every member, `http://127.0.0.1:PORT`, in member order.
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// Member `i`'s client URL.
    pub fn client_url(&self, i: usize) -> String {
        self.members[i].client_url()
    }

    /// Member `i`'s client address.
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.members[i].client_port))
    }

    /// Member `i`'s process id while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// A client of every member, with connect and request timeouts so no call in a test can
    /// hang (a write without quorum otherwise waits for etcd's own 5 s + 2 × election timeout).
    pub async fn client(&self) -> Client {
        connect(&self.client_urls(), Duration::from_secs(5)).await
    }

    /// A client of member `i` only, with request timeout `timeout`: what it answers is that
    /// member's answer, not another member's.
    pub async fn client_of(&self, i: usize, timeout: Duration) -> Client {
        connect(&[self.client_url(i)], timeout).await
    }

    /// SIGKILL member `i` and reap it: no leadership handover, no flush.
    pub fn kill(&mut self, i: usize) {
        reap(&mut self.members[i]);
    }

    /// SIGTERM member `i` and wait for it to exit (a leader first hands its leadership to a
    /// follower); killed if it takes longer than 10 s.
    pub async fn stop(&mut self, i: usize) {
        let m = &mut self.members[i];
        let Some(child) = m.child.as_mut() else { return };
        if m.paused {
            signal(child.id(), "CONT");
            m.paused = false;
        }
        signal(child.id(), "TERM");
        let deadline = Instant::now() + STOP_WITHIN;
        loop {
            if child.try_wait().expect("try_wait etcd").is_some() {
                m.child = None;
                return;
            }
            if Instant::now() > deadline {
                eprintln!("etcd {} ignored SIGTERM for {STOP_WITHIN:?}: killing it", m.name);
                reap(m);
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts member `i` again on its data dir and ports; it rejoins the cluster. Returns once
    /// it is healthy when a majority of members is up with it, otherwise (no quorum to be
    /// healthy with) once it listens on its client port.
    ///
    /// The ports were free when etcd last held them; if something took one meanwhile the
    /// restart is retried until the deadline (a peer port cannot change without a membership
    /// change), then fails with the log.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "etcd {} is still running", self.members[i].name);
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            self.spawn(i, "existing");
            match self.wait_serving(i, deadline).await {
                Ok(()) => return,
                Err(StartFailure::PortTaken) => {
                    reap(&mut self.members[i]);
                    assert!(Instant::now() < deadline, "etcd {}: its ports stayed taken\n{}", i, self.logs());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// SIGSTOP member `i`: it holds its connections but answers nothing, like a hung process
    /// or a partitioned host.
    pub fn pause(&mut self, i: usize) {
        let m = &mut self.members[i];
        let child = m.child.as_ref().unwrap_or_else(|| panic!("etcd {} is not running", m.name));
        signal(child.id(), "STOP");
        m.paused = true;
    }

    /// SIGCONT member `i`, then wait as [`Etcd::restart`] does.
    pub async fn resume(&mut self, i: usize) {
        let m = &mut self.members[i];
        let child = m.child.as_ref().unwrap_or_else(|| panic!("etcd {} is not running", m.name));
        signal(child.id(), "CONT");
        m.paused = false;
        let deadline = Instant::now() + READY_WITHIN;
        if self.wait_serving(i, deadline).await.is_err() {
            panic!("etcd {i} exited after SIGCONT\n{}", self.logs());
        }
    }

    /// Waits until member `i` answers `GET /health` with `"health":"true"`: it has a leader
    /// and a quorum committed a read through Raft.
    pub async fn wait_healthy(&mut self, i: usize) {
        let deadline = Instant::now() + READY_WITHIN;
        if self.wait_healthy_until(i, deadline).await.is_err() {
            panic!("etcd {i} exited: a port was taken\n{}", self.logs());
        }
    }

    /// The index of the member that is leader, as every up member agrees, waiting until they do.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let why = match self.agreed_leader().await {
                Ok(i) => return i,
                Err(why) => why,
            };
            assert!(
                Instant::now() < deadline,
                "etcd: no agreed leader within {READY_WITHIN:?}: {why}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn agreed_leader(&self) -> Result<usize, String> {
        let mut ids = Vec::new();
        let mut leaders = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            if !m.up() {
                ids.push(None);
                continue;
            }
            let mut c = connect(&[m.client_url()], Duration::from_secs(1)).await;
            let s = c.status().await.map_err(|e| format!("status of {}: {e}", m.name))?;
            let header = s.header().ok_or("status without header")?;
            ids.push(Some(header.member_id()));
            if s.leader() == 0 {
                return Err(format!("{} has no leader", m.name));
            }
            leaders.push((i, s.leader()));
        }
        let Some(&(_, leader)) = leaders.first() else { return Err("no member is up".into()) };
        if leaders.iter().any(|&(_, l)| l != leader) {
            return Err(format!("members disagree on the leader: {leaders:?}"));
        }
        ids.iter().position(|id| *id == Some(leader)).ok_or_else(|| format!("leader {leader:x} is not an up member"))
    }

    /// Healthy when a majority is up with member `i`, else just listening.
    async fn wait_serving(&mut self, i: usize, deadline: Instant) -> Result<(), StartFailure> {
        let up = self.members.iter().filter(|m| m.up()).count();
        if 2 * up > self.members.len() {
            return self.wait_healthy_until(i, deadline).await;
        }
        loop {
            self.check_alive(i)?;
            if tokio::net::TcpStream::connect(self.client_addr(i)).await.is_ok() {
                return Ok(());
            }
            self.fail_after(deadline, i, "listening on its client port");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_healthy_until(&mut self, i: usize, deadline: Instant) -> Result<(), StartFailure> {
        loop {
            self.check_alive(i)?;
            if is_healthy(self.client_addr(i)).await {
                return Ok(());
            }
            self.fail_after(deadline, i, r#"answering GET /health with "health":"true""#);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `PortTaken` when member `i` exited because a port was in use; panics with the logs when
    /// it exited for another reason.
    fn check_alive(&mut self, i: usize) -> Result<(), StartFailure> {
        let m = &mut self.members[i];
        let child = m.child.as_mut().unwrap_or_else(|| panic!("etcd {} is not running", m.name));
        let Some(status) = child.try_wait().expect("try_wait etcd") else { return Ok(()) };
        m.child = None;
        let log = std::fs::read(&m.log).unwrap_or_default();
        let this_run = String::from_utf8_lossy(log.get(m.log_start..).unwrap_or_default());
        if this_run.contains("address already in use") {
            eprintln!("etcd {}: a port was taken before it bound it; trying again", m.name);
            return Err(StartFailure::PortTaken);
        }
        let name = m.name.clone();
        panic!("etcd {name} exited with {status}\n{}", self.logs());
    }

    fn fail_after(&self, deadline: Instant, i: usize, what: &str) {
        if Instant::now() > deadline {
            panic!("etcd {} was not {what} within {READY_WITHIN:?}\n{}", self.members[i].name, self.logs());
        }
    }

    /// The last lines of every member's log, to say why a wait failed.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            out.push_str(&format!("---- etcd {} ({}) log tail, {}:\n", m.name, m.client_url(), m.log.display()));
            out.push_str(&tail(&m.log, 25));
        }
        out
    }

    /// Where member `i` writes its log.
    pub fn log_path(&self, i: usize) -> &Path {
        &self.members[i].log
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            reap(m);
        }
    }
}

/// SIGKILL (which also ends a stopped process) and wait for the process to be gone.
fn reap(m: &mut Member) {
    if let Some(mut child) = m.child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    m.paused = false;
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("run kill").success();
    assert!(ok, "kill -{sig} {pid} failed");
}

async fn connect(urls: &[String], timeout: Duration) -> Client {
    let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(1)).with_timeout(timeout);
    Client::connect(urls, Some(options)).await.expect("etcd client")
}

/// Whether the member answers `GET /health` with `"health":"true"` within 2 s.
async fn is_healthy(addr: SocketAddr) -> bool {
    health(addr).await.as_deref().is_some_and(|b| b.contains(r#""health":"true""#))
}

/// The answer to `GET /health`, or `None` when the member does not answer within 2 s.
async fn health(addr: SocketAddr) -> Option<String> {
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        String::from_utf8(buf).ok()
    };
    tokio::time::timeout(Duration::from_secs(2), ask).await.ok().flatten()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read: {e})\n"));
    let all: Vec<&str> = text.lines().collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    out.push('\n');
    out
}
