//! TLS with certificates made by the test (rcgen): HTTPS on the service's port (plain
//! HTTP refused there), the `--healthcheck` probe in both schemes, and the auth service
//! over TLS and mutual TLS against an in-test tonic server.

mod common;

use std::time::Duration;

use reqwest::StatusCode;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use common::tls::{self as certs, Pki, path};
use common::{ALICE, Auth, AuthServer, STRANGER, TestApp};
use twins::app::{Application, StartError};
use twins::config::Config;

fn config(vars: &[(&str, &str)]) -> Config {
    Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string()))).expect("config")
}

/// A standalone app serving HTTPS with `pki`'s server certificate, given in the
/// variables `cert_var` and `key_var`.
async fn https_app(pki: &Pki, cert_var: &str, key_var: &str) -> TestApp {
    TestApp::builder()
        .auth(Auth::Standalone)
        .var(cert_var, path(&pki.server_cert))
        .var(key_var, path(&pki.server_key))
        .spawn()
        .await
}

#[tokio::test]
async fn https_serves_the_api_and_refuses_plain_http() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = certs::make_pki(dir.path(), "https");
    let app = https_app(
        &pki,
        "MG_TWINS_HTTP_SERVER_CERT",
        "MG_TWINS_HTTP_SERVER_KEY",
    )
    .await;

    let health = certs::https_request(app.addr(), &pki.ca_pem, "GET", "/health", None)
        .await
        .expect("HTTPS request");
    assert_eq!(health.status, 200, "{}", health.body);
    let listed = certs::https_request(app.addr(), &pki.ca_pem, "GET", "/twins", Some(ALICE))
        .await
        .expect("HTTPS request");
    assert_eq!(listed.status, 200, "{}", listed.body);
    let page: serde_json::Value = serde_json::from_str(&listed.body).expect("JSON body");
    assert_eq!(page["total"], 0);
    let anonymous = certs::https_request(app.addr(), &pki.ca_pem, "GET", "/twins", None)
        .await
        .expect("HTTPS request");
    assert_eq!(anonymous.status, 401);

    // Plain HTTP on the HTTPS port gets no HTTP answer.
    let plain = common::client().get(app.url("/health")).send().await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");

    // A client that does not trust the issuing CA refuses the server.
    let stranger = certs::make_pki(dir.path(), "stranger");
    assert!(
        certs::https_request(app.addr(), &stranger.ca_pem, "GET", "/health", None)
            .await
            .is_err()
    );

    // The service still serves after those failed handshakes.
    let again = certs::https_request(app.addr(), &pki.ca_pem, "GET", "/health", None)
        .await
        .expect("HTTPS request");
    assert_eq!(again.status, 200);
}

#[tokio::test]
async fn seed_certificate_variables_also_turn_https_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = certs::make_pki(dir.path(), "alias");
    let app = https_app(&pki, "MG_TWINS_SERVER_CERT", "MG_TWINS_SERVER_KEY").await;
    let health = certs::https_request(app.addr(), &pki.ca_pem, "GET", "/health", None)
        .await
        .expect("HTTPS request");
    assert_eq!(health.status, 200);
}

#[tokio::test]
async fn unreadable_certificate_stops_start_up_naming_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing.pem");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").expect("write");
    let db = format!("sqlite://{}/twins.db", dir.path().display());
    // A missing file is a configuration mistake, found before anything starts.
    let err = Config::from_vars(
        [
            ("MG_TWINS_DB_URL", db.as_str()),
            ("MG_TWINS_HTTP_SERVER_CERT", path(&missing)),
            ("MG_TWINS_HTTP_SERVER_KEY", path(&garbage)),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    )
    .expect_err("a missing certificate file");
    let err = err.to_string();
    assert!(err.starts_with("MG_TWINS_HTTP_SERVER_CERT"), "{err}");
    assert!(err.contains(path(&missing)), "{err}");
    // One that is there but not a certificate stops start-up.
    for (cert, key) in [(&garbage, &garbage)] {
        let cfg = config(&[
            ("MG_TWINS_HTTP_HOST", "127.0.0.1"),
            ("MG_TWINS_HTTP_PORT", "0"),
            ("MG_TWINS_DB_URL", &db),
            ("MG_TWINS_HTTP_SERVER_CERT", path(cert)),
            ("MG_TWINS_HTTP_SERVER_KEY", path(key)),
        ]);
        match Application::build(cfg).await {
            Err(e @ StartError::Tls(_)) => {
                assert!(e.to_string().contains(path(cert)), "{e}");
            }
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("started with certificate {}", cert.display()),
        }
    }
}

fn check_against(addr: std::net::SocketAddr, tls: Option<&Pki>) -> Result<(), String> {
    let port = addr.port().to_string();
    let mut vars = vec![
        ("MG_TWINS_HTTP_HOST", "0.0.0.0"),
        ("MG_TWINS_HTTP_PORT", port.as_str()),
    ];
    if let Some(pki) = tls {
        vars.push(("MG_TWINS_HTTP_SERVER_CERT", path(&pki.server_cert)));
        vars.push(("MG_TWINS_HTTP_SERVER_KEY", path(&pki.server_key)));
    }
    twins::healthcheck::check(&config(&vars), Duration::from_secs(3))
}

#[tokio::test]
async fn healthcheck_probes_https_and_requires_the_configured_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = certs::make_pki(dir.path(), "served");
    let other = certs::make_pki(dir.path(), "other");
    let app = https_app(
        &pki,
        "MG_TWINS_HTTP_SERVER_CERT",
        "MG_TWINS_HTTP_SERVER_KEY",
    )
    .await;
    let addr = app.addr();
    let (served, wrong, plain) = tokio::task::spawn_blocking(move || {
        (
            check_against(addr, Some(&pki)),
            check_against(addr, Some(&other)),
            check_against(addr, None),
        )
    })
    .await
    .expect("checks run");
    assert_eq!(served, Ok(()));
    assert!(wrong.is_err(), "another certificate was accepted");
    assert!(plain.is_err(), "plain HTTP check passed against HTTPS");
}

#[tokio::test]
async fn healthcheck_binary_probes_plain_http() {
    let app = TestApp::builder().auth(Auth::Unset).spawn().await;
    let probe = |port: u16| {
        std::process::Command::new(env!("CARGO_BIN_EXE_twins"))
            .arg("--healthcheck")
            .env("MG_TWINS_HTTP_HOST", "0.0.0.0")
            .env("MG_TWINS_HTTP_PORT", port.to_string())
            .env_remove("MG_TWINS_HTTP_SERVER_CERT")
            .env_remove("MG_TWINS_HTTP_SERVER_KEY")
            .stderr(std::process::Stdio::null())
            .status()
            .expect("the binary runs")
    };
    let port = app.addr().port();
    let healthy = tokio::task::spawn_blocking(move || probe(port))
        .await
        .expect("probe");
    assert!(healthy.success(), "{healthy:?}");
    let closed = common::closed_addr().await.port();
    let down = tokio::task::spawn_blocking(move || probe(closed))
        .await
        .expect("probe");
    assert_eq!(down.code(), Some(1));
}

fn server_tls(pki: &Pki, require_client_certificate: bool) -> ServerTlsConfig {
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        &pki.server_cert_pem,
        &pki.server_key_pem,
    ));
    if require_client_certificate {
        tls = tls.client_ca_root(Certificate::from_pem(&pki.ca_pem));
    }
    tls
}

/// What `GET /twins` answers with `token` on an app configured with `vars`.
async fn list_status(vars: &[(&str, &str)], token: &str) -> StatusCode {
    let app = TestApp::builder()
        .auth(Auth::Unset)
        .var("MG_AUTH_GRPC_TIMEOUT", "3s")
        .vars(vars)
        .spawn()
        .await;
    app.get("/twins", token).await.status()
}

#[tokio::test]
async fn auth_service_over_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = certs::make_pki(dir.path(), "grpc");
    let auth = AuthServer::builder()
        .tls(server_tls(&pki, false))
        .start()
        .await;
    // host:port without a scheme, as the Go service takes it.
    let url = format!("localhost:{}", auth.addr.port());
    let tls = [
        ("MG_AUTH_GRPC_URL", url.as_str()),
        ("MG_AUTH_GRPC_SERVER_CA_CERTS", path(&pki.ca)),
    ];
    assert_eq!(list_status(&tls, ALICE).await, StatusCode::OK);
    assert_eq!(list_status(&tls, STRANGER).await, StatusCode::UNAUTHORIZED);
    // The seed's names: MG_TWINS_CA_CERTS with MG_TWINS_CLIENT_TLS, and an IP address.
    let by_ip = format!("127.0.0.1:{}", auth.addr.port());
    assert_eq!(
        list_status(
            &[
                ("MG_AUTH_GRPC_URL", by_ip.as_str()),
                ("MG_TWINS_CA_CERTS", path(&pki.ca)),
                ("MG_TWINS_CLIENT_TLS", "true"),
            ],
            ALICE
        )
        .await,
        StatusCode::OK
    );
    // Plain gRPC to a TLS-only service does not authenticate anyone.
    assert_eq!(
        list_status(&[("MG_AUTH_GRPC_URL", url.as_str())], ALICE).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Nor does TLS with a CA that did not issue the server's certificate.
    let stranger = certs::make_pki(dir.path(), "stranger");
    assert_eq!(
        list_status(
            &[
                ("MG_AUTH_GRPC_URL", url.as_str()),
                ("MG_AUTH_GRPC_SERVER_CA_CERTS", path(&stranger.ca)),
            ],
            ALICE
        )
        .await,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn auth_service_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = certs::make_pki(dir.path(), "mtls");
    let auth = AuthServer::builder()
        .tls(server_tls(&pki, true))
        .start()
        .await;
    let url = format!("https://localhost:{}", auth.addr.port());
    let with_client_cert = [
        ("MG_AUTH_GRPC_URL", url.as_str()),
        ("MG_AUTH_GRPC_SERVER_CA_CERTS", path(&pki.ca)),
        ("MG_AUTH_GRPC_CLIENT_CERT", path(&pki.client_cert)),
        ("MG_AUTH_GRPC_CLIENT_KEY", path(&pki.client_key)),
    ];
    assert_eq!(list_status(&with_client_cert, ALICE).await, StatusCode::OK);
    // Without a client certificate the service refuses the connection.
    assert_eq!(
        list_status(&with_client_cert[..2], ALICE).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // A client certificate from another CA is refused as well.
    let stranger = certs::make_pki(dir.path(), "stranger");
    assert_eq!(
        list_status(
            &[
                ("MG_AUTH_GRPC_URL", url.as_str()),
                ("MG_AUTH_GRPC_SERVER_CA_CERTS", path(&pki.ca)),
                ("MG_AUTH_GRPC_CLIENT_CERT", path(&stranger.client_cert)),
                ("MG_AUTH_GRPC_CLIENT_KEY", path(&stranger.client_key)),
            ],
            ALICE
        )
        .await,
        StatusCode::SERVICE_UNAVAILABLE
    );
}
