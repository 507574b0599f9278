//! veer: a progressive-delivery proxy.
//!
//! veer sits in front of a service, splits HTTP traffic by weight between a **stable** and a
//! **candidate** version, measures every request of each version on the hot path, and
//! exposes what it sees to operators (admin API, Prometheus).
//!
//! The crate is split into a data plane that handles each request without locks and a
//! control plane that ticks a few times a second:
//!
//! - data plane: [`server`] (listeners, connections, drain) → [`proxy`] (per request) →
//!   [`router`], [`split`], [`upstream`] → [`stats`] (outcome recording);
//! - control plane: [`control`] (tick loop, windows, metrics), [`reload`], [`admin`],
//!   [`health`] (active endpoint checks);
//! - shared vocabulary: [`config`], [`snapshot`] (one immutable generation, published with
//!   `arc-swap`), [`runtime`] and [`rollout`] (state that survives reloads), [`status`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![allow(clippy::disallowed_methods)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod connection;
pub mod control;
pub mod health;
pub mod journal;
pub mod notify;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod report;
pub mod rollout;
pub mod router;
pub mod runtime;
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
