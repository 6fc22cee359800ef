//! The deployment files under `deploy/` against the programs that will read them: the
//! Kubernetes manifests against the API schemas (kubernetes-validate, strict), the alert
//! rules and the scrape configuration against promtool (including the rules' unit tests
//! in `deploy/prometheus/alerts_test.yml`), the blackbox modules against the blackbox
//! exporter, every query of the dashboard against promtool's parser, every PromQL
//! expression of the dashboard and the rules against the metrics that exist, and every
//! compose file against the variables its `.env` sets. Each check
//! is also shown to refuse a deliberately broken copy, so a check that passes means
//! something.
//!
//! The tools are named by `TWINS_TEST_KUBERNETES_VALIDATE`, `TWINS_TEST_PROMTOOL`,
//! `TWINS_TEST_BLACKBOX_EXPORTER` and `TWINS_TEST_DEPLOY_PYTHON` (a Python with PyYAML,
//! to read YAML); `scripts/test` installs them, pinned, and sets the variables. Without
//! one (a plain `cargo test`) the tests that need it say they were skipped and pass; the
//! dashboard's metric check needs nothing and always runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

#[path = "support/tools.rs"]
mod tools;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Metrics the service exports today, as they appear in `/metrics` (a histogram as its
/// `_bucket`, `_sum` and `_count` series). Each is checked against the name constants in
/// `src/`, so a renamed metric fails here before a dashboard goes blank.
const EXPORTED: &[&str] = &[
    "twins_http_requests_total",
    "twins_http_request_duration_seconds_bucket",
    "twins_http_request_duration_seconds_sum",
    "twins_http_request_duration_seconds_count",
    "twins_http_connections_open",
    "twins_http_connections_refused_total",
    "twins_ingest_messages_total",
    "twins_ingest_state_writes_total",
    "twins_ingest_rejected_total",
    "twins_ingest_ignored_total",
    "twins_ingest_duplicates_total",
    "twins_lookup_store_queries_total",
    "twins_lookup_answers",
    "twins_lookup_answers_evicted_total",
    "twins_cache_repairs_queued_total",
    "twins_inband_unanswered_total",
];

/// Metrics the service is to export once the metrics work under way lands (build
/// information, process metrics, the Go service's request metrics); panels on them show
/// no data until then.
const ANNOUNCED: &[&str] = &[
    "twins_build_info",
    "twins_api_request_count",
    "twins_api_request_latency_microseconds",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
];

/// Metrics of other programs: Prometheus itself (`up`), the blackbox exporter reading
/// `/health`, and the NATS exporter reading the JetStream consumer (ingestion lag).
const EXTERNAL: &[&str] = &[
    "up",
    "probe_success",
    "jetstream_consumer_num_pending",
    "jetstream_consumer_num_ack_pending",
];

fn path(relative: &str) -> PathBuf {
    Path::new(ROOT).join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(path(relative)).unwrap_or_else(|e| panic!("read {relative}: {e}"))
}

/// The tool named by `var`, or None (after saying so) when the variable is unset.
fn tool(var: &str) -> Option<String> {
    tools::tool(var, "deployment test")
}

fn run(mut command: Command) -> (Output, String) {
    let shown = format!("{command:?}");
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{shown} did not start: {e}"));
    let text = format!(
        "{shown} ({})\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output, text)
}

/// Runs `command`: Ok with all it printed when it exits 0, Err with it otherwise.
fn outcome(command: Command) -> Result<String, String> {
    let (output, text) = run(command);
    if output.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

fn assert_succeeds(command: Command) -> String {
    outcome(command).unwrap_or_else(|text| panic!("failed:\n{text}"))
}

fn assert_fails(command: Command) -> String {
    match outcome(command) {
        Ok(text) => panic!("a broken file was accepted:\n{text}"),
        Err(text) => text,
    }
}

/// A copy of the file `relative` with `from` replaced by `to`, in a directory of its own
/// (with the file's siblings, which configurations refer to by relative path).
fn broken_copy(relative: &str, from: &str, to: &str) -> (tempfile::TempDir, PathBuf) {
    let original = path(relative);
    let dir = tempfile::tempdir().expect("temporary directory");
    for sibling in std::fs::read_dir(original.parent().expect("a parent")).expect("list") {
        let sibling = sibling.expect("entry").path();
        if sibling.is_file() {
            std::fs::copy(
                &sibling,
                dir.path().join(sibling.file_name().expect("name")),
            )
            .expect("copy a sibling");
        }
    }
    let text = read(relative);
    assert!(text.contains(from), "{relative} has no {from:?} to break");
    let copy = dir.path().join(original.file_name().expect("a file name"));
    std::fs::write(&copy, text.replacen(from, to, 1)).expect("write the broken copy");
    (dir, copy)
}

/// Every YAML document of `file`, as JSON, read by PyYAML. Compose's merge tags
/// (`!override`, `!reset`) are read as the node under them.
fn yaml_documents(python: &str, file: &Path) -> Result<Vec<Value>, String> {
    const SCRIPT: &str = r#"
import json, sys, yaml
class Loader(yaml.SafeLoader):
    pass
def tagged(loader, suffix, node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)
Loader.add_multi_constructor("!", tagged)
with open(sys.argv[1]) as f:
    json.dump(list(yaml.load_all(f, Loader=Loader)), sys.stdout)
"#;
    let mut command = Command::new(python);
    command.args(["-c", SCRIPT]).arg(file);
    let (output, text) = run(command);
    if !output.status.success() {
        return Err(text);
    }
    serde_json::from_slice(&output.stdout).map_err(|e| format!("{e}: {text}"))
}

fn yaml(python: &str, relative: &str) -> Value {
    let mut documents = yaml_documents(python, &path(relative))
        .unwrap_or_else(|e| panic!("{relative} is not YAML:\n{e}"));
    assert_eq!(documents.len(), 1, "{relative}: one document expected");
    documents.remove(0)
}

fn kubernetes_manifests() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(path("deploy/kubernetes"))
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .map(|name| format!("deploy/kubernetes/{name}"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/kubernetes");
    files
}

/// kubernetes-validate, strict (unknown fields refused). It passes a kind it has no
/// schema for with a warning, so a warning counts as a failure too.
fn validate_manifest(validator: &str, file: &Path) -> Result<(), String> {
    let mut command = Command::new(validator);
    command.arg("--strict").arg(file);
    match outcome(command) {
        Ok(text) if !text.contains("WARN") => Ok(()),
        Ok(text) | Err(text) => Err(text),
    }
}

#[test]
fn kubernetes_manifests_match_the_api_schemas_strictly() {
    let Some(validator) = tool("TWINS_TEST_KUBERNETES_VALIDATE") else {
        return;
    };
    for file in kubernetes_manifests() {
        if let Err(text) = validate_manifest(&validator, &path(&file)) {
            panic!("{file} does not validate:\n{text}");
        }
    }
}

#[test]
fn kubernetes_validation_refuses_unknown_fields_wrong_types_and_unknown_kinds() {
    let Some(validator) = tool("TWINS_TEST_KUBERNETES_VALIDATE") else {
        return;
    };
    let file = "deploy/kubernetes/deployment.yaml";
    for (from, to) in [
        ("  replicas: 2", "  replicaz: 2"),
        ("containerPort: 9018", "containerPort: http"),
        ("kind: Deployment", "kind: Deploymnet"),
    ] {
        let (_dir, copy) = broken_copy(file, from, to);
        let refused = validate_manifest(&validator, &copy);
        assert!(refused.is_err(), "{to:?} in {file} was accepted");
    }
}

/// The parts of the manifests a schema cannot check: probes on the health endpoints,
/// several replicas, a locked-down container, secrets only in the Secret, and variable
/// names the service reads.
#[test]
fn kubernetes_deployment_is_replicated_probed_locked_down_and_keeps_secrets_apart() {
    let Some(python) = tool("TWINS_TEST_DEPLOY_PYTHON") else {
        return;
    };
    let deployment = yaml(&python, "deploy/kubernetes/deployment.yaml");
    let spec = &deployment["spec"];
    assert!(spec["replicas"].as_u64() >= Some(2), "{spec}");
    let pod = &spec["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"],
        "/health/live"
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"],
        "/health/ready"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert!(container["resources"]["requests"]["cpu"].is_string());
    // The service's drain fits in the grace period, after the preStop pause.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    let pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("preStop sleep");

    let config = yaml(&python, "deploy/kubernetes/configmap.yaml");
    let secret = yaml(&python, "deploy/kubernetes/secret.yaml");
    let shutdown = config["data"]["MG_TWINS_SHUTDOWN_TIMEOUT"]
        .as_str()
        .and_then(|s| s.strip_suffix('s'))
        .and_then(|s| s.parse::<u64>().ok())
        .expect("MG_TWINS_SHUTDOWN_TIMEOUT in seconds");
    assert!(pause + shutdown < grace, "{pause} + {shutdown} >= {grace}");

    let config_keys = keys(&config["data"]);
    let secret_keys = keys(&secret["stringData"]);
    for key in &config_keys {
        assert!(
            !["TOKEN", "PASSWORD", "DB_URL", "_KEY"]
                .iter()
                .any(|s| key.contains(s)),
            "{key} is a credential: it belongs in the Secret"
        );
    }
    for key in ["MG_TWINS_DB_URL", "MG_TWINS_STANDALONE_TOKEN"] {
        assert!(secret_keys.contains(key), "the Secret has no {key}");
    }
    assert!(
        config_keys.is_disjoint(&secret_keys),
        "set twice: {:?}",
        config_keys.intersection(&secret_keys).collect::<Vec<_>>()
    );
    let names: Vec<&str> = container["envFrom"]
        .as_array()
        .expect("envFrom")
        .iter()
        .filter_map(|from| {
            from["configMapRef"]["name"]
                .as_str()
                .or(from["secretRef"]["name"].as_str())
        })
        .collect();
    assert_eq!(
        [Some(names[0]), Some(names[1])],
        [
            config["metadata"]["name"].as_str(),
            secret["metadata"]["name"].as_str()
        ]
    );
    for key in config_keys.iter().chain(&secret_keys) {
        assert_read_by_the_service(key, "deploy/kubernetes");
    }
}

fn keys(map: &Value) -> BTreeSet<String> {
    map.as_object()
        .expect("a mapping")
        .keys()
        .cloned()
        .collect()
}

/// `src/config.rs` is the one place that reads the environment: a variable it does not
/// name (as a string or as the envy field) would be ignored by the service.
fn assert_read_by_the_service(variable: &str, whence: &str) {
    let config = read("src/config.rs");
    assert!(
        config.contains(&format!("\"{variable}\""))
            || config.contains(&format!("{}:", variable.to_lowercase())),
        "{whence} sets {variable}, which the service does not read"
    );
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = tool("TWINS_TEST_PROMTOOL") else {
        return;
    };
    let mut check = Command::new(&promtool);
    check
        .args(["check", "rules"])
        .arg(path("deploy/prometheus/alerts.yml"));
    assert_succeeds(check);
    let mut test = Command::new(&promtool);
    test.args(["test", "rules"])
        .arg(path("deploy/prometheus/alerts_test.yml"));
    assert_succeeds(test);
}

#[test]
fn promtool_refuses_a_broken_rule_and_a_rule_that_no_longer_fires() {
    let Some(promtool) = tool("TWINS_TEST_PROMTOOL") else {
        return;
    };
    let file = "deploy/prometheus/alerts.yml";
    let (_dir, copy) = broken_copy(
        file,
        "expr: up{job=\"twins\"} == 0",
        "expr: up{job=\"twins\" == 0",
    );
    let mut check = Command::new(&promtool);
    check.args(["check", "rules"]).arg(&copy);
    assert_fails(check);

    // The store alert with the wrong job: the unit tests must notice it stays silent.
    let (dir, _copy) = broken_copy(file, "job=\"twins-store\"", "job=\"twins-stor\"");
    let mut test = Command::new(&promtool);
    test.args(["test", "rules"])
        .arg(dir.path().join("alerts_test.yml"));
    let text = assert_fails(test);
    assert!(text.contains("TwinsStoreDown"), "{text}");
}

#[test]
fn prometheus_configuration_passes_promtool() {
    let Some(promtool) = tool("TWINS_TEST_PROMTOOL") else {
        return;
    };
    let mut check = Command::new(&promtool);
    check
        .args(["check", "config"])
        .arg(path("deploy/prometheus/prometheus.yml"));
    assert_succeeds(check);

    let (_dir, copy) = broken_copy(
        "deploy/prometheus/prometheus.yml",
        "scrape_interval: 15s",
        "scrape_interval: fifteen",
    );
    let mut broken = Command::new(&promtool);
    broken.args(["check", "config"]).arg(&copy);
    assert_fails(broken);
}

#[test]
fn blackbox_modules_pass_the_exporter_and_match_the_scrape_jobs() {
    let Some(exporter) = tool("TWINS_TEST_BLACKBOX_EXPORTER") else {
        return;
    };
    let file = "deploy/prometheus/blackbox.yml";
    let mut check = Command::new(&exporter);
    check
        .arg("--config.check")
        .arg(format!("--config.file={}", path(file).display()));
    assert_succeeds(check);

    let (_dir, copy) = broken_copy(file, "valid_status_codes", "valid_status_code");
    let mut broken = Command::new(&exporter);
    broken
        .arg("--config.check")
        .arg(format!("--config.file={}", copy.display()));
    assert_fails(broken);

    // Every module a probe job asks for is defined, and each looks for its own check.
    let blackbox = read(file);
    let prometheus = read("deploy/prometheus/prometheus.yml");
    for check in ["store", "broker", "cache"] {
        let module = format!("twins_{check}");
        assert!(
            prometheus.contains(&format!("module: [{module}]")),
            "{module}"
        );
        assert!(blackbox.contains(&format!("  {module}:")), "{module}");
        assert!(
            blackbox.contains(&format!("'\"{check}\":\"pass\"'")),
            "{check}"
        );
    }
}

/// Metric names in a PromQL expression: the identifiers that are not functions or
/// aggregations (followed by `(`), keywords, label names (inside `{}`, or in the list
/// after `by`, `without`, `on`, `ignoring`, `group_left`, `group_right`), numbers,
/// durations, strings or Grafana variables.
fn metric_names(expr: &str) -> Vec<String> {
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    // Aggregations can put their grouping clause before the parentheses
    // (`sum by (le) (...)`), so they are not always followed by `(`.
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let skip_to = |from: usize, close: char| {
        let mut i = from + 1;
        let mut quote = None;
        while i < chars.len() {
            match (quote, chars[i]) {
                (Some(_), '\\') => i += 1,
                (Some(q), c) if c == q => quote = None,
                (None, '"' | '\'' | '`') => quote = Some(chars[i]),
                (None, c) if c == close => return i + 1,
                _ => {}
            }
            i += 1;
        }
        i
    };
    let mut names = Vec::new();
    let mut label_list_next = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            let mut j = i + 1;
            while j < chars.len() && chars[j] != c {
                j += if chars[j] == '\\' { 2 } else { 1 };
            }
            i = j + 1;
        } else if c == '{' {
            i = skip_to(i, '}');
        } else if c == '[' {
            i = skip_to(i, ']');
        } else if c == '(' && label_list_next {
            label_list_next = false;
            i = skip_to(i, ')');
        } else if c == '$' {
            // A Grafana variable: `$name` or `${name}`.
            i += 1;
            if chars.get(i) == Some(&'{') {
                i = skip_to(i, '}');
            }
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if GROUPING.contains(&word.as_str()) {
                label_list_next = true;
            } else if next != Some(&'(') && !KEYWORDS.contains(&word.as_str()) {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every PromQL expression of the dashboard: panel targets and variable queries.
fn dashboard_expressions(dashboard: &Value) -> Vec<String> {
    fn walk(value: &Value, found: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr" | "definition", Value::String(expr)) => found.push(expr.clone()),
                        _ => walk(value, found),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    walk(dashboard, &mut found);
    found
        .into_iter()
        // `label_values(<selector>, <label>)`: the selector is PromQL, the label is not.
        .map(|e| match e.strip_prefix("label_values(") {
            Some(rest) => rest.rsplit_once(',').map_or(rest, |(s, _)| s).to_owned(),
            None => e,
        })
        .collect()
}

/// Names in `exprs` outside the allowed lists, with the expression naming each.
fn unknown_metrics(exprs: &[String]) -> BTreeMap<String, String> {
    let allowed: BTreeSet<&str> = EXPORTED
        .iter()
        .chain(ANNOUNCED)
        .chain(EXTERNAL)
        .copied()
        .collect();
    let mut unknown = BTreeMap::new();
    for expr in exprs {
        for name in metric_names(expr) {
            if !allowed.contains(name.as_str()) {
                unknown.insert(name, expr.clone());
            }
        }
    }
    unknown
}

#[test]
fn metric_names_are_told_apart_from_functions_labels_and_variables() {
    let expr = r#"histogram_quantile(0.99, sum by (le, route) (rate(twins_http_request_duration_seconds_bucket{job="twins", route!~".*/events", instance=~"$instance"}[$__rate_interval])))
        / on (instance) group_left (version) twins_build_info or vector(0) > bool 1e3
        and made_up_total offset 10m unless max without (x) (up{a="b}"} )"#;
    assert_eq!(
        metric_names(expr),
        [
            "twins_http_request_duration_seconds_bucket",
            "twins_build_info",
            "made_up_total",
            "up"
        ]
    );
    let unknown = unknown_metrics(&[expr.to_owned()]);
    assert_eq!(unknown.keys().collect::<Vec<_>>(), ["made_up_total"]);
}

#[test]
fn dashboard_is_json_whose_queries_name_only_existing_metrics() {
    let text = read("deploy/grafana/twins-dashboard.json");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let exprs = dashboard_expressions(&dashboard);
    assert!(exprs.len() >= 20, "only {} expressions found", exprs.len());
    let unknown = unknown_metrics(&exprs);
    assert!(
        unknown.is_empty(),
        "metrics that do not exist: {unknown:#?}"
    );

    // Each subject of the alerts has a panel.
    for metric in [
        "jetstream_consumer_num_pending",
        "twins_ingest_rejected_total",
        "probe_success",
        "twins_http_requests_total",
        "twins_http_request_duration_seconds_bucket",
    ] {
        assert!(
            exprs
                .iter()
                .any(|e| metric_names(e).iter().any(|n| n == metric)),
            "no panel shows {metric}"
        );
    }
    let panels = dashboard["panels"].as_array().expect("panels");
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are not unique");
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {} has a fixed data source",
            panel["title"]
        );
    }
}

/// Runs `promtool check rules` on the expressions given as recording rules (Grafana's
/// variables replaced by values PromQL accepts): promtool parses every one.
fn promtool_parses(promtool: &str, exprs: &[String]) -> Result<(), String> {
    let rules: String = exprs
        .iter()
        .enumerate()
        .map(|(i, expr)| {
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$instance", ".*")
                .replace("$group", ".*");
            // A JSON string is a YAML double-quoted scalar.
            format!(
                "      - record: dashboard:query_{i}\n        expr: {}\n",
                Value::from(expr)
            )
        })
        .collect();
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("dashboard_rules.yml");
    std::fs::write(
        &file,
        format!("groups:\n  - name: dashboard\n    rules:\n{rules}"),
    )
    .expect("write the rules");
    let mut check = Command::new(promtool);
    check.args(["check", "rules"]).arg(&file);
    outcome(check).map(drop)
}

#[test]
fn dashboard_queries_parse_as_promql() {
    let Some(promtool) = tool("TWINS_TEST_PROMTOOL") else {
        return;
    };
    let text = read("deploy/grafana/twins-dashboard.json");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = dashboard_expressions(&dashboard);
    if let Err(text) = promtool_parses(&promtool, &exprs) {
        panic!("the dashboard has queries PromQL refuses:\n{text}");
    }
    exprs.push("sum by (route (rate(twins_http_requests_total[5m]))".to_owned());
    assert!(
        promtool_parses(&promtool, &exprs).is_err(),
        "a broken query was accepted"
    );
}

#[test]
fn exported_metric_names_are_the_services() {
    fn sources(dir: &Path, into: &mut String) {
        for entry in std::fs::read_dir(dir).expect("src") {
            let entry = entry.expect("entry").path();
            if entry.is_dir() {
                sources(&entry, into);
            } else if entry.extension().is_some_and(|e| e == "rs") {
                into.push_str(&std::fs::read_to_string(&entry).expect("read a source"));
            }
        }
    }
    let mut src = String::new();
    sources(&path("src"), &mut src);
    for name in EXPORTED {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|base| src.contains(&format!("\"{base}\"")))
            .unwrap_or(name);
        assert!(
            src.contains(&format!("\"{base}\"")),
            "{name} is not a metric name in src/"
        );
    }
}

#[test]
fn alert_rules_name_only_existing_metrics() {
    let Some(python) = tool("TWINS_TEST_DEPLOY_PYTHON") else {
        return;
    };
    let rules = yaml(&python, "deploy/prometheus/alerts.yml");
    let exprs: Vec<String> = rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .map(|r| r["expr"].as_str().expect("expr").to_owned())
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let unknown = unknown_metrics(&exprs);
    assert!(
        unknown.is_empty(),
        "metrics that do not exist: {unknown:#?}"
    );
}

/// The variables a compose file takes from its `.env` without a default: `${NAME}`,
/// `${NAME:?message}`, `$NAME` (not `$$NAME`, which is a literal `$`; not comments).
fn required_variables(compose: &str) -> BTreeSet<String> {
    let mut required = BTreeSet::new();
    for line in compose.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            if chars[i] != '$' {
                i += 1;
                continue;
            }
            if chars.get(i + 1) == Some(&'$') {
                i += 2;
                continue;
            }
            let braced = chars.get(i + 1) == Some(&'{');
            let start = i + 1 + usize::from(braced);
            let mut end = start;
            while end < chars.len() && (chars[end].is_ascii_alphanumeric() || chars[end] == '_') {
                end += 1;
            }
            let name: String = chars[start..end].iter().collect();
            let rest: String = chars[end..].iter().take(2).collect();
            let has_default = braced && (rest.starts_with(":-") || rest.starts_with('-'));
            let only_if_set = braced && (rest.starts_with(":+") || rest.starts_with('+'));
            if !name.is_empty() && !has_default && !only_if_set {
                required.insert(name);
            }
            i = end;
        }
    }
    required
}

fn env_file(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_owned()))
        .collect()
}

fn missing_variables(compose: &str, env: &str) -> BTreeSet<String> {
    let set = env_file(env);
    required_variables(compose)
        .into_iter()
        .filter(|v| !set.contains(v))
        .collect()
}

#[test]
fn compose_variables_are_found_unset_and_defaults_and_literals_skipped() {
    let compose = "a: ${SET}\nb: ${UNSET}\nc: ${DEFAULTED:-x}\nd: $$LITERAL\n# e: ${COMMENT}\nf: ${REQUIRED:?say}\ng: ${OPTIONAL:+y}\nh: $BARE\n";
    assert_eq!(
        missing_variables(compose, "SET=1\n# UNSET=2\n"),
        ["BARE", "REQUIRED", "UNSET"]
            .into_iter()
            .map(str::to_owned)
            .collect()
    );
}

#[test]
fn compose_files_parse_and_their_env_files_set_every_variable() {
    for (compose, env) in [
        ("docker-compose.yml", ".env"),
        ("docker-compose.postgres.yml", ".env"),
        (
            "deploy/magistrala/docker-compose.yml",
            "deploy/magistrala/.env",
        ),
    ] {
        let missing = missing_variables(&read(compose), &read(env));
        assert!(
            missing.is_empty(),
            "{compose} uses {missing:?}, unset in {env}"
        );
    }
    let Some(python) = tool("TWINS_TEST_DEPLOY_PYTHON") else {
        return;
    };
    for compose in ["docker-compose.yml", "docker-compose.postgres.yml"] {
        let parsed = yaml(&python, compose);
        assert!(parsed["services"]["twins"].is_object(), "{compose}");
    }
    let (_dir, copy) = broken_copy(
        "deploy/magistrala/docker-compose.yml",
        "services:",
        "services: [",
    );
    assert!(
        yaml_documents(&python, &copy).is_err(),
        "broken YAML was read"
    );
}

/// The Magistrala compose file joins Magistrala's network as an external one, runs
/// twins and its database only (the rest behind a profile), keeps the database off
/// Magistrala's network, and passes only variables the service reads.
#[test]
fn magistrala_compose_joins_the_external_network_with_twins_and_its_database_only() {
    let Some(python) = tool("TWINS_TEST_DEPLOY_PYTHON") else {
        return;
    };
    let compose = yaml(&python, "deploy/magistrala/docker-compose.yml");
    let magistrala = &compose["networks"]["magistrala"];
    assert_eq!(magistrala["external"], true, "{magistrala}");
    assert!(
        magistrala["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("${MG_NETWORK")),
        "{magistrala}"
    );
    let services = compose["services"].as_object().expect("services");
    let default: Vec<&str> = services
        .iter()
        .filter(|(_, s)| s["profiles"].is_null())
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(default, ["twins", "twins-postgres"]);
    let twins = &services["twins"];
    assert!(
        twins["networks"]
            .as_array()
            .expect("twins networks")
            .contains(&Value::from("magistrala"))
    );
    assert!(services["twins-postgres"]["networks"].is_null());
    for variable in keys(&twins["environment"]) {
        assert_read_by_the_service(&variable, "deploy/magistrala/docker-compose.yml");
    }
    let env = env_file(&read("deploy/magistrala/.env"));
    for variable in ["MG_NETWORK", "MG_MESSAGE_BROKER_URL", "MG_AUTH_GRPC_URL"] {
        assert!(env.contains(variable), "{variable}");
    }

    // What the services mount and build from is where the file says, relative to it.
    let base = path("deploy/magistrala");
    let context = twins["build"]["context"].as_str().expect("build context");
    assert!(base.join(context).join("Dockerfile").is_file(), "{context}");
    for (name, service) in services {
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let volume = volume.as_str().expect("short volume syntax");
            let source = volume.split(':').next().expect("a source");
            if source.starts_with('.') {
                assert!(base.join(source).exists(), "{name} mounts {source}");
            }
        }
    }
}
