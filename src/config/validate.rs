//! Raw TOML values → checked [`Config`], collecting every problem with its position.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::{ConfigError, Diagnostic, SourceMap};
use super::raw::*;
use super::*;

/// Parses and validates; all problems are reported together.
pub fn parse(path: &Path, src: &str) -> Result<Config, ConfigError> {
    let map = SourceMap::new(path, src);
    if src.trim().is_empty() {
        return Err(ConfigError::Invalid(vec![map.at(
            0..0,
            "",
            "the file is empty: at least one [[routes]] table is needed",
        )]));
    }
    let raw: RawConfig = toml::from_str(src).map_err(|e| ConfigError::Invalid(vec![map.from_toml(&e)]))?;
    let mut v = Validator { map, base: base_dir(path), diags: Vec::new() };
    let config = v.config(path, raw);
    // Reported top to bottom, as an editor would list them.
    v.diags.sort_by_key(|d| (d.line, d.col));
    if v.diags.is_empty() { Ok(config) } else { Err(ConfigError::Invalid(v.diags)) }
}

fn base_dir(path: &Path) -> PathBuf {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}

struct Validator<'a> {
    map: SourceMap<'a>,
    base: PathBuf,
    diags: Vec<Diagnostic>,
}

impl Validator<'_> {
    fn err<T>(&mut self, sp: &Sp<T>, key: &str, msg: impl Into<String>) {
        let d = self.map.at(sp.span(), key, msg);
        self.diags.push(d);
    }

    fn config(&mut self, path: &Path, raw: RawConfig) -> Config {
        let admin_listen = raw.admin.listen.as_ref().map(|l| l.span());
        let server = self.server(raw.server);
        let admin = self.admin(raw.admin);
        let taken = [Some(server.listen), server.tls.as_ref().map(|t| t.listen)];
        if admin.listen.port() != 0 && taken.contains(&Some(admin.listen)) {
            let d = self.map.at(
                admin_listen.unwrap_or(0..0),
                "admin.listen",
                format!("{} is already used by a [server] listener", admin.listen),
            );
            self.diags.push(d);
        }
        let state_dir = match &raw.state.dir {
            Some(d) => self.path(d),
            None => self.base.join("state"),
        };
        let notify = raw.notify.into_iter().enumerate().map(|(i, n)| self.notify(i, n)).collect();
        if raw.routes.is_empty() {
            let d = self.map.at(0..0, "routes", "no [[routes]] defined: veer needs at least one route to serve");
            self.diags.push(d);
        }
        let mut names = HashSet::new();
        let mut matchers: Vec<(String, String, String)> = Vec::new();
        let mut routes = Vec::with_capacity(raw.routes.len());
        for (i, r) in raw.routes.into_iter().enumerate() {
            if !names.insert(r.name.get_ref().clone()) {
                let key = format!("routes[{i}].name");
                let msg = format!("duplicate route name {:?}: route names must be unique", r.name.get_ref());
                self.err(&r.name, &key, msg);
            }
            let name_span = r.name.clone();
            let route = self.route(i, r);
            let hosts = if route.hosts.is_empty() { vec![String::new()] } else { route.hosts.clone() };
            for h in hosts {
                match matchers.iter().find(|(mh, mp, _)| *mh == h && *mp == route.path_prefix) {
                    Some((_, _, other)) => {
                        let host = if h.is_empty() { "any host".to_string() } else { format!("host {h:?}") };
                        let msg = format!(
                            "route {:?} can never be reached: route {other:?} already serves {host} with path_prefix {:?}",
                            route.name, route.path_prefix
                        );
                        self.err(&name_span, &format!("routes[{i}].path_prefix"), msg);
                    }
                    None => matchers.push((h, route.path_prefix.clone(), route.name.clone())),
                }
            }
            routes.push(route);
        }
        let cluster = raw.cluster.map(|c| self.cluster(c));
        Config { source: path.to_path_buf(), server, admin, state_dir, notify, cluster, routes }
    }

    fn cluster(&mut self, c: RawCluster) -> ClusterConfig {
        let mut etcd = Vec::new();
        if c.etcd.get_ref().is_empty() {
            self.err(&c.etcd, "cluster.etcd", "no etcd endpoint: list at least one, e.g. [\"http://127.0.0.1:2379\"]");
        }
        for e in c.etcd.get_ref() {
            match e.get_ref().parse::<http::Uri>() {
                Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some() => {
                    etcd.push(e.get_ref().trim_end_matches('/').to_string());
                }
                _ => self.err(
                    e,
                    "cluster.etcd",
                    format!("{:?} is not an http:// or https:// URL with a host", e.get_ref()),
                ),
            }
        }
        let prefix = c.prefix.get_ref().trim_end_matches('/').to_string();
        if !prefix.starts_with('/') || prefix.len() < 2 || prefix.contains("//") {
            self.err(
                &c.prefix,
                "cluster.prefix",
                format!("{:?} is not a key prefix like \"/veer/prod-edge\"", c.prefix.get_ref()),
            );
        }
        let node = match &c.node {
            Some(n) => {
                let ok = !n.get_ref().is_empty()
                    && n.get_ref().bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !ok {
                    self.err(
                        n,
                        "cluster.node",
                        format!("{:?} is not a node name: use letters, digits, '-', '_' and '.'", n.get_ref()),
                    );
                }
                n.get_ref().clone()
            }
            None => host_name(),
        };
        let lease_ttl = self.duration(c.lease_ttl.as_ref(), "cluster.lease_ttl", Duration::from_secs(5));
        if let Some(l) = &c.lease_ttl
            && lease_ttl < Duration::from_secs(1)
        {
            self.err(l, "cluster.lease_ttl", "etcd leases count whole seconds: use at least \"1s\"");
        }
        let publish_interval =
            self.duration(c.publish_interval.as_ref(), "cluster.publish_interval", Duration::from_millis(250));
        if let Some(p) = &c.publish_interval
            && publish_interval >= lease_ttl
        {
            self.err(
                p,
                "cluster.publish_interval",
                "must be shorter than cluster.lease_ttl, or a live replica would look gone",
            );
        }
        let cert_file = c.cert_file.as_ref().map(|f| self.path(f));
        let key_file = c.key_file.as_ref().map(|f| self.path(f));
        match (&c.cert_file, &c.key_file) {
            (Some(f), None) => self.err(f, "cluster.cert_file", "cluster.cert_file needs cluster.key_file"),
            (None, Some(f)) => self.err(f, "cluster.key_file", "cluster.key_file needs cluster.cert_file"),
            _ => {}
        }
        match (&c.username, &c.password_file) {
            (Some(u), None) => self.err(u, "cluster.username", "cluster.username needs cluster.password_file"),
            (None, Some(f)) => self.err(f, "cluster.password_file", "cluster.password_file needs cluster.username"),
            _ => {}
        }
        ClusterConfig {
            etcd,
            prefix,
            node,
            lease_ttl,
            publish_interval,
            ca_file: c.ca_file.as_ref().map(|f| self.path(f)),
            cert_file,
            key_file,
            username: c.username.as_ref().map(|u| u.get_ref().clone()),
            password_file: c.password_file.as_ref().map(|f| self.path(f)),
        }
    }

    fn server(&mut self, s: RawServer) -> ServerConfig {
        let listen = self.addr(s.listen.as_ref(), "server.listen", "0.0.0.0:8080");
        let tls = match (&s.tls_listen, &s.tls_cert, &s.tls_key) {
            (None, None, None) => None,
            (Some(l), Some(c), Some(k)) => {
                let listen = self.addr(Some(l), "server.tls_listen", "");
                let cert = self.path(c);
                let key = self.path(k);
                if let Err(e) = crate::tls::load_server_config(&cert, &key) {
                    self.err(c, "server.tls_cert", format!("cannot load TLS certificate/key: {e}"));
                }
                Some(TlsConfig { listen, cert, key })
            }
            (l, c, k) => {
                let any = l.as_ref().or(c.as_ref()).or(k.as_ref()).map(|s| s.span()).unwrap_or(0..0);
                let d = self.map.at(any, "server.tls_listen", "tls_listen, tls_cert and tls_key must be set together");
                self.diags.push(d);
                None
            }
        };
        ServerConfig {
            listen,
            tls,
            request_timeout: self.duration(
                s.request_timeout.as_ref(),
                "server.request_timeout",
                Duration::from_secs(30),
            ),
            body_idle_timeout: self.duration(
                s.body_idle_timeout.as_ref(),
                "server.body_idle_timeout",
                Duration::from_secs(60),
            ),
            header_read_timeout: self.duration(
                s.header_read_timeout.as_ref(),
                "server.header_read_timeout",
                Duration::from_secs(10),
            ),
            idle_timeout: self.duration(s.idle_timeout.as_ref(), "server.idle_timeout", Duration::from_secs(60)),
            drain_timeout: self.duration(s.drain_timeout.as_ref(), "server.drain_timeout", Duration::from_secs(30)),
            workers: self.count(s.workers.as_ref(), "server.workers", 0, 0, 1024),
            max_connections: self.count(s.max_connections.as_ref(), "server.max_connections", 10_000, 1, 10_000_000),
            max_header_bytes: self.count(
                s.max_header_bytes.as_ref(),
                "server.max_header_bytes",
                64 * 1024,
                8192,
                16 << 20,
            ),
            max_headers: self.count(s.max_headers.as_ref(), "server.max_headers", 100, 1, 10_000),
            max_upstream_headers: self.count(
                s.max_upstream_headers.as_ref(),
                "server.max_upstream_headers",
                150,
                1,
                10_000,
            ),
            max_upstream_header_bytes: self.count(
                s.max_upstream_header_bytes.as_ref(),
                "server.max_upstream_header_bytes",
                64 * 1024,
                8192,
                16 << 20,
            ),
            max_connections_per_endpoint: self.count(
                s.max_connections_per_endpoint.as_ref(),
                "server.max_connections_per_endpoint",
                256,
                1,
                1_000_000,
            ),
            expose_role_header: s.expose_role_header.unwrap_or(false),
        }
    }

    fn admin(&mut self, a: RawAdmin) -> AdminConfig {
        let admin = AdminConfig {
            listen: self.addr(a.listen.as_ref(), "admin.listen", "127.0.0.1:9901"),
            token_file: a.token_file.as_ref().map(|t| self.path(t)),
            max_connections: self.count(a.max_connections.as_ref(), "admin.max_connections", 64, 1, 100_000),
            header_read_timeout: self.duration(
                a.header_read_timeout.as_ref(),
                "admin.header_read_timeout",
                Duration::from_secs(10),
            ),
            idle_timeout: self.duration(a.idle_timeout.as_ref(), "admin.idle_timeout", Duration::from_secs(60)),
            public_url: a.public_url.as_ref().and_then(|u| self.public_url(u)),
        };
        // Anyone who can reach the admin API can abort or promote a rollout: off loopback, a
        // token is mandatory.
        if let (Some(l), None) = (&a.listen, &admin.token_file)
            && !admin.listen.ip().is_loopback()
        {
            self.err(l, "admin.listen", format!("{} is reachable from other hosts: set admin.token_file so mutating calls need a token, or listen on 127.0.0.1", admin.listen));
        }
        admin
    }

    fn notify(&mut self, i: usize, n: RawNotify) -> NotifyConfig {
        let key = format!("notify[{i}].url");
        let url = match n.url.get_ref().parse::<http::Uri>() {
            Ok(u) if u.scheme_str() == Some("http") && u.authority().is_some() => u,
            _ => {
                self.err(&n.url, &key, format!("{:?} is not an http:// URL with a host", n.url.get_ref()));
                http::Uri::from_static("http://invalid.invalid/")
            }
        };
        const KINDS: [&str; 8] =
            ["started", "step", "paused", "resumed", "promoted", "rolled_back", "retried", "reloaded"];
        let mut events = Vec::new();
        for e in n.events.iter().flatten() {
            if KINDS.contains(&e.get_ref().as_str()) {
                events.push(e.get_ref().clone());
            } else {
                self.err(
                    e,
                    &format!("notify[{i}].events"),
                    format!("unknown event {:?}; expected one of {}", e.get_ref(), KINDS.join(", ")),
                );
            }
        }
        NotifyConfig { url, events }
    }

    fn route(&mut self, i: usize, r: RawRoute) -> RouteConfig {
        let k = |s: &str| format!("routes[{i}].{s}");
        let name = r.name.get_ref().clone();
        if name.is_empty()
            || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            self.err(&r.name, &k("name"), format!("{name:?} is not a valid route name: use [a-z0-9_-]+"));
        }
        let mut hosts = Vec::new();
        for h in r.hosts.iter().flatten() {
            let host = h.get_ref().trim().to_ascii_lowercase();
            if host.is_empty() || host.contains(['/', ' ', ':']) {
                self.err(h, &k("hosts"), format!("{:?} is not a host name (no scheme, port or path)", h.get_ref()));
            }
            hosts.push(host);
        }
        let path_prefix = match &r.path_prefix {
            Some(p) if !p.get_ref().starts_with('/') => {
                self.err(p, &k("path_prefix"), format!("{:?} must start with '/'", p.get_ref()));
                "/".to_string()
            }
            Some(p) => p.get_ref().clone(),
            None => "/".to_string(),
        };
        let max_inflight = self.count(r.max_inflight.as_ref(), &k("max_inflight"), 0, 0, i64::MAX);
        let upgrades = match &r.upgrades {
            None => vec!["websocket".to_string()],
            Some(list) => list.iter().filter_map(|u| self.upgrade_token(u, &k("upgrades"))).collect(),
        };
        let stable = self.version(&r.stable, &k("stable"));
        let candidate = r.candidate.as_ref().map(|c| self.version(c, &k("candidate")));
        if let Some(c) = &candidate
            && c.version == stable.version
        {
            let cv = &r.candidate.as_ref().expect("candidate present").version;
            self.err(
                cv,
                &k("candidate.version"),
                format!("candidate version {:?} equals the stable version", c.version),
            );
        }
        RouteConfig {
            name,
            hosts,
            path_prefix,
            max_inflight,
            upgrades,
            stable,
            candidate,
            rollout: self.rollout(&r.rollout, &k("rollout")),
            rollback: self.rollback(&r.rollback, &k("rollback")),
            sticky: r.sticky.as_ref().and_then(|s| self.sticky(s, &k("sticky"))),
            override_header: r.override_.as_ref().and_then(|o| self.header_name(&o.header, &k("override.header"))),
            retry: r.retry.as_ref().map(|rt| RetryConfig {
                on_candidate_failure: rt.on_candidate_failure.unwrap_or(true),
                budget: self.rate(rt.budget.as_ref(), &k("retry.budget"), 0.2),
                max_body_bytes: self.count(
                    rt.max_body_bytes.as_ref(),
                    &k("retry.max_body_bytes"),
                    64 * 1024,
                    0,
                    16 << 20,
                ),
                non_idempotent: rt.non_idempotent.unwrap_or(false),
            }),
            mirror: r.mirror.as_ref().map(|m| MirrorConfig {
                percent: self.percent(m.percent.as_ref(), &k("mirror.percent"), 0.0),
                compare_body: m.compare_body.unwrap_or(false),
                max_mismatch_rate: m
                    .max_mismatch_rate
                    .as_ref()
                    .map(|x| self.rate(Some(x), &k("mirror.max_mismatch_rate"), 0.0)),
            }),
        }
    }

    fn version(&mut self, v: &RawVersion, key: &str) -> VersionConfig {
        if v.version.get_ref().trim().is_empty() {
            self.err(&v.version, &format!("{key}.version"), "version label must not be empty");
        }
        if v.endpoints.get_ref().is_empty() {
            self.err(&v.endpoints, &format!("{key}.endpoints"), "at least one endpoint (host:port) is needed");
        }
        let mut endpoints = Vec::new();
        for e in v.endpoints.get_ref() {
            match check_endpoint(e.get_ref()) {
                Ok(()) => endpoints.push(e.get_ref().clone()),
                Err(why) => {
                    self.err(e, &format!("{key}.endpoints"), format!("{:?} is not host:port: {why}", e.get_ref()))
                }
            }
        }
        let health_path = match &v.health_path {
            Some(p) if !p.get_ref().starts_with('/') => {
                self.err(p, &format!("{key}.health_path"), format!("{:?} must start with '/'", p.get_ref()));
                None
            }
            Some(p) => Some(p.get_ref().clone()),
            None => None,
        };
        VersionConfig {
            version: v.version.get_ref().clone(),
            endpoints,
            h2: v.h2.unwrap_or(false),
            health_path,
            health_interval: self.duration(
                v.health_interval.as_ref(),
                &format!("{key}.health_interval"),
                Duration::from_secs(5),
            ),
        }
    }

    fn rollout(&mut self, r: &RawRollout, key: &str) -> RolloutConfig {
        let strategy = match r.strategy.as_ref().map(|s| (s, s.get_ref().as_str())) {
            None | Some((_, "canary")) => Strategy::Canary,
            Some((_, "blue-green")) => Strategy::BlueGreen,
            Some((s, other)) => {
                self.err(
                    s,
                    &format!("{key}.strategy"),
                    format!("unknown strategy {other:?}; expected \"canary\" or \"blue-green\""),
                );
                Strategy::Canary
            }
        };
        let steps_bp = match &r.steps {
            None => vec![100, 500, 2500, 5000, 10_000],
            Some(steps) => self.steps(steps, &format!("{key}.steps")),
        };
        RolloutConfig {
            strategy,
            steps_bp,
            step_interval: self.duration(
                r.step_interval.as_ref(),
                &format!("{key}.step_interval"),
                Duration::from_secs(60),
            ),
            min_requests: self.count(r.min_requests.as_ref(), &format!("{key}.min_requests"), 100, 0, i64::MAX) as u64,
            auto_promote: r.auto_promote.unwrap_or(true),
            preview: self.duration(r.preview.as_ref(), &format!("{key}.preview"), Duration::from_secs(300)),
            bake: self.duration(r.bake.as_ref(), &format!("{key}.bake"), Duration::from_secs(600)),
        }
    }

    fn steps(&mut self, steps: &Sp<Vec<Sp<f64>>>, key: &str) -> Vec<u32> {
        let list = steps.get_ref();
        if list.is_empty() {
            self.err(steps, key, "at least one step is needed, ending at 100");
            return vec![10_000];
        }
        let mut out: Vec<u32> = Vec::with_capacity(list.len());
        let mut prev = 0.0;
        for s in list {
            let p = *s.get_ref();
            let bp = (p.clamp(0.0, 100.0) * 100.0).round() as u32;
            if !(p > 0.0 && p <= 100.0) {
                self.err(s, key, format!("step {p} is outside (0, 100]"));
            } else if p <= prev {
                self.err(
                    s,
                    key,
                    format!("step {p} does not increase (previous step is {prev}); steps must be strictly increasing"),
                );
            } else if bp == 0 || out.last().is_some_and(|&last| bp <= last) {
                self.err(s, key, format!("step {p} is finer than the 0.01% weight resolution"));
            }
            prev = p;
            out.push(bp);
        }
        if *list.last().expect("non-empty").get_ref() != 100.0 {
            self.err(
                list.last().expect("non-empty"),
                key,
                "the last step must be 100 (the candidate ends up serving everything)",
            );
        }
        out
    }

    fn rollback(&mut self, r: &RawRollback, key: &str) -> RollbackConfig {
        let k = |s: &str| format!("{key}.{s}");
        let confidence = match &r.confidence {
            Some(c) if !(*c.get_ref() > 0.0 && *c.get_ref() < 1.0) => {
                self.err(c, &k("confidence"), format!("{} is outside (0, 1)", c.get_ref()));
                0.99
            }
            Some(c) => *c.get_ref(),
            None => 0.99,
        };
        let ratio = |v: &mut Self, x: Option<&Sp<f64>>, name: &str, default: Option<f64>| match x {
            Some(x) if !(*x.get_ref() >= 1.0 && x.get_ref().is_finite()) => {
                v.err(x, &k(name), format!("{} must be a ratio of at least 1", x.get_ref()));
                default
            }
            Some(x) => Some(*x.get_ref()),
            None => default,
        };
        let window = self.duration(r.window.as_ref(), &k("window"), Duration::from_secs(30));
        let tick = self.duration(r.tick.as_ref(), &k("tick"), Duration::from_millis(100));
        if tick >= window {
            match (&r.tick, &r.window) {
                (Some(t), _) => self.err(
                    t,
                    &k("tick"),
                    format!(
                        "tick ({}) must be shorter than the window ({})",
                        humantime::format_duration(tick),
                        humantime::format_duration(window)
                    ),
                ),
                (None, Some(w)) => self.err(
                    w,
                    &k("window"),
                    format!(
                        "window ({}) must be longer than the tick ({})",
                        humantime::format_duration(window),
                        humantime::format_duration(tick)
                    ),
                ),
                (None, None) => {}
            }
        }
        RollbackConfig {
            window,
            max_error_rate: r.max_error_rate.as_ref().map(|x| self.rate(Some(x), &k("max_error_rate"), 0.0)),
            max_error_rate_increase: Some(self.rate(
                r.max_error_rate_increase.as_ref(),
                &k("max_error_rate_increase"),
                0.01,
            )),
            max_p99: r.max_p99.as_ref().map(|d| self.duration(Some(d), &k("max_p99"), Duration::ZERO)),
            max_p99_ratio: ratio(self, r.max_p99_ratio.as_ref(), "max_p99_ratio", Some(1.5)),
            confidence,
            min_effect_ratio: ratio(self, r.min_effect_ratio.as_ref(), "min_effect_ratio", Some(1.2)).unwrap_or(1.2),
            min_latency_delta: match &r.min_latency_delta {
                Some(d) if d.get_ref().trim() == "0" || d.get_ref().trim() == "0ms" => Duration::ZERO,
                d => self.duration(d.as_ref(), &k("min_latency_delta"), Duration::from_millis(1)),
            },
            tick,
        }
    }

    fn sticky(&mut self, s: &Sp<RawSticky>, key: &str) -> Option<StickyConfig> {
        match (&s.get_ref().header, &s.get_ref().cookie) {
            (Some(h), None) => self.header_name(h, &format!("{key}.header")).map(StickyConfig::Header),
            (None, Some(c))
                if !c.get_ref().is_empty()
                    && c.get_ref().bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b)) =>
            {
                Some(StickyConfig::Cookie(c.get_ref().clone()))
            }
            (None, Some(c)) => {
                self.err(c, &format!("{key}.cookie"), format!("{:?} is not a valid cookie name", c.get_ref()));
                None
            }
            _ => {
                self.err(s, key, "set exactly one of `header` or `cookie`");
                None
            }
        }
    }

    /// One `upgrades` entry: an HTTP token (RFC 9110 §5.6.2), lower-cased; `h2c` is refused.
    fn upgrade_token(&mut self, u: &Sp<String>, key: &str) -> Option<String> {
        let token = u.get_ref().trim().to_ascii_lowercase();
        let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if token.is_empty() || !token.bytes().all(tchar) {
            self.err(u, key, format!("{:?} is not an upgrade protocol name such as \"websocket\"", u.get_ref()));
            None
        } else if token == "h2c" {
            let msg = "\"h2c\" can never be forwarded: an upgraded h2c connection would bypass routing, the split and measurement (clients speak HTTP/2 to veer directly instead)";
            self.err(u, key, msg);
            None
        } else {
            Some(token)
        }
    }

    /// `admin.public_url`: an http(s) URL with a host.
    fn public_url(&mut self, u: &Sp<String>) -> Option<http::Uri> {
        match u.get_ref().parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some_and(|h| !h.is_empty()) =>
            {
                Some(uri)
            }
            _ => {
                self.err(
                    u,
                    "admin.public_url",
                    format!("{:?} is not an http:// or https:// URL with a host", u.get_ref()),
                );
                None
            }
        }
    }

    fn header_name(&mut self, h: &Sp<String>, key: &str) -> Option<String> {
        match http::HeaderName::from_bytes(h.get_ref().as_bytes()) {
            Ok(n) => Some(n.as_str().to_string()),
            Err(_) => {
                self.err(h, key, format!("{:?} is not a valid header name", h.get_ref()));
                None
            }
        }
    }

    fn addr(&mut self, s: Option<&Sp<String>>, key: &str, default: &str) -> SocketAddr {
        let fallback = || default.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        let Some(s) = s else { return fallback() };
        match s.get_ref().parse() {
            Ok(a) => a,
            Err(_) => {
                self.err(s, key, format!("{:?} is not an IP:port socket address (e.g. \"0.0.0.0:8080\")", s.get_ref()));
                fallback()
            }
        }
    }

    fn duration(&mut self, s: Option<&Sp<String>>, key: &str, default: Duration) -> Duration {
        let Some(s) = s else { return default };
        match humantime::parse_duration(s.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.err(s, key, "duration must be greater than zero");
                default
            }
            Err(e) => {
                self.err(
                    s,
                    key,
                    format!("{:?} is not a duration ({e}); write e.g. \"250ms\", \"30s\", \"5m\"", s.get_ref()),
                );
                default
            }
        }
    }

    fn count(&mut self, s: Option<&Sp<i64>>, key: &str, default: usize, min: i64, max: i64) -> usize {
        let Some(s) = s else { return default };
        let v = *s.get_ref();
        if v < min || v > max {
            self.err(s, key, format!("{v} is outside [{min}, {max}]"));
            return default;
        }
        v as usize
    }

    fn rate(&mut self, s: Option<&Sp<f64>>, key: &str, default: f64) -> f64 {
        let Some(s) = s else { return default };
        let v = *s.get_ref();
        if !(0.0..=1.0).contains(&v) {
            self.err(s, key, format!("{v} is not a rate in [0, 1] (write 5% as 0.05)"));
            return default;
        }
        v
    }

    fn percent(&mut self, s: Option<&Sp<f64>>, key: &str, default: f64) -> f64 {
        let Some(s) = s else { return default };
        let v = *s.get_ref();
        if !(0.0..=100.0).contains(&v) {
            self.err(s, key, format!("{v} is not a percentage in [0, 100]"));
            return default;
        }
        v
    }

    fn path(&self, s: &Sp<String>) -> PathBuf {
        let p = Path::new(s.get_ref());
        if p.is_absolute() { p.to_path_buf() } else { self.base.join(p) }
    }
}

/// The machine's host name (a pod's name in Kubernetes): the default fleet node name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "veer".to_string())
}

/// `host:port` with a non-zero port and a plausible host; names are resolved at connect time.
fn check_endpoint(s: &str) -> Result<(), String> {
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = s.rsplit_once(':').ok_or("missing :port")?;
    let port: u16 = port.parse().map_err(|_| format!("port {port:?} is not a number in 1-65535"))?;
    if port == 0 {
        return Err("port 0 cannot be connected to".into());
    }
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
        return Err(format!("{host:?} is not a host name or IP address"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[[routes]]
name = "web"
[routes.stable]
version = "v1"
endpoints = ["127.0.0.1:9001"]
[routes.candidate]
version = "v2"
endpoints = ["127.0.0.1:9002"]
"#;

    fn errs(src: &str) -> Vec<Diagnostic> {
        match parse(Path::new("t.toml"), src) {
            Ok(_) => panic!("expected errors for:\n{src}"),
            Err(e) => e.diagnostics().to_vec(),
        }
    }

    #[test]
    fn minimal_route_gets_defaults() {
        let c = parse(Path::new("t.toml"), BASE).expect("valid");
        let r = &c.routes[0];
        assert_eq!(r.rollout.steps_bp, vec![100, 500, 2500, 5000, 10_000]);
        assert_eq!(r.rollback.tick, Duration::from_millis(100));
        assert_eq!(c.server.request_timeout, Duration::from_secs(30));
        assert_eq!(c.server.body_idle_timeout, Duration::from_secs(60));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let src = format!("{BASE}[routes.rollout]\nstepz = [1, 100]\n");
        let d = errs(&src);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].line, 11);
        assert_eq!(d[0].key, "routes[0].rollout.stepz");
        assert!(d[0].message.contains("unknown field"), "{}", d[0].message);
    }

    #[test]
    fn steps_must_increase_and_end_at_100() {
        let src = format!("{BASE}[routes.rollout]\nsteps = [5, 5, 50]\n");
        let d = errs(&src);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d.iter().all(|d| d.key == "routes[0].rollout.steps" && d.line == 11));
        assert!(d[0].message.contains("strictly increasing"));
        assert!(d[1].message.contains("must be 100"));
    }

    #[test]
    fn bad_duration_rate_and_endpoint_are_all_reported() {
        let src = BASE.replace("127.0.0.1:9002", "localhost")
            + "[routes.rollback]\nwindow = \"30 parsecs\"\nmax_error_rate = 5\n";
        let d = errs(&src);
        let keys: Vec<&str> = d.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(
            keys,
            ["routes[0].candidate.endpoints", "routes[0].rollback.window", "routes[0].rollback.max_error_rate"]
        );
        assert_eq!((d[1].line, d[1].col), (11, 10));
    }

    #[test]
    fn duplicate_route_names_are_rejected() {
        let src = format!("{BASE}{BASE}");
        let d = errs(&src);
        assert!(
            d.iter().any(|d| d.message.contains("duplicate route name") && d.line == 12 && d.key == "routes[1].name"),
            "{d:?}"
        );
    }

    #[test]
    fn empty_and_garbage_files_are_errors_not_panics() {
        assert!(errs("")[0].message.contains("empty"));
        assert_eq!(errs("\u{1}\u{2}[[[").len(), 1);
        assert!(errs("[server]\n")[0].message.contains("no [[routes]]"));
    }

    #[test]
    fn missing_tls_files_are_reported_at_the_key() {
        let src =
            format!("[server]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"nope.crt\"\ntls_key = \"nope.key\"\n{BASE}");
        let d = errs(&src);
        assert_eq!(d[0].key, "server.tls_cert");
        assert_eq!(d[0].line, 3);
    }

    #[test]
    fn unreachable_routes_and_clashing_listeners_are_errors() {
        let first = BASE
            .replace("\"web\"", "\"a\"")
            .replace("[[routes]]", "[admin]\nlisten = \"0.0.0.0:8080\"\ntoken_file = \"t\"\n[[routes]]");
        let d = errs(&(first + &BASE.replace("\"web\"", "\"b\"")));
        let keys: Vec<&str> = d.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(keys, ["admin.listen", "routes[1].path_prefix"], "{d:?}");
        assert!(d[1].message.contains("never be reached"));
    }

    #[test]
    fn cluster_settings_are_checked_at_their_keys() {
        let ok = parse(
            Path::new("/etc/veer/t.toml"),
            &format!(
                "[cluster]\netcd = [\"http://127.0.0.1:2379/\"]\nprefix = \"/veer/edge/\"\nnode = \"a-1\"\n{BASE}"
            ),
        )
        .expect("valid");
        let c = ok.cluster.expect("fleet mode");
        assert_eq!(
            (c.etcd, c.prefix.as_str(), c.node.as_str()),
            (vec!["http://127.0.0.1:2379".to_string()], "/veer/edge", "a-1")
        );
        assert_eq!((c.lease_ttl, c.publish_interval), (Duration::from_secs(5), Duration::from_millis(250)));
        let bad = "[cluster]\netcd = [\"127.0.0.1:2379\"]\nprefix = \"veer\"\nnode = \"a b\"\nlease_ttl = \"500ms\"\npublish_interval = \"2s\"\ncert_file = \"c.pem\"\nusername = \"u\"\n";
        let d = errs(&format!("{bad}{BASE}"));
        let keys: Vec<(&str, usize)> = d.iter().map(|d| (d.key.as_str(), d.line)).collect();
        assert_eq!(
            keys,
            [
                ("cluster.etcd", 2),
                ("cluster.prefix", 3),
                ("cluster.node", 4),
                ("cluster.lease_ttl", 5),
                ("cluster.publish_interval", 6),
                ("cluster.cert_file", 7),
                ("cluster.username", 8)
            ],
            "{d:?}"
        );
        assert!(
            errs(&format!("[cluster]\netcd = []\nprefix = \"/v\"\n{BASE}"))[0].message.contains("no etcd endpoint")
        );
    }

    #[test]
    fn tick_must_be_shorter_than_the_window_even_by_default() {
        let d = errs(&format!("{BASE}[routes.rollback]\nwindow = \"50ms\"\n"));
        assert_eq!(d[0].key, "routes[0].rollback.window");
    }

    #[test]
    fn steps_below_weight_resolution_are_rejected() {
        let d = errs(&format!("{BASE}[routes.rollout]\nsteps = [0.001, 100]\n"));
        assert!(d[0].message.contains("resolution"), "{d:?}");
    }

    #[test]
    fn a_public_admin_listener_needs_a_token() {
        let d = errs(&format!("[admin]\nlisten = \"0.0.0.0:9901\"\n{BASE}"));
        assert_eq!((d[0].key.as_str(), d[0].line), ("admin.listen", 2));
        assert!(
            parse(Path::new("t.toml"), &format!("[admin]\nlisten = \"0.0.0.0:9901\"\ntoken_file = \"t\"\n{BASE}"))
                .is_ok()
        );
    }

    #[test]
    fn connection_keys_get_defaults() {
        let c = parse(Path::new("t.toml"), BASE).expect("valid");
        assert_eq!(c.server.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.routes[0].upgrades, ["websocket"]);
        assert_eq!(c.admin.max_connections, 64);
        assert_eq!(c.admin.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.admin.idle_timeout, Duration::from_secs(60));
        assert!(c.admin.public_url.is_none());
    }

    #[test]
    fn h2c_is_never_an_allowed_upgrade() {
        let src = BASE.replace("name = \"web\"", "name = \"web\"\nupgrades = [\"WebSocket\", \"h2c\", \"bad token\"]");
        let d = errs(&src);
        let msgs: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(d.len(), 2, "{msgs:?}");
        assert!(d.iter().all(|d| d.key == "routes[0].upgrades"), "{d:?}");
        assert!(msgs[0].contains("h2c") && msgs[0].contains("never"), "{msgs:?}");
        let ok = BASE.replace("name = \"web\"", "name = \"web\"\nupgrades = [\"WebSocket\", \"foo\"]");
        assert_eq!(parse(Path::new("t.toml"), &ok).expect("valid").routes[0].upgrades, ["websocket", "foo"]);
    }

    #[test]
    fn admin_limits_and_public_url_are_checked() {
        let d = errs(&format!("[admin]\nmax_connections = 0\npublic_url = \"ftp://x\"\nidle_timeout = \"0s\"\n{BASE}"));
        let keys: Vec<&str> = d.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(keys, ["admin.max_connections", "admin.public_url", "admin.idle_timeout"], "{d:?}");
        let c = parse(Path::new("t.toml"), &format!("[admin]\npublic_url = \"https://veer.example:8443/\"\n{BASE}"))
            .expect("valid");
        assert_eq!(c.admin.public_url.expect("set").host(), Some("veer.example"));
    }

    #[test]
    fn endpoint_shapes() {
        assert!(check_endpoint("127.0.0.1:80").is_ok());
        assert!(check_endpoint("[::1]:80").is_ok());
        assert!(check_endpoint("svc.local:8080").is_ok());
        assert!(check_endpoint("http://x:80").is_err());
        assert!(check_endpoint("x:0").is_err());
        assert!(check_endpoint("x").is_err());
    }
}
