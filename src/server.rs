//! Listeners, connections, and the lifecycle of a running proxy: start, reload, drain.
//!
//! Shutdown follows the broadcast + completion pattern: a `watch` channel tells every accept
//! loop and connection task to stop, each connection finishes its in-flight requests
//! (hyper's graceful shutdown), and completion is observed through the `max_connections`
//! semaphore — when every connection permit is back, nothing is in flight.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::admin;
use crate::config::{Config, ConfigError};
use crate::connection::{self, ConnSettings};
use crate::control::{CommandSender, ControlHandle, ControlPlane};
use crate::journal::Journal;
use crate::notify::Notifier;
use crate::reload::{self, ReloadError, ReloadSummary};
use crate::snapshot::{BuildError, Snapshot};
use crate::telemetry::Telemetry;
use crate::upstream::Clients;

/// State shared by the data plane, the control plane and the admin API.
pub struct Shared {
    snapshot: ArcSwap<Snapshot>,
    conn_settings: ArcSwap<ConnSettings>,
    /// Upstream connection pools.
    pub clients: Clients,
    /// This proxy's metrics registry.
    pub telemetry: Arc<Telemetry>,
    /// The config file reloads re-read.
    pub config_path: PathBuf,
    /// The rollout journal (`state.dir` as of start).
    pub journal: Arc<Journal>,
    commands: OnceLock<CommandSender>,
    draining: AtomicBool,
    /// Set when a drain runs out of time: upgraded tunnels still open are cut.
    tunnels_cut: watch::Sender<bool>,
    reload_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("generation", &self.snapshot().generation)
            .field("draining", &self.is_draining())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The current configuration generation.
    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// Publishes a new generation (one atomic store) and the connection settings built from
    /// it (its TLS acceptor among them).
    pub(crate) fn publish(&self, snap: Snapshot, tls: Option<TlsAcceptor>) {
        self.conn_settings.store(Arc::new(ConnSettings::new(&snap.config.server, tls)));
        self.snapshot.store(Arc::new(snap));
    }

    /// How new client connections are served, as of the current generation.
    pub(crate) fn conn_settings(&self) -> Arc<ConnSettings> {
        self.conn_settings.load_full()
    }

    /// Held while a reload reads, validates and publishes, so reloads never interleave.
    pub(crate) async fn reload_guard(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.reload_lock.lock().await
    }

    /// Where operator commands go (the control-plane thread).
    pub fn commands(&self) -> Option<&CommandSender> {
        self.commands.get()
    }

    /// Becomes true when a drain has waited `drain_timeout` and what is left is cut.
    pub(crate) fn tunnels_cut(&self) -> watch::Receiver<bool> {
        self.tunnels_cut.subscribe()
    }

    /// True once shutdown has begun; `/readyz` answers 503.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The snapshot could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The TLS certificate could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running proxy: its listeners, control loop and admin API.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    http_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    connections: Arc<Semaphore>,
    max_connections: u32,
    control: ControlHandle,
    drain_timeout: Duration,
    accepting: JoinSet<()>,
    tasks: JoinSet<()>,
}

impl Proxy {
    /// Loads `config_path` and starts serving.
    pub async fn start(config_path: &Path) -> Result<Proxy, StartError> {
        let config = Config::load(config_path)?;
        Proxy::start_with(config).await
    }

    /// Starts serving a validated config (its `source` is what reloads re-read).
    pub async fn start_with(config: Config) -> Result<Proxy, StartError> {
        let telemetry = Telemetry::new();
        let config = Arc::new(config);
        let snap = Snapshot::build(config.clone(), None, &telemetry, 1)?;
        let tls = reload::tls_acceptor(&config.server)?;
        let s = &config.server;
        let clients = Clients::new(s);
        snap.attach(&clients);
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snap),
            conn_settings: ArcSwap::from_pointee(ConnSettings::new(s, tls)),
            clients,
            telemetry,
            config_path: config.source.clone(),
            journal: Arc::new(Journal::new(&config.state_dir)),
            commands: OnceLock::new(),
            draining: AtomicBool::new(false),
            tunnels_cut: watch::channel(false).0,
            reload_lock: tokio::sync::Mutex::new(()),
        });
        let bind = |what, addr| async move {
            TcpListener::bind(addr).await.map_err(|source| StartError::Bind { what, addr, source })
        };
        let http = bind("server.listen", s.listen).await?;
        let tls_listener = match &s.tls {
            Some(t) => Some(bind("server.tls_listen", t.listen).await?),
            None => None,
        };
        let admin_listener = bind("admin.listen", config.admin.listen).await?;
        let local = |l: &TcpListener| l.local_addr().expect("bound listener has an address");
        let (http_addr, tls_addr, admin_addr) =
            (local(&http), tls_listener.as_ref().map(local), local(&admin_listener));

        // Rollouts are recovered (or started) before the first request is accepted.
        let plane = ControlPlane::new(shared.clone(), shared.journal.clone(), Notifier::spawn(config.notify.clone()));
        let control = plane.spawn();
        let _ = shared.commands.set(control.sender());

        let max_connections = u32::try_from(s.max_connections).unwrap_or(u32::MAX);
        let connections = Arc::new(Semaphore::new(max_connections as usize));
        let (shutdown, _) = watch::channel(false);
        let mut accepting = JoinSet::new();
        accepting.spawn(accept_loop(http, false, shared.clone(), connections.clone(), shutdown.subscribe()));
        if let Some(l) = tls_listener {
            accepting.spawn(accept_loop(l, true, shared.clone(), connections.clone(), shutdown.subscribe()));
        }
        let mut tasks = JoinSet::new();
        tasks.spawn(admin::serve(admin_listener, shared.clone(), config.admin.max_connections));
        tasks.spawn(crate::health::run(shared.clone()));
        if let Some(file) = &config.admin.token_file {
            warn_if_world_readable(file);
        }
        Ok(Proxy {
            shared,
            http_addr,
            tls_addr,
            admin_addr,
            shutdown,
            connections,
            max_connections,
            control,
            drain_timeout: s.drain_timeout,
            accepting,
            tasks,
        })
    }

    /// Address of the plain HTTP listener.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Address of the HTTPS listener, if any.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Address of the admin API.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The shared state (for embedding and tests).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Re-reads the config file and applies it if valid.
    pub async fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        reload::reload(&self.shared).await
    }

    /// Stops accepting, lets in-flight requests finish (up to `drain_timeout`), then stops
    /// the admin API and the control loop. Returns true when everything finished in time.
    pub async fn drain(mut self) -> bool {
        let _ = self.shutdown.send(true);
        // The listeners close when their accept loops end: only then does /readyz say 503, so
        // that no connection is accepted once it does.
        while self.accepting.join_next().await.is_some() {}
        self.shared.draining.store(true, Ordering::Relaxed);
        info!(timeout = ?self.drain_timeout, "draining: no new connections, finishing in-flight requests");
        let all = self.connections.clone().acquire_many_owned(self.max_connections);
        let finished = tokio::time::timeout(self.drain_timeout, all).await.is_ok();
        if finished {
            info!("drained");
        } else {
            warn!("drain timeout reached with requests or upgraded connections still open; cutting them");
            self.shared.tunnels_cut.send_replace(true);
        }
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        let mut control = self.control;
        let _ = tokio::task::spawn_blocking(move || control.stop()).await;
        finished
    }
}

/// Warns when every user of the host may read the admin token file.
fn warn_if_world_readable(file: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(file)
        && meta.permissions().mode() & 0o004 != 0
    {
        let mode = format!("{:o}", meta.permissions().mode() & 0o777);
        warn!(file = %file.display(), %mode, "the admin token file is readable by every user on this host; restrict it (chmod 600)");
    }
}

/// The process signals veer acts on. Installed before the proxy starts, so that a SIGTERM or
/// SIGHUP arriving during start-up is acted on instead of killing the process.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers for SIGTERM, SIGINT and SIGHUP.
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Runs until SIGTERM or SIGINT (then drains), reloading on SIGHUP.
pub async fn run_until_signalled(proxy: Proxy, mut signals: Signals) -> bool {
    // Logged once the signal handlers are in place: a SIGHUP or SIGTERM sent after this line
    // reloads or drains, never kills.
    let routes = proxy.shared.snapshot().routes.len();
    info!(http_addr = %proxy.http_addr, tls = ?proxy.tls_addr, admin_addr = %proxy.admin_addr, routes, "veer is serving");
    loop {
        tokio::select! {
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
            _ = signals.hup.recv() => {
                // The outcome is logged by reload itself.
                let _ = proxy.reload().await;
            }
        }
    }
    proxy.drain().await
}

async fn accept_loop(
    listener: TcpListener,
    tls: bool,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        // Take a connection slot first: at max_connections, accept pauses instead of failing.
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection::serve(stream, peer, tls, shared.clone(), permit, shutdown.clone()));
    }
}
