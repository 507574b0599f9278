//! Arbitrary text through `Config::parse`, the code path of `veer check`, `veer run` and every
//! reload. It must never panic; a rejection must list its problems top to bottom, one line
//! each (`veer check` prints one per line), pointing inside the text; an accepted config must
//! build a snapshot (validation promises that `Snapshot::build` cannot fail).
#![no_main]

use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use veer::config::Config;
use veer::snapshot::Snapshot;
use veer::telemetry::Telemetry;

fuzz_target!(|data: &[u8]| {
    let src = String::from_utf8_lossy(data);
    // A directory that does not exist: relative TLS paths in the input never reach real files.
    let path = Path::new("/nonexistent/veer-fuzz/veer.toml");
    match Config::parse(path, &src) {
        Ok(config) => {
            assert!(!config.routes.is_empty(), "accepted a config without routes");
            if let Err(e) = Snapshot::build(Arc::new(config), None, &Telemetry::new(), 1, None) {
                panic!("validated config does not build: {e}");
            }
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            let diags = e.diagnostics();
            assert!(!diags.is_empty(), "a rejection without a diagnostic: {e}");
            let max_line = src.lines().count().max(1) + 1;
            for d in diags {
                assert!((1..=max_line).contains(&d.line) && d.col >= 1, "{d} points outside the text");
                assert!(!d.to_string().contains('\n'), "a diagnostic spans lines: {d:?}");
            }
            assert!(diags.is_sorted_by_key(|d| (d.line, d.col)), "diagnostics out of order: {e}");
        }
    }
});
