//! The integration tests, as modules of one test crate: the library and every dependency are
//! linked into one binary instead of one per file, which makes a rebuild much cheaper. A test
//! is named `MODULE::TEST`; `cargo test --test it MODULE::` runs one file's tests.
//!
//! tests/under_load.rs stays a crate of its own: its tests take turns so that each has the
//! machine's cores to itself, which tests of other files running beside them would break.
#![allow(clippy::disallowed_methods)]

#[path = "../common/mod.rs"]
mod common;

mod admin_fuzz_regressions;
mod admin_token;
mod blue_green;
mod cli_admin;
mod cli_check;
mod config_corpus;
mod config_reference;
mod connection_limits;
mod crash;
mod dashboard;
mod demo;
mod deploy_assets;
mod docs_links;
mod endpoint_health;
mod error_paths;
mod etcd_harness;
mod fault_attribution;
mod fleet;
mod harness;
mod hostile;
mod journal;
mod judge_statistics;
mod measurement;
mod policies;
mod process;
mod prometheus_scrape;
mod properties;
mod protocols;
mod reload;
mod rollout;
mod split;
mod upgrades;
mod upstream_protocol;
