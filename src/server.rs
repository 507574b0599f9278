//! Listeners, accept and drain: starting a proxy from a config, and stopping it.
//!
//! Start builds the first generation into a [`DataPlane`], wraps it in the [`Operations`]
//! handle the admin API and reloads use, binds the listeners and spawns the accept loops,
//! the admin server, the health checker and the control-plane thread. Nothing else in the
//! crate depends on this module.
//!
//! Shutdown follows the broadcast + completion pattern: a `watch` channel tells every accept
//! loop and connection task to stop, each connection finishes its in-flight requests
//! (hyper's graceful shutdown), and completion is observed through the `max_connections`
//! semaphore — when every connection permit is back, nothing is in flight.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::admin;
use crate::config::{Config, ConfigError};
use crate::connection;
use crate::control::{ControlHandle, ControlPlane};
use crate::data_plane::DataPlane;
use crate::journal::Journal;
use crate::notify::Notifier;
use crate::operations::Operations;
use crate::reload::{self, ReloadError, ReloadSummary};
use crate::snapshot::{BuildError, Snapshot};
use crate::telemetry::Telemetry;
use crate::upstream::Clients;

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
    ops: Arc<Operations>,
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
        let s = &config.server;
        let tls = s.tls.as_ref().map(|t| crate::tls::acceptor(&t.cert, &t.key)).transpose()?;
        let snap = Snapshot::build(config.clone(), None, &telemetry, 1, tls)?;
        let data = Arc::new(DataPlane::new(snap, Clients::new(s), telemetry));
        let journal = Arc::new(Journal::new(&config.state_dir));
        let ops = Arc::new(Operations::new(data.clone(), config.source.clone(), journal.clone()));
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
        let notifier = Notifier::spawn(config.notify.clone());
        let fleet = config.cluster.as_ref().map(|c| crate::fleet::start(c.clone(), data.clone(), notifier.clone()));
        if let Some(f) = &fleet {
            ops.connect_fleet(f.clone());
        }
        let plane = ControlPlane::new(data.clone(), journal, notifier, fleet);
        let control = plane.spawn();
        ops.connect_control(control.sender());

        let max_connections = u32::try_from(s.max_connections).unwrap_or(u32::MAX);
        let connections = Arc::new(Semaphore::new(max_connections as usize));
        let (shutdown, _) = watch::channel(false);
        let mut accepting = JoinSet::new();
        accepting.spawn(accept_loop(http, false, data.clone(), connections.clone(), shutdown.subscribe()));
        if let Some(l) = tls_listener {
            accepting.spawn(accept_loop(l, true, data.clone(), connections.clone(), shutdown.subscribe()));
        }
        let mut tasks = JoinSet::new();
        tasks.spawn(admin::serve(admin_listener, ops.clone(), config.admin.max_connections));
        tasks.spawn(crate::health::run(data));
        if let Some(file) = &config.admin.token_file {
            warn_if_world_readable(file);
        }
        Ok(Proxy {
            ops,
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

    /// The operator side: the current generation, journal, commands (for embedding and
    /// tests, and what [`crate::admin::handle`] takes).
    pub fn operations(&self) -> &Arc<Operations> {
        &self.ops
    }

    /// The data plane serving the listeners.
    pub fn data_plane(&self) -> &Arc<DataPlane> {
        self.ops.data()
    }

    /// Re-reads the config file and applies it if valid.
    pub async fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        reload::reload(&self.ops).await
    }

    /// Stops accepting, lets in-flight requests finish (up to `drain_timeout`), then stops
    /// the admin API and the control loop. Returns true when everything finished in time.
    pub async fn drain(mut self) -> bool {
        let _ = self.shutdown.send(true);
        // The listeners close when their accept loops end: only then does /readyz say 503, so
        // that no connection is accepted once it does.
        while self.accepting.join_next().await.is_some() {}
        self.ops.data().start_draining();
        info!(timeout = ?self.drain_timeout, "draining: no new connections, finishing in-flight requests");
        let all = self.connections.clone().acquire_many_owned(self.max_connections);
        let finished = tokio::time::timeout(self.drain_timeout, all).await.is_ok();
        if finished {
            info!("drained");
        } else {
            warn!("drain timeout reached with requests or upgraded connections still open; cutting them");
            self.ops.data().cut_tunnels();
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
    let routes = proxy.ops.snapshot().routes.len();
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
    data: Arc<DataPlane>,
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
        tokio::spawn(connection::serve(stream, peer, tls, data.clone(), permit, shutdown.clone()));
    }
}
