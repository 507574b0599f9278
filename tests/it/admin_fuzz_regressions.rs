//! Requests from the admin_request fuzz target's corpus (`fuzz/`), replayed the way the target
//! sends them: straight into `veer::admin::handle` against a running proxy. Each gets the
//! status pinned here and passes the target's checks (no 5xx, a Content-Type, JSON that parses,
//! a challenge with every 401).
#![allow(clippy::disallowed_methods)]

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use veer::server::Proxy;

use crate::common::*;

const AUTH: (&str, &[u8]) = ("authorization", b"Bearer fuzz-token");

/// Method, path and query, headers beyond the default Host, body, and the status it gets.
type Case = (&'static str, &'static str, &'static [(&'static str, &'static [u8])], &'static [u8], u16);

/// In order: the commands change the rollout's state, and later answers depend on it.
const CASES: &[Case] = &[
    ("PUT", "/", &[AUTH], b"\xffGG\0\0", 405),
    ("POST", "/api/v1/routes/plain/promote", &[AUTH, ("origin", b"https://127.0.0.1:9901")], b"7777gnrto", 400),
    // A Host that is not a loopback name is refused before anything else (DNS rebinding).
    ("POST", "/api/v1/routes/", &[("host", b"a"), ("origin", b"https://a")], b"", 421),
    ("POST", "/api/v1/routes//retry", &[("authorization", b""), ("origin", b"p#rq0ame")], b"", 403),
    ("GET", "/api/v1/routes/plain/report?=", &[], b"", 200),
    ("GET", "/api/v1/events/?route=+n", &[("host", b"")], b"", 200),
    ("POST", "/web/web/report/events/events/", &[AUTH], b"", 404),
    ("POST", "/api/v1/routes/web/pause/", &[AUTH, ("origin", b"http://127.0.0.1:9901")], b"11111101111111111111", 400),
    ("GET", "/api/v1/events/?limit=3&=&limit=", &[AUTH], b"", 200),
    ("#ndidgaIIII8", "/v1/v1/v1/v1/v1/v1/v1/v1", &[AUTH], b"", 404),
    ("POST", "/api/v1/reload/?limit=&limit=", &[AUTH], b"", 200),
    ("POST", "/api/v1/routes/web/promote", &[AUTH], br#"{"reason":"otal_erro\t\t\t?"}"#, 200),
    ("POST", "/api/v1/routes/web/abort/?limit=", &[AUTH], br#"{"reason":"\\\\\\\\adcad\u0013"}"#, 200),
    ("POST", "/api/v1/routes/web/retry/?=", &[AUTH], b"", 200),
    ("GET", "/api/v1/routes/web/report", &[], b"", 200),
];

#[tokio::test]
async fn admin_requests_from_the_fuzz_corpus_get_their_answers() {
    let (stable, candidate, plain) = (refused_addr(), refused_addr(), refused_addr());
    let cfg = ConfigFile::new(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n\
         {}\n[[routes]]\nname = \"plain\"\npath_prefix = \"/plain\"\n[routes.stable]\nversion = \"v1\"\n\
         endpoints = [\"{plain}\"]\n",
        route(stable, Some(candidate), "[10, 50, 100]")
    ));
    std::fs::write(cfg.dir.path().join("admin.token"), "fuzz-token\n").expect("token");
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    for &(method, uri, headers, body, want) in CASES {
        let mut req = Request::builder().method(method).uri(uri).header(header::HOST, "127.0.0.1:9901");
        for &(name, value) in headers {
            req.headers_mut().expect("valid so far").insert(name, http::HeaderValue::from_bytes(value).expect("value"));
        }
        let req = req.body(Full::new(Bytes::from_static(body))).expect("request");
        let resp = veer::admin::handle(proxy.operations(), req).await;
        let status = resp.status();
        let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
        let challenge = resp.headers().contains_key(header::WWW_AUTHENTICATE);
        let text = resp.into_body().collect().await.expect("body").to_bytes();
        let shown = String::from_utf8_lossy(&text);
        assert_eq!(status, StatusCode::from_u16(want).expect("status"), "{method} {uri}: {shown}");
        let content_type = content_type.unwrap_or_else(|| panic!("{method} {uri}: no Content-Type"));
        if content_type == "application/json" {
            serde_json::from_slice::<serde_json::Value>(&text).unwrap_or_else(|e| panic!("{method} {uri}: {e}"));
        }
        assert_eq!(status == StatusCode::UNAUTHORIZED, challenge, "{method} {uri}: WWW-Authenticate");
    }
    proxy.drain().await;
}
