//! The deployment assets in `deploy/` checked against the real thing: the PromQL of the
//! Prometheus rules and the Grafana dashboard against a real proxy's `/metrics`, the Kubernetes
//! manifests, the Dockerfile and the systemd unit against the binary's real flags and config
//! parser, and the container health check against a real admin listener.
//!
//! `promtool check/test` of `deploy/prometheus/` runs in `.ci/run`; the dashboard's PromQL is
//! parsed here by promtool when it is installed.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use clap::Parser;
use http::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use veer::cli::Cli;
use veer::config::Config;
use veer::server::Proxy;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

const MANIFESTS: [&str; 2] = ["deploy/k8s/edge.yaml", "deploy/k8s/sidecar.yaml"];

// ---------------------------------------------------------------------------------------------
// PromQL sources
// ---------------------------------------------------------------------------------------------

/// Every `expr` of `deploy/prometheus/rules.yml`, and the names it records.
fn rule_exprs() -> (Vec<String>, BTreeSet<String>) {
    let rules: Value = serde_yaml_ng::from_str(&read("deploy/prometheus/rules.yml")).expect("rules.yml is YAML");
    let mut exprs = Vec::new();
    let mut records = BTreeSet::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            exprs.push(rule["expr"].as_str().expect("every rule has an expr").to_string());
            if let Some(r) = rule["record"].as_str() {
                records.insert(r.to_string());
            }
        }
    }
    (exprs, records)
}

fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/veer.json")).expect("deploy/grafana/veer.json is valid JSON")
}

/// Every PromQL expression of the dashboard: panel targets, annotations, variable queries.
fn dashboard_exprs(d: &Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for panel in d["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().expect("targets") {
            exprs.push(t["expr"].as_str().expect("target expr").to_string());
        }
    }
    for a in d["annotations"]["list"].as_array().expect("annotations") {
        if let Some(e) = a["expr"].as_str() {
            exprs.push(e.to_string());
        }
    }
    for v in d["templating"]["list"].as_array().expect("templating") {
        for key in ["query", "definition"] {
            match &v[key] {
                Value::String(s) => exprs.push(s.clone()),
                Value::Object(o) => exprs.extend(o.get("query").and_then(Value::as_str).map(str::to_string)),
                _ => {}
            }
        }
    }
    exprs
}

fn ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// Names `veer_[a-z0-9_]+` that start an identifier (not inside `level:veer_x:op` names).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let b = expr.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(off) = expr[i..].find("veer_") {
        let start = i + off;
        let mut end = start + "veer_".len();
        while end < b.len() && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_') {
            end += 1;
        }
        let standalone = (start == 0 || !ident_char(b[start - 1])) && (end == b.len() || b[end] != b':');
        if standalone {
            out.insert(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

/// Identifiers with a colon: recording-rule names (`level:metric:operations`).
fn recorded_refs(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.contains(':') && t.starts_with(|c: char| c.is_ascii_alphabetic()))
        .map(str::to_string)
        .collect()
}

/// Exact label matchers `name="value"` in an expression (regex alternatives `=~"a|b"` too).
fn label_matchers(expr: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (pos, _) in expr.match_indices('"') {
        // Only opening quotes preceded by `=` or `=~`.
        let before = &expr[..pos];
        let (op_len, regex) = if before.ends_with("=~") {
            (2, true)
        } else if before.ends_with('=') && !before.ends_with("!=") {
            (1, false)
        } else {
            continue;
        };
        let name_end = pos - op_len;
        let name_start =
            expr[..name_end].rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(0, |p| p + 1);
        let name = expr[name_start..name_end].trim();
        let Some(len) = expr[pos + 1..].find('"') else { continue };
        let value = &expr[pos + 1..pos + 1 + len];
        if name.is_empty() || value.contains('$') || value.contains(".*") {
            continue;
        }
        let values: Vec<&str> = if regex { value.split('|').collect() } else { vec![value] };
        out.extend(values.into_iter().map(|v| (name.to_string(), v.to_string())));
    }
    out
}

/// Sample names in Prometheus text exposition format.
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_metric_name_scanner_finds_what_it_should() {
    let e =
        r#"sum by (route) (rate(veer_requests_total{class=~"5xx|error"}[1m])) / route_version:veer_requests:rate1m"#;
    assert_eq!(metric_names(e), BTreeSet::from(["veer_requests_total".to_string()]));
    assert_eq!(recorded_refs(e), BTreeSet::from(["route_version:veer_requests:rate1m".to_string()]));
    let m = label_matchers(r#"veer_rollout_phase{route=~"$route", phase="rolled_back", class=~"5xx|error"}"#);
    let want: BTreeSet<(String, String)> =
        [("phase", "rolled_back"), ("class", "5xx"), ("class", "error")].map(|(a, b)| (a.into(), b.into())).into();
    assert_eq!(m, want);
}

// ---------------------------------------------------------------------------------------------
// Kubernetes manifests
// ---------------------------------------------------------------------------------------------

fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: not valid YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().map(|s| s.as_str().expect("string").to_string()).collect()).unwrap_or_default()
}

/// `labels` holds every key/value of `selector`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let sel = selector.as_object().expect("matchLabels");
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The config path `veer run` is given in `args` (checked with the binary's own parser).
fn run_config_path(args: &[String]) -> String {
    let argv = std::iter::once("veer".to_string()).chain(args.iter().cloned());
    if let Err(e) = Cli::try_parse_from(argv) {
        panic!("veer does not accept {args:?}: {e}");
    }
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?} does not run the proxy");
    let at = args.iter().position(|a| a == "-c" || a == "--config").expect("args name the config with -c");
    args[at + 1].clone()
}

/// The seconds of a `preStop` `sleep N`, if any.
fn pre_stop_sleep(container: &Value) -> u64 {
    let cmd = strs(&container["lifecycle"]["preStop"]["exec"]["command"]);
    if cmd.first().map(String::as_str) == Some("sleep") {
        return cmd[1].parse().expect("sleep seconds");
    }
    container["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().unwrap_or(0)
}

/// The container port a probe or Service names (by name or number).
fn resolve_port(container: &Value, port: &Value) -> u16 {
    let ports = container["ports"].as_array().expect("ports");
    let found = match port {
        Value::String(name) => ports.iter().find(|p| p["name"] == name.as_str()),
        Value::Number(_) => ports.iter().find(|p| p["containerPort"] == *port),
        _ => None,
    };
    let p = found.unwrap_or_else(|| panic!("port {port} is not a port of container {}", container["name"]));
    u16::try_from(p["containerPort"].as_u64().expect("containerPort")).expect("port")
}

fn port_named(container: &Value, name: &str) -> u16 {
    resolve_port(container, &Value::String(name.into()))
}

/// The volume mounted at `dir` in `container`, if any.
fn volume_at<'a>(pod: &'a Value, container: &Value, dir: &Path) -> Option<&'a Value> {
    let mount = container["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| Path::new(m["mountPath"].as_str().unwrap_or("")) == dir)?;
    pod["volumes"].as_array()?.iter().find(|v| v["name"] == mount["name"])
}

/// What one manifest file deploys, after checking it against the binary and its config.
struct Checked {
    config_path: String,
    http_port: u16,
    admin_port: u16,
    run_as_user: u64,
    probe_paths: Vec<String>,
    scrape_paths: Vec<String>,
    /// The embedded config, parsed, and its text.
    config: Config,
    toml: String,
    /// The Deployment.
    deployment: Value,
}

fn check_manifest(rel: &str) -> Checked {
    let docs = yaml_docs(rel);
    let [deployment] = of_kind(&docs, "Deployment")[..] else { panic!("{rel}: one Deployment") };
    assert_eq!(deployment["apiVersion"], "apps/v1", "{rel}");
    let template = &deployment["spec"]["template"];
    let pod_labels = &template["metadata"]["labels"];
    assert!(selects(&deployment["spec"]["selector"]["matchLabels"], pod_labels), "{rel}: selector/labels");
    let pod = &template["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    let veer = containers.iter().find(|c| c["name"] == "veer").unwrap_or_else(|| panic!("{rel}: a veer container"));

    // Args: the binary's real subcommand and flags; no `command`, so the image's ENTRYPOINT runs.
    assert!(veer.get("command").is_none(), "{rel}: `command` would bypass the image's ENTRYPOINT");
    let args = strs(&veer["args"]);
    let config_path = run_config_path(&args);

    // The config file comes from the ConfigMap in the same file, mounted as a directory.
    let config_file = Path::new(&config_path);
    let volume = volume_at(pod, veer, config_file.parent().expect("dir"))
        .unwrap_or_else(|| panic!("{rel}: nothing is mounted at the folder of {config_path}"));
    let cm_name = volume["configMap"]["name"].as_str().unwrap_or_else(|| panic!("{rel}: config is a ConfigMap"));
    let cm = of_kind(&docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == cm_name)
        .unwrap_or_else(|| panic!("{rel}: ConfigMap {cm_name}"));
    let key = config_file.file_name().expect("file").to_str().expect("utf8");
    let toml = cm["data"][key].as_str().unwrap_or_else(|| panic!("{rel}: ConfigMap {cm_name} has no {key}"));

    // The embedded config passes veer's parser, and `veer check` on a copy of it.
    let config = Config::parse(config_file, toml).unwrap_or_else(|e| panic!("{rel}: {config_path} is invalid:\n{e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join(key);
    std::fs::write(&copy, toml).expect("write");
    let out = Command::new(veer_bin()).arg("check").arg(&copy).output().expect("run veer check");
    assert!(out.status.success(), "{rel}: veer check failed:\n{}", String::from_utf8_lossy(&out.stderr));

    // Listeners: reachable on the pod IP, on the ports the container declares.
    let (http_port, admin_port) = (port_named(veer, "http"), port_named(veer, "admin"));
    assert!(config.server.listen.ip().is_unspecified(), "{rel}: server.listen must bind 0.0.0.0");
    assert!(config.admin.listen.ip().is_unspecified(), "{rel}: admin.listen must bind 0.0.0.0 for the kubelet");
    assert_eq!(config.server.listen.port(), http_port, "{rel}: server.listen vs containerPort http");
    assert_eq!(config.admin.listen.port(), admin_port, "{rel}: admin.listen vs containerPort admin");

    // Probes: the admin endpoints, on the admin port.
    let mut probe_paths = Vec::new();
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &veer[probe]["httpGet"];
        assert_eq!(get["path"], path, "{rel}: {probe}");
        assert_eq!(resolve_port(veer, &get["port"]), admin_port, "{rel}: {probe} must ask the admin port");
        probe_paths.push(path.to_string());
    }

    // Termination: preStop sleep, then SIGTERM and the drain, all within the grace period.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    let veer_pre_stop = pre_stop_sleep(veer);
    assert!(veer_pre_stop > 0, "{rel}: veer needs a preStop sleep");
    let drain = config.server.drain_timeout.as_secs();
    assert!(grace > veer_pre_stop + drain, "{rel}: grace {grace}s <= preStop {veer_pre_stop}s + drain {drain}s");
    for c in containers {
        assert!(grace > pre_stop_sleep(c), "{rel}: container {} outlives the grace period", c["name"]);
    }

    // Security: non-root, read-only root, no capabilities; the state dir is a writable emptyDir.
    let sc = |key: &str| veer["securityContext"].get(key).or_else(|| pod["securityContext"].get(key)).cloned();
    assert_eq!(sc("runAsNonRoot"), Some(Value::Bool(true)), "{rel}: runAsNonRoot");
    assert_eq!(sc("readOnlyRootFilesystem"), Some(Value::Bool(true)), "{rel}: readOnlyRootFilesystem");
    assert_eq!(sc("allowPrivilegeEscalation"), Some(Value::Bool(false)), "{rel}: allowPrivilegeEscalation");
    let drop = strs(&veer["securityContext"]["capabilities"]["drop"]);
    assert_eq!(drop, ["ALL"], "{rel}: capabilities.drop");
    let run_as_user = sc("runAsUser").and_then(|v| v.as_u64()).expect("runAsUser");
    let state = volume_at(pod, veer, &config.state_dir)
        .unwrap_or_else(|| panic!("{rel}: state.dir {} is not a mounted volume", config.state_dir.display()));
    assert!(state.get("emptyDir").is_some(), "{rel}: state.dir should be an emptyDir");
    for (what, v) in [("requests", "memory"), ("limits", "memory"), ("requests", "cpu")] {
        assert!(!veer["resources"][what][v].is_null(), "{rel}: resources.{what}.{v}");
    }

    // The admin token comes from a Secret volume holding that file.
    let token = config.admin.token_file.as_deref().unwrap_or_else(|| panic!("{rel}: admin.token_file"));
    let secret = volume_at(pod, veer, token.parent().expect("dir"))
        .unwrap_or_else(|| panic!("{rel}: nothing is mounted at the folder of {}", token.display()));
    assert!(secret["secret"]["secretName"].is_string(), "{rel}: the token is a Secret");
    let file = token.file_name().expect("file").to_str().expect("utf8");
    let items = secret["secret"]["items"].as_array().expect("items");
    assert!(items.iter().any(|i| i["path"] == file), "{rel}: the Secret volume has no {file}");

    // The Service sends clients to veer's http port.
    let [service] = of_kind(&docs, "Service")[..] else { panic!("{rel}: one Service") };
    assert!(selects(&service["spec"]["selector"], pod_labels), "{rel}: Service selector");
    for p in service["spec"]["ports"].as_array().expect("ports") {
        assert_eq!(resolve_port(veer, &p["targetPort"]), http_port, "{rel}: Service targetPort");
    }

    // The PodMonitor scrapes /metrics on the admin port of these pods.
    let [monitor] = of_kind(&docs, "PodMonitor")[..] else { panic!("{rel}: one PodMonitor") };
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1", "{rel}");
    assert!(selects(&monitor["spec"]["selector"]["matchLabels"], pod_labels), "{rel}: PodMonitor selector");
    let mut scrape_paths = Vec::new();
    for e in monitor["spec"]["podMetricsEndpoints"].as_array().expect("podMetricsEndpoints") {
        assert_eq!(resolve_port(veer, &e["port"]), admin_port, "{rel}: PodMonitor port");
        scrape_paths.push(e["path"].as_str().expect("path").to_string());
    }
    Checked {
        config_path,
        http_port,
        admin_port,
        run_as_user,
        probe_paths,
        scrape_paths,
        toml: toml.to_string(),
        config,
        deployment: deployment.clone(),
    }
}

#[test]
fn kubernetes_manifests_match_the_binary_and_their_config() {
    for rel in MANIFESTS {
        let c = check_manifest(rel);
        assert_eq!(c.scrape_paths, ["/metrics"], "{rel}");
        assert_eq!(c.config_path, "/etc/veer/veer.toml", "{rel}");
    }
}

// ---------------------------------------------------------------------------------------------
// The etcd of fleet mode
// ---------------------------------------------------------------------------------------------

const ETCD_MANIFEST: &str = "deploy/k8s/etcd.yaml";

/// etcd's `--flag=value` arguments as a map (`--flag` alone is `true`); each flag once.
fn etcd_flags(args: &[String]) -> BTreeMap<String, String> {
    let mut flags = BTreeMap::new();
    for a in args {
        let f = a.strip_prefix("--").unwrap_or_else(|| panic!("{ETCD_MANIFEST}: {a:?} is not a --flag"));
        let (k, v) = f.split_once('=').unwrap_or((f, "true"));
        assert!(flags.insert(k.to_string(), v.to_string()).is_none(), "{ETCD_MANIFEST}: --{k} given twice");
    }
    flags
}

/// The port of an `http://host:port` URL.
fn url_port(url: &str) -> u16 {
    let uri: http::Uri = url.parse().unwrap_or_else(|e| panic!("{url:?} is not a URL: {e}"));
    assert_eq!(uri.scheme_str(), Some("http"), "{url}");
    uri.port_u16().unwrap_or_else(|| panic!("{url} has no port"))
}

/// What the etcd manifest deploys, after checking it is a three-member cluster that can form
/// and keep a quorum: its members' client URLs as a pod of the same namespace reaches them,
/// and the Raft timing its flags set.
struct EtcdDeployed {
    client_urls: Vec<String>,
    timing: crate::common::etcd::Timing,
}

fn check_etcd_manifest() -> EtcdDeployed {
    let rel = ETCD_MANIFEST;
    let docs = yaml_docs(rel);
    let [sts] = of_kind(&docs, "StatefulSet")[..] else { panic!("{rel}: one StatefulSet") };
    assert_eq!(sts["apiVersion"], "apps/v1", "{rel}");
    let name = sts["metadata"]["name"].as_str().expect("name");
    let replicas = sts["spec"]["replicas"].as_u64().expect("replicas");
    assert_eq!(replicas, 3, "{rel}: three members, so one can fail and two still make a quorum");
    // OrderedReady would deadlock: member 0 is only ready with a quorum it cannot have alone.
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel", "{rel}: podManagementPolicy");
    let template = &sts["spec"]["template"];
    let pod_labels = &template["metadata"]["labels"];
    assert!(selects(&sts["spec"]["selector"]["matchLabels"], pod_labels), "{rel}: selector/labels");
    let pod = &template["spec"];
    let [etcd] = pod["containers"].as_array().expect("containers").iter().collect::<Vec<_>>()[..] else {
        panic!("{rel}: one container")
    };

    // The headless Service that names the members, resolvable before they are ready.
    let svc_name = sts["spec"]["serviceName"].as_str().unwrap_or_else(|| panic!("{rel}: serviceName"));
    let svc = of_kind(&docs, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == svc_name)
        .unwrap_or_else(|| panic!("{rel}: no Service {svc_name}"));
    assert_eq!(svc["spec"]["clusterIP"], "None", "{rel}: {svc_name} must be headless");
    assert_eq!(svc["spec"]["publishNotReadyAddresses"], true, "{rel}: peers must resolve before ready");
    assert!(selects(&svc["spec"]["selector"], pod_labels), "{rel}: Service selector");
    let (client_port, peer_port) = (port_named(etcd, "client"), port_named(etcd, "peer"));
    let svc_ports: BTreeSet<u16> =
        svc["spec"]["ports"].as_array().expect("ports").iter().map(|p| resolve_port(etcd, &p["targetPort"])).collect();
    assert_eq!(svc_ports, BTreeSet::from([client_port, peer_port]), "{rel}: Service ports");

    // Every $(VAR) in the args is an env var of the container (Kubernetes leaves others as is).
    let env: BTreeMap<String, String> = etcd["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            let from = e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap_or_else(|| panic!("{rel}: env {e}"));
            (e["name"].as_str().expect("env name").to_string(), from.to_string())
        })
        .collect();
    assert_eq!(env.get("POD_NAME").map(String::as_str), Some("metadata.name"), "{rel}: POD_NAME");
    assert_eq!(env.get("POD_NAMESPACE").map(String::as_str), Some("metadata.namespace"), "{rel}: POD_NAMESPACE");
    let args = strs(&etcd["args"]);
    for a in &args {
        for var in a.split("$(").skip(1) {
            let var = var.split_once(')').expect("closed $(").0;
            assert!(env.contains_key(var), "{rel}: {a} uses $({var}), which is not in env");
        }
    }
    let flags = etcd_flags(&args);
    let flag = |k: &str| flags.get(k).map(String::as_str).unwrap_or_else(|| panic!("{rel}: no --{k}"));

    // Names and URLs: member N is pod {name}-N, reached by its name in the headless Service.
    let host = |pod: &str| format!("{pod}.{svc_name}.$(POD_NAMESPACE).svc");
    assert_eq!(flag("name"), "$(POD_NAME)", "{rel}");
    let initial: Vec<String> =
        (0..replicas).map(|i| format!("{name}-{i}=http://{}:{peer_port}", host(&format!("{name}-{i}")))).collect();
    assert_eq!(flag("initial-cluster"), initial.join(","), "{rel}: --initial-cluster");
    let me = host("$(POD_NAME)");
    assert_eq!(flag("initial-advertise-peer-urls"), format!("http://{me}:{peer_port}"), "{rel}");
    assert_eq!(flag("advertise-client-urls"), format!("http://{me}:{client_port}"), "{rel}");
    assert_eq!(url_port(flag("listen-client-urls")), client_port, "{rel}: --listen-client-urls");
    assert_eq!(url_port(flag("listen-peer-urls")), peer_port, "{rel}: --listen-peer-urls");
    assert_eq!(flag("initial-cluster-state"), "new", "{rel}");

    // History is compacted, so the backend does not grow with every write.
    let retention = flag("auto-compaction-retention");
    assert!(!retention.is_empty() && retention != "0", "{rel}: --auto-compaction-retention={retention}");

    // Data on a PersistentVolumeClaim of the StatefulSet, mounted at --data-dir.
    let data_dir = Path::new(flag("data-dir"));
    let mount = etcd["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| Path::new(m["mountPath"].as_str().unwrap_or("")) == data_dir)
        .unwrap_or_else(|| panic!("{rel}: nothing is mounted at --data-dir {}", data_dir.display()));
    let claim = sts["spec"]["volumeClaimTemplates"]
        .as_array()
        .expect("volumeClaimTemplates")
        .iter()
        .find(|c| c["metadata"]["name"] == mount["name"])
        .unwrap_or_else(|| panic!("{rel}: --data-dir is not a volumeClaimTemplate"));
    assert!(claim["spec"]["resources"]["requests"]["storage"].is_string(), "{rel}: claim storage request");

    // Probes: ready on /health, alive on something that needs no quorum, on served ports.
    let metrics_port = url_port(flag("listen-metrics-urls"));
    assert_eq!(port_named(etcd, "metrics"), metrics_port, "{rel}: --listen-metrics-urls vs containerPort");
    let ready = &etcd["readinessProbe"]["httpGet"];
    assert_eq!(ready["path"], "/health", "{rel}: readinessProbe");
    let live = &etcd["livenessProbe"]["httpGet"];
    assert_ne!(live["path"], "/health", "{rel}: a liveness /health restarts every member on quorum loss");
    for probe in [ready, live] {
        assert_eq!(resolve_port(etcd, &probe["port"]), metrics_port, "{rel}: probes ask the metrics port");
    }
    for (what, v) in [("requests", "memory"), ("requests", "cpu"), ("limits", "memory")] {
        assert!(!etcd["resources"][what][v].is_null(), "{rel}: resources.{what}.{v}");
    }

    // Node drains keep a quorum.
    let [pdb] = of_kind(&docs, "PodDisruptionBudget")[..] else { panic!("{rel}: one PodDisruptionBudget") };
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels), "{rel}: PDB selector");
    assert_eq!(pdb["spec"]["minAvailable"].as_u64(), Some(replicas / 2 + 1), "{rel}: PDB keeps a quorum");

    // Every flag is one the real etcd knows (where it is installed).
    match find_tool("etcd") {
        Some(bin) => {
            let out = Command::new(bin).arg("--help").output().expect("run etcd --help");
            let help = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            for k in flags.keys() {
                assert!(help.contains(&format!("--{k} ")), "{rel}: etcd does not know --{k}");
            }
        }
        None => skip_unless_required(
            crate::common::etcd::REQUIRE_ETCD,
            "etcd_manifest (flags against etcd --help)",
            "no `etcd` binary (apt-get install etcd-server)",
        ),
    }

    let ms = |k: &str, default: u64| Duration::from_millis(flags.get(k).map_or(default, |v| v.parse().expect("ms")));
    EtcdDeployed {
        client_urls: (0..replicas).map(|i| format!("http://{name}-{i}.{svc_name}:{client_port}")).collect(),
        timing: crate::common::etcd::Timing {
            heartbeat: ms("heartbeat-interval", 100),
            election: ms("election-timeout", 1000),
        },
    }
}

#[test]
fn etcd_manifest_is_a_three_member_cluster_that_keeps_its_quorum() {
    let deployed = check_etcd_manifest();
    assert_eq!(deployed.client_urls.len(), 3);
}

#[test]
fn edge_runs_three_replicas_in_fleet_mode_on_the_etcd_manifest() {
    let rel = "deploy/k8s/edge.yaml";
    let edge = check_manifest(rel);
    let etcd = check_etcd_manifest();
    assert_eq!(edge.deployment["spec"]["replicas"], 3, "{rel}: replicas");

    let cluster = edge.config.cluster.as_ref().unwrap_or_else(|| panic!("{rel}: no [cluster]: not in fleet mode"));
    assert_eq!(cluster.etcd, etcd.client_urls, "{rel}: [cluster].etcd vs the members of {ETCD_MANIFEST}");
    // One ConfigMap for every pod: the node name must come from the default, the host name,
    // which is the pod's name as long as the pod spec does not set another.
    let raw: toml::Table = toml::from_str(&edge.toml).expect("toml");
    assert!(raw["cluster"].get("node").is_none(), "{rel}: a fixed cluster.node would be shared by every pod");
    let pod = &edge.deployment["spec"]["template"]["spec"];
    assert!(pod.get("hostname").is_none() && pod.get("setHostnameAsFQDN").is_none(), "{rel}: host name != pod name");
    // etcd raises a shorter TTL to its minimum, and veer would count replicas gone later.
    assert!(
        cluster.lease_ttl >= etcd.timing.min_lease_ttl(),
        "{rel}: lease_ttl {:?} is below what {ETCD_MANIFEST}'s etcd grants ({:?})",
        cluster.lease_ttl,
        etcd.timing.min_lease_ttl()
    );
}

// ---------------------------------------------------------------------------------------------
// Dockerfile and systemd unit
// ---------------------------------------------------------------------------------------------

/// Dockerfile instructions (continuation lines joined, comments dropped) as (KEYWORD, rest).
fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in read("deploy/Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                cur.push_str(head);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                let (k, rest) = cur.trim().split_once(char::is_whitespace).unwrap_or((cur.trim(), ""));
                out.push((k.to_ascii_uppercase(), rest.trim().to_string()));
                cur.clear();
            }
        }
    }
    out
}

fn exec_form(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{s:?} is not an exec-form JSON array: {e}"))
}

#[test]
fn dockerfile_runs_the_real_flags_with_the_config_the_manifests_mount() {
    let all = dockerfile();
    let stages: Vec<usize> = all.iter().enumerate().filter(|(_, (k, _))| k == "FROM").map(|(i, _)| i).collect();
    assert!(stages.len() >= 2, "a multi-stage build");
    let runtime = &all[*stages.last().expect("stage")..];
    let get = |k: &str| runtime.iter().filter(|(kk, _)| kk == k).map(|(_, v)| v.clone()).collect::<Vec<_>>();
    assert!(get("FROM")[0].starts_with("debian:bookworm-slim"), "small runtime image: {:?}", get("FROM"));

    let entrypoint = exec_form(get("ENTRYPOINT").last().expect("ENTRYPOINT"));
    assert_eq!(entrypoint, ["veer"]);
    let cmd = exec_form(get("CMD").last().expect("CMD"));
    let config_path = run_config_path(&cmd);

    // The manifests override CMD with `args` (same config path) and keep the ENTRYPOINT.
    let edge = check_manifest("deploy/k8s/edge.yaml");
    assert_eq!(config_path, edge.config_path, "Dockerfile CMD vs Kubernetes args");

    // Ports and user.
    let exposed: BTreeSet<u16> = get("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace().map(|p| p.parse::<u16>().expect("port")).collect::<Vec<_>>())
        .collect();
    assert_eq!(exposed, BTreeSet::from([edge.http_port, edge.admin_port]), "EXPOSE vs the edge config's listeners");
    let user = get("USER").last().cloned().expect("USER");
    let uid: u64 = user.split(':').next().expect("uid").parse().expect("numeric USER, so runAsNonRoot can verify it");
    assert!(uid != 0);
    assert_eq!(uid, edge.run_as_user, "USER vs runAsUser");

    // The health check asks /healthz on the admin port with the script copied into the image.
    let hc = get("HEALTHCHECK").last().cloned().expect("HEALTHCHECK");
    let hc_cmd = exec_form(hc.split_once("CMD").expect("HEALTHCHECK ... CMD").1.trim());
    let copied = get("COPY")
        .into_iter()
        .find(|c| c.ends_with(&format!("/{}", hc_cmd[0])))
        .unwrap_or_else(|| panic!("{} is not copied into the image", hc_cmd[0]));
    let script = copied.split_whitespace().rev().nth(1).expect("source").to_string();
    assert!(read(&script).contains("GET /healthz"), "{script} asks /healthz");
    let env_port = get("ENV").iter().find_map(|e| e.strip_prefix("VEER_HEALTH_PORT=").map(str::to_string));
    assert_eq!(env_port.as_deref(), Some(edge.admin_port.to_string().as_str()), "VEER_HEALTH_PORT vs admin port");

    // Every file the build copies exists and passes the build context filter.
    let ignore = read("deploy/Dockerfile.dockerignore");
    for (k, v) in &all {
        if k != "COPY" || v.contains("--from=") {
            continue;
        }
        let parts: Vec<&str> = v.split_whitespace().filter(|p| !p.starts_with("--")).collect();
        for src in &parts[..parts.len() - 1] {
            assert!(repo(src).exists(), "COPY {src}: no such file");
            let allowed = ignore.lines().any(|l| l.trim().trim_end_matches('/') == format!("!{src}"));
            assert!(allowed, "COPY {src}: excluded by Dockerfile.dockerignore");
        }
    }
}

#[test]
fn systemd_unit_runs_the_real_flags_and_reloads_with_sighup() {
    let unit = read("deploy/veer.service");
    let keys: Vec<(&str, &str)> = unit
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let values = |k: &str| keys.iter().filter(|(kk, _)| *kk == k).map(|(_, v)| *v).collect::<Vec<_>>();
    let argv = |line: &str| line.split_whitespace().map(str::to_string).collect::<Vec<_>>();

    let start = argv(values("ExecStart")[0]);
    assert_eq!(start[0], "/usr/local/bin/veer");
    let config = run_config_path(&start[1..]);
    for pre in values("ExecStartPre").into_iter().chain(values("ExecReload")) {
        let a = argv(pre);
        if a[0] == "/usr/local/bin/veer" {
            assert!(Cli::try_parse_from(&a).is_ok(), "veer does not accept {pre:?}");
            assert_eq!(a[1..], ["check".to_string(), config.clone()], "{pre}");
        }
    }
    assert!(values("ExecReload").iter().any(|r| r.ends_with("kill -HUP $MAINPID")), "reload = SIGHUP");
    let stop: u64 = values("TimeoutStopSec")[0].parse().expect("seconds");
    let default_drain = Config::parse(
        Path::new("x.toml"),
        "[[routes]]\nname = \"a\"\n[routes.stable]\nversion = \"1\"\nendpoints = [\"127.0.0.1:1\"]\n",
    )
    .expect("minimal config")
    .server
    .drain_timeout;
    assert!(stop > default_drain.as_secs(), "TimeoutStopSec {stop} must exceed the default drain_timeout");

    // systemd's own parser, with the unit pointed at the built binary.
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        skip_unless_required(
            "VEER_REQUIRE_SYSTEMD_ANALYZE",
            "systemd-analyze verify of deploy/veer.service",
            "systemd-analyze is not installed (apt-get install systemd)",
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("veer.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/veer", &veer_bin().display().to_string())).expect("write");
    let out = Command::new("systemd-analyze").arg("verify").arg(&copy).output().expect("run systemd-analyze");
    // It exits 0 on unknown keys or bad values, and says so on stderr naming the file.
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !said.contains("veer.service"), "systemd-analyze verify:\n{said}");
}

// ---------------------------------------------------------------------------------------------
// Against a running proxy
// ---------------------------------------------------------------------------------------------

async fn healthcheck(port: u16) -> std::process::Output {
    let script = repo("deploy/healthcheck.sh");
    tokio::task::spawn_blocking(move || {
        Command::new("bash").arg(script).env("VEER_HEALTH_PORT", port.to_string()).output().expect("run bash")
    })
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_dashboard_query_is_exported_by_a_real_proxy() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("candidate").await;
    let mut body = route(stable.addr, Some(cand.addr), "[50, 100]");
    body.push_str("\n[routes.retry]\non_candidate_failure = true\n\n[routes.mirror]\npercent = 50\n");
    let cfg = ConfigFile::new(&body);
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let (http, admin) = (proxy.http_addr(), proxy.admin_addr());
    let client = client();

    for _ in 0..40 {
        assert_eq!(get(&client, http, "/").await.status, StatusCode::OK);
    }
    eventually(Duration::from_secs(10), "both versions served", || async {
        let s = route_status(&client, admin, "web").await;
        s["candidate"]["window"]["total_requests"].as_u64().unwrap_or(0) > 0
            && s["stable"]["window"]["total_requests"].as_u64().unwrap_or(0) > 0
    })
    .await;
    let aborted = post(&client, admin, "/api/v1/routes/web/abort", &[]).await;
    assert_eq!(aborted.status, StatusCode::OK, "{}", aborted.text());

    let metrics_at = |paths: &[String]| paths.iter().any(|p| p == "/metrics");
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = get(&client, admin, "/metrics").await.text();
        if text.contains(r#"phase="rolled_back"} 1"#) && text.contains("veer_rollbacks_total") {
            break text;
        }
        assert!(Instant::now() < deadline, "the rollback never showed in /metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let exported = exported_names(&text);

    // Every metric and label value the rules and the dashboard query is in the real output.
    let (rules, records) = rule_exprs();
    let dash = dashboard();
    let sources = [("deploy/prometheus/rules.yml", rules), ("deploy/grafana/veer.json", dashboard_exprs(&dash))];
    let mut used = BTreeSet::new();
    for (file, exprs) in &sources {
        assert!(!exprs.is_empty(), "{file}: no PromQL found");
        for e in exprs {
            for name in metric_names(e) {
                assert!(exported.contains(&name), "{file}: `{name}` is not in veer's /metrics:\n{e}\n\n{text}");
                used.insert(name);
            }
            for (label, value) in label_matchers(e) {
                let pair = format!("{label}=\"{value}\"");
                assert!(text.contains(&pair), "{file}: no series in /metrics has {pair}:\n{e}");
            }
            for r in recorded_refs(e) {
                assert!(records.contains(&r), "{file}: `{r}` is not recorded by rules.yml:\n{e}");
            }
        }
    }
    for core in ["veer_requests_total", "veer_request_duration_seconds_bucket", "veer_candidate_weight_percent"] {
        assert!(used.contains(core), "the assets never query {core}: {used:?}");
    }
    for name in ["veer_rollout_phase", "veer_rollbacks_total"] {
        assert!(used.contains(name), "rollbacks are not shown from {name}: {used:?}");
    }

    // The paths the manifests probe and scrape answer 200 on a real admin listener.
    for rel in MANIFESTS {
        let c = check_manifest(rel);
        assert!(metrics_at(&c.scrape_paths), "{rel}");
        for path in c.probe_paths.iter().chain(&c.scrape_paths) {
            let got = get(&client, admin, path).await;
            assert_eq!(got.status, StatusCode::OK, "{rel}: GET {path}: {}", got.text());
        }
    }

    // The container health check passes against a live admin port and fails on a dead one.
    let ok = healthcheck(admin.port()).await;
    assert!(ok.status.success(), "healthcheck.sh failed on a live admin port: {}", String::from_utf8_lossy(&ok.stderr));
    let dead: SocketAddr = refused_addr();
    let bad = healthcheck(dead.port()).await;
    assert!(!bad.status.success(), "healthcheck.sh passed on a port nothing listens on");
    let unhealthy = Upstream::status(503, "down").await;
    let not_ok = healthcheck(unhealthy.addr.port()).await;
    assert!(!not_ok.status.success(), "healthcheck.sh passed on a 503 answer");

    proxy.drain().await;
}

#[test]
fn dashboard_is_an_importable_grafana_dashboard() {
    let d = dashboard();
    let inputs = d["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "a DS_PROMETHEUS datasource input"
    );
    assert!(d["uid"].is_string() && d["title"].is_string());
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "duplicate panel id {}", p["id"]);
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {}", p["title"]);
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "target of {}", p["title"]);
        }
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_u64(), "panel {} gridPos.{k}", p["title"]);
        }
        titles.push(p["title"].as_str().expect("title").to_lowercase());
    }
    for want in ["requests per second", "error ratio", "p50 / p99", "candidate weight"] {
        assert!(titles.iter().any(|t| t.contains(want)), "no panel about {want}: {titles:?}");
    }
    let rollbacks = d["annotations"]["list"]
        .as_array()
        .expect("annotations")
        .iter()
        .find(|a| a["name"] == "Rollbacks")
        .expect("a Rollbacks annotation");
    assert_eq!(rollbacks["datasource"]["uid"], "${DS_PROMETHEUS}");
    let vars: BTreeMap<&str, &Value> = d["templating"]["list"]
        .as_array()
        .expect("vars")
        .iter()
        .map(|v| (v["name"].as_str().expect("name"), v))
        .collect();
    assert!(vars.contains_key("route"), "a route variable");
}

/// The dashboard's PromQL, with Grafana's variables filled in, parsed by promtool (the real
/// PromQL parser) as recording rules. Skipped, loudly, where promtool is not installed; CI
/// installs it (`.ci/run`), and there a missing promtool fails.
#[test]
fn dashboard_promql_parses_with_promtool() {
    let found = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "promtool is missing in CI (.ci/run installs it)");
        skip_unless_required(
            "VEER_REQUIRE_PROMETHEUS",
            "dashboard_promql_parses_with_promtool",
            "promtool is not installed (apt-get install prometheus)",
        );
        return;
    }
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in dashboard_exprs(&dashboard()).iter().enumerate() {
        if e.starts_with("label_values(") {
            continue; // a Grafana function, not PromQL
        }
        let e = e.replace("$__rate_interval", "1m").replace("$route", ".*");
        let quoted = serde_json::to_string(&e).expect("json string");
        rules.push_str(&format!("      - record: dashboard:expr:{i}\n        expr: {quoted}\n"));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dashboard_rules.yml");
    std::fs::write(&file, &rules).expect("write");
    let out = Command::new("promtool").args(["check", "rules"]).arg(&file).output().expect("run promtool");
    assert!(
        out.status.success(),
        "promtool rejects the dashboard's PromQL:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
