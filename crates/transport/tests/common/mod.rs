//! Helpers shared by the transport's loopback tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shoal_transport::frame;
use shoal_transport::{Dest, Incoming, Message, NodeIdentity, Transport, TransportConfig};

/// Bounds every wait: a hang fails the test, speed never does.
pub const HANG: Duration = Duration::from_secs(20);

pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(HANG, f).await.expect("operation hung")
}

pub fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub fn start(id: &NodeIdentity, config: TransportConfig) -> (Transport, Incoming) {
    Transport::bind(localhost(), id, config).unwrap()
}

pub fn dest_of(t: &Transport) -> Dest {
    Dest::node(t.name().clone(), t.local_addr())
}

pub async fn next_message(inc: &mut Incoming) -> Message {
    within(inc.recv_message()).await.expect("incoming closed")
}

/// Asserts nothing arrives for a while (used where delivery would be a bug).
pub async fn assert_silent(inc: &mut Incoming) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), inc.recv()).await {
        panic!("unexpected delivery: {item:?}");
    }
}

/// A raw quinn connection to `server` with a certificate from the cluster
/// CA, TLS done and nothing sent yet, to send bytes the transport would
/// never produce.
pub async fn raw_connect(
    id: &NodeIdentity,
    server: &Transport,
) -> (quinn::Endpoint, quinn::Connection) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(id.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(id.cert_pem().as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(id.key_pem().as_bytes()).unwrap(),
        )
        .unwrap();
    tls.alpn_protocols = vec![shoal_transport::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client(localhost()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = within(
        endpoint
            .connect(server.local_addr(), server.name().as_str())
            .unwrap(),
    )
    .await
    .unwrap();
    (endpoint, conn)
}

/// Sends `bytes` on a uni stream of its own and finishes it.
pub async fn send_uni(conn: &quinn::Connection, bytes: &[u8]) {
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(bytes).await.unwrap();
    s.finish().unwrap();
}

/// [`raw_connect`], then a hello like a real node's, so the server admits
/// the connection.
pub async fn raw_client(
    id: &NodeIdentity,
    server: &Transport,
) -> (quinn::Endpoint, quinn::Connection) {
    let (endpoint, conn) = raw_connect(id, server).await;
    send_uni(
        &conn,
        &frame::encode_hello(&frame::Hello {
            version: 1,
            instance: 42,
            features: frame::features::ALL,
            app_features: 0,
        }),
    )
    .await;
    (endpoint, conn)
}

/// Incompressible bytes (xorshift), `n` long.
pub fn noise(n: usize, seed: u32) -> Bytes {
    let mut x = seed | 1;
    Bytes::from(
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect::<Vec<u8>>(),
    )
}

/// Polls `cond` until it holds (bounded by `HANG`).
pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let waited = tokio::time::timeout(HANG, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "never happened: {what}");
}
