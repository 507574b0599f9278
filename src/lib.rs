//! veer: a progressive-delivery proxy.
//!
//! veer sits in front of a service, splits HTTP traffic by weight between a **stable** and a
//! **candidate** version, measures every request of each version on the hot path, and
//! exposes what it sees to operators (admin API, Prometheus).
//!
//! Modules, from the leaves up; each one only uses modules listed above it, except inside the
//! data plane: `policy` uses `snapshot`'s `Route` while a `Route` holds its `RoutePolicy`, and
//! `upstream`'s client type carries `proxy`'s request body type.
//!
//! - leaves:
//!   - [`shard`]: per-thread shards for hot-path counters;
//!   - [`stats`]: per-version outcome counters and rolling windows;
//!   - [`split`]: the weighted stable/candidate pick;
//!   - [`telemetry`]: metric names, the Prometheus exporter, log setup;
//!   - [`tls`]: certificate loading and the TLS acceptor;
//!   - [`config`]: parse and validate the config file into checked types;
//!   - [`router`]: route matching by host and path prefix;
//!   - [`headers`]: header rewriting between client and upstream;
//!   - [`conn_settings`]: how one generation's client connections are served (TLS, hyper);
//! - pure rollout logic: [`rollout`] (phases, the judge, the step machine, the live weight);
//! - state:
//!   - [`route_state`]: per-route measurement state carried across config generations;
//!   - [`journal`]: the on-disk rollout journal and state files;
//!   - [`snapshot`]: one immutable configuration generation, published with `arc-swap`;
//! - data plane:
//!   - [`upstream`]: endpoints, passive ejection, pooled upstream clients;
//!   - [`policy`]: override/sticky assignment, retry on stable, mirroring;
//!   - [`data_plane`]: the handle every request path holds (snapshot, clients, drain signals);
//!   - [`proxy`]: one request, from routing to the recorded outcome;
//!   - [`connection`]: one client connection, protocol detection, idle watchdog;
//!   - [`health`]: active endpoint health checks;
//! - control plane:
//!   - [`notify`]: webhooks for rollout transitions;
//!   - [`status`]: the route status the admin API returns and the CLI prints;
//!   - [`report`]: a rollout's incident-review report;
//!   - [`control`]: the control-plane thread ticking every route's rollout controller;
//!   - [`operations`]: the handle the operator side holds (config path, journal, commands);
//!   - [`reload`]: re-read, validate and publish a new generation;
//!   - [`admin`]: the admin API and dashboard;
//! - [`server`]: listeners, accept and drain (nothing in the crate depends on it);
//! - [`simulate`]: `veer simulate`, the rollout logic in virtual time;
//! - [`cli`]: the command line.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![allow(clippy::disallowed_methods)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod conn_settings;
pub mod connection;
pub mod control;
pub mod data_plane;
pub mod fleet;
pub mod headers;
pub mod health;
pub mod history;
pub mod journal;
pub mod notify;
pub mod operations;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod report;
pub mod rollout;
pub mod route_state;
pub mod router;
pub mod server;
pub mod shard;
pub mod simulate;
pub mod snapshot;
pub mod split;
pub mod stats;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod upstream;
