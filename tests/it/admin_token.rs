//! The admin token file: a world-readable one is named in a warning at start; a private one is
//! not.
#![allow(clippy::disallowed_methods)]

use std::os::unix::fs::PermissionsExt;

use crate::common::*;
use serde_json::Value;

/// Starts `veer run` and returns its JSON log lines up to "veer is serving", then stops it.
fn start_logs(config: &std::path::Path) -> Vec<Value> {
    std::mem::take(&mut Veer::spawn(config).startup_logs)
}

fn token_warnings(logs: &[Value]) -> Vec<&Value> {
    logs.iter().filter(|v| v["fields"]["message"].as_str().is_some_and(|m| m.contains("admin token file"))).collect()
}

#[test]
fn a_world_readable_token_file_is_named_in_a_warning_at_start() {
    let stable = refused_addr();
    let cfg = ConfigFile::new(&format!("{}{}", listeners("", "token_file = \"admin.token\""), route(stable, None, "")));
    let token = cfg.dir.path().join("admin.token");
    std::fs::write(&token, "s3cret\n").expect("token");

    for (mode, warned) in [(0o644, true), (0o604, true), (0o640, false), (0o600, false)] {
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let logs = start_logs(&cfg.path);
        let warnings = token_warnings(&logs);
        if warned {
            assert_eq!(warnings.len(), 1, "mode {mode:o}: {logs:?}");
            let w = warnings[0];
            assert_eq!(w["level"], "WARN", "{w}");
            assert_eq!(w["fields"]["file"].as_str(), Some(token.to_str().expect("utf-8 path")), "{w}");
            assert_eq!(w["fields"]["mode"].as_str(), Some(format!("{mode:o}").as_str()), "{w}");
            assert!(w["fields"]["message"].as_str().is_some_and(|m| m.contains("chmod 600")), "{w}");
        } else {
            assert!(warnings.is_empty(), "mode {mode:o}: {warnings:?}");
        }
    }
}
