//! The operator console (`PUBGATE_CONSOLE`): nothing served when off; when on, the page, its
//! script and style, and the client package byte for byte as in clients/js, all under a strict
//! Content-Security-Policy. The page itself is exercised in Chromium by clients/js's npm tests.

mod common;

use std::net::SocketAddr;

use common::{start_node, test_config};
use pubgate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PATHS: [&str; 4] = [
    "/console",
    "/console/console.js",
    "/console/console.css",
    "/console/pubgate-client.js",
];

/// Status line, lower-cased header block and body of one request.
async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut buf),
    )
    .await
    .expect("answered")
    .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test]
async fn console_is_404_when_off() {
    let node = start_node(test_config()).await;
    for path in PATHS {
        let (status, _, body) = request(node.addr, "GET", path).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body, "not found\n");
    }
}

#[tokio::test]
async fn console_serves_its_files_under_a_strict_csp_when_on() {
    let node = start_node(Config {
        console: true,
        ..test_config()
    })
    .await;
    for (path, ctype) in PATHS.iter().zip([
        "text/html",
        "text/javascript",
        "text/css",
        "text/javascript",
    ]) {
        let (status, head, body) = request(node.addr, "GET", path).await;
        assert_eq!(status, 200, "{path}");
        assert!(
            head.contains(&format!("content-type: {ctype}")),
            "{path}: {head}"
        );
        for directive in [
            "default-src 'none'",
            "script-src 'self';",
            "connect-src 'self';",
            "frame-ancestors 'none'",
        ] {
            assert!(head.contains(directive), "{path} lacks {directive}: {head}");
        }
        assert!(!head.contains("unsafe-inline") && !head.contains("unsafe-eval"));
        assert!(head.contains("x-content-type-options: nosniff"));
        assert!(head.contains("cache-control: no-store"));
        assert!(!body.is_empty());
    }
    let (_, _, page) = request(node.addr, "GET", "/console").await;
    assert!(
        !page.contains("<script>") && !page.contains("<style>"),
        "no inline code"
    );
    let (_, _, client) = request(node.addr, "GET", "/console/pubgate-client.js").await;
    let package = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/js/src/index.js"
    ))
    .unwrap();
    assert_eq!(client, package, "the served client is the package's file");
}

#[tokio::test]
async fn console_refuses_other_methods_and_unknown_files() {
    let node = start_node(Config {
        console: true,
        ..test_config()
    })
    .await;
    let (status, head, _) = request(node.addr, "POST", "/console").await;
    assert_eq!(status, 405);
    assert!(head.contains("allow: get"));
    for path in [
        "/console/",
        "/console/nope.js",
        "/console/../metrics",
        "/consolex",
    ] {
        let (status, _, _) = request(node.addr, "GET", path).await;
        assert_eq!(status, 404, "{path}");
    }
}
