//! Transport tests over real QUIC on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;

use super::*;
use crate::crypto::identity::DeviceSecret;
use crate::crypto::rng::SeedRng;
use crate::ids::{DeviceId, IdParseError};
use crate::net::tls::device_from_certificate;
use crate::wire::frame::{ErrorCode, Frame, FrameType, WireError};

/// Long enough for a loopback handshake on a loaded machine; short enough that a hang fails.
const TEST_TIMEOUT: Duration = Duration::from_secs(10);

fn secret(seed: u8) -> DeviceSecret {
    DeviceSecret::generate(&mut SeedRng::from_seed([seed; 32]))
}

fn identity(seed: u8) -> Identity {
    Identity::from_device(&secret(seed)).expect("identity of a fresh device")
}

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn frame(i: usize) -> Frame {
    Frame::Error {
        code: ErrorCode(u16::try_from(i % 1000).expect("below 1000")),
        message: format!("frame number {i}"),
    }
}

/// A server endpoint for `identity` and the address to reach it, pinned to `pin`.
fn server(identity: &Identity, pin: DeviceId) -> (quinn::Endpoint, PeerAddr) {
    let endpoint = server_endpoint(identity, localhost()).expect("server endpoint");
    let port = endpoint.local_addr().expect("bound").port();
    let addr = PeerAddr {
        key: pin,
        host: "127.0.0.1".into(),
        port,
    };
    (endpoint, addr)
}

/// Accepts one connection on `endpoint` in a task.
fn accept_one(
    endpoint: &quinn::Endpoint,
) -> tokio::task::JoinHandle<Result<(quinn::Connection, DeviceId), NetError>> {
    let endpoint = endpoint.clone();
    tokio::spawn(async move {
        let incoming = endpoint.accept().await.expect("endpoint open");
        accept(incoming).await
    })
}

async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, fut)
        .await
        .expect("finished in time")
}

/// A certificate and key that are not ed25519.
fn ecdsa_certified() -> CertifiedKey {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let cert = rcgen::CertificateParams::new(vec![tls::SERVER_NAME.to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signer = rustls::crypto::ring::sign::any_supported_type(&der).expect("signing key");
    CertifiedKey::new(vec![cert.der().clone()], signer)
}

#[tokio::test]
async fn pinned_key_connects_and_frames_arrive_in_order() {
    let (server_id, client_id) = (identity(1), identity(2));
    let (server_ep, addr) = server(&server_id, server_id.device_id());
    let accepted = accept_one(&server_ep);
    let client_ep = client_endpoint(localhost()).expect("client endpoint");

    let conn = within(connect(&client_ep, &client_id, &addr))
        .await
        .expect("connects");
    assert_eq!(
        peer_device(&conn).expect("server key"),
        server_id.device_id()
    );
    let (server_conn, seen) = within(accepted).await.expect("task").expect("accepts");
    assert_eq!(seen, client_id.device_id());
    assert_eq!(peer_device(&server_conn).expect("client key"), seen);

    const COUNT: usize = 2_000;
    let (send, recv) = conn.open_bi().await.expect("open stream");
    let (mut send, mut recv) = (FramedSend::new(send), FramedRecv::new(recv));
    send.send(&frame(0)).await.expect("first frame");
    let (s_send, s_recv) = within(server_conn.accept_bi()).await.expect("stream");
    let (mut s_send, mut s_recv) = (FramedSend::new(s_send), FramedRecv::new(s_recv));
    assert_eq!(within(s_recv.recv()).await.expect("read"), Some(frame(0)));

    // Many frames in a row, some of them pre-encoded back to back in one write.
    for i in 1..COUNT / 2 {
        send.send(&frame(i)).await.expect("send");
    }
    let batch: Vec<u8> = (COUNT / 2..COUNT).flat_map(|i| frame(i).encode()).collect();
    send.send_encoded(&batch).await.expect("send batch");
    send.finish().expect("finish");
    for i in 1..COUNT {
        assert_eq!(within(s_recv.recv()).await.expect("read"), Some(frame(i)));
    }
    assert_eq!(within(s_recv.recv()).await.expect("clean end"), None);

    // And back.
    s_send.send(&frame(7)).await.expect("reply");
    s_send.finish().expect("finish reply");
    assert_eq!(
        within(recv.recv()).await.expect("read reply"),
        Some(frame(7))
    );
    assert_eq!(within(recv.recv()).await.expect("clean end"), None);
}

#[tokio::test]
async fn wrong_pinned_key_is_a_typed_error() {
    let (server_id, client_id) = (identity(1), identity(2));
    let wrong = identity(3).device_id();
    let (server_ep, addr) = server(&server_id, wrong);
    let accepted = accept_one(&server_ep);
    let client_ep = client_endpoint(localhost()).expect("client endpoint");

    match within(connect(&client_ep, &client_id, &addr)).await {
        Err(NetError::PeerKey(PeerKeyError::WrongKey { expected, found })) => {
            assert_eq!(expected, wrong);
            assert_eq!(found, server_id.device_id());
        }
        other => panic!("expected WrongKey, got {other:?}"),
    }
    assert!(within(accepted).await.expect("task").is_err());
}

#[tokio::test]
async fn server_without_the_pinned_private_key_is_refused() {
    // The impostor replays the real server's certificate but signs with its own key.
    let (real, impostor) = (identity(1), identity(4));
    let signer = rustls::crypto::ring::sign::any_eddsa_type(&ed25519_pkcs8_of(&secret(4)))
        .expect("impostor key");
    let fake = Identity::from_parts(
        real.device_id(),
        CertifiedKey::new(vec![real.certificate().clone()], signer),
    );
    assert_ne!(impostor.device_id(), real.device_id());
    let (server_ep, addr) = server(&fake, real.device_id());
    let _accepted = accept_one(&server_ep);
    let client_ep = client_endpoint(localhost()).expect("client endpoint");

    match within(connect(&client_ep, &identity(2), &addr)).await {
        Err(NetError::PeerKey(PeerKeyError::BadSignature { key })) => {
            assert_eq!(key, real.device_id());
        }
        other => panic!("expected BadSignature, got {other:?}"),
    }
}

/// The PKCS#8 form of a device key, as `Identity::from_device` builds it.
fn ed25519_pkcs8_of(secret: &DeviceSecret) -> rustls::pki_types::PrivatePkcs8KeyDer<'static> {
    let (seed, _) = secret.secret_bytes_for_storage();
    tls::ed25519_pkcs8(&seed, &secret.device_id())
        .to_vec()
        .into()
}

#[test]
fn identity_certificate_carries_the_device_key() {
    let device = secret(5);
    let id = Identity::from_device(&device).expect("identity");
    assert_eq!(id.device_id(), device.device_id());
    assert_eq!(
        device_from_certificate(id.certificate()),
        Ok(device.device_id())
    );
    let debug = format!("{id:?}");
    assert!(debug.contains("<redacted>"), "{debug}");
}

#[test]
fn non_ed25519_certificates_are_refused_by_both_verifiers() {
    let ecdsa = ecdsa_certified();
    let cert = &ecdsa.cert[0];
    assert!(matches!(
        device_from_certificate(cert),
        Err(PeerKeyError::NotEd25519 { .. })
    ));

    let pinned = PinnedServerVerifier::new(identity(1).device_id());
    let name = ServerName::try_from(tls::SERVER_NAME).expect("server name");
    let result = pinned.verify_server_cert(cert, &[], &name, &[], UnixTime::now());
    assert!(result.is_err());
    assert!(matches!(
        pinned.take_rejection(),
        Some(PeerKeyError::NotEd25519 { .. })
    ));

    let clients = Ed25519ClientVerifier::new();
    assert!(
        clients
            .verify_client_cert(cert, &[], UnixTime::now())
            .is_err()
    );
    assert!(clients.client_auth_mandatory());

    // The genuine certificate passes both, and only ed25519 signatures are offered.
    let good = identity(1);
    assert!(
        pinned
            .verify_server_cert(good.certificate(), &[], &name, &[], UnixTime::now())
            .is_ok()
    );
    assert!(
        clients
            .verify_client_cert(good.certificate(), &[], UnixTime::now())
            .is_ok()
    );
    assert_eq!(
        pinned.supported_verify_schemes(),
        vec![rustls::SignatureScheme::ED25519]
    );
    assert_eq!(
        clients.supported_verify_schemes(),
        vec![rustls::SignatureScheme::ED25519]
    );
}

#[test]
fn garbage_certificates_are_refused() {
    let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
    assert!(matches!(
        device_from_certificate(&garbage),
        Err(PeerKeyError::MalformedCertificate { .. })
    ));
}

#[tokio::test]
async fn ecdsa_server_is_refused() {
    let fake = Identity::from_parts(identity(1).device_id(), ecdsa_certified());
    let (server_ep, addr) = server(&fake, fake.device_id());
    let _accepted = accept_one(&server_ep);
    let client_ep = client_endpoint(localhost()).expect("client endpoint");
    let result = within(connect(&client_ep, &identity(2), &addr)).await;
    assert!(result.is_err(), "{result:?}");
}

#[tokio::test]
async fn ecdsa_client_is_refused() {
    let server_id = identity(1);
    let (server_ep, addr) = server(&server_id, server_id.device_id());
    let accepted = accept_one(&server_ep);
    let client_ep = client_endpoint(localhost()).expect("client endpoint");
    let fake = Identity::from_parts(identity(2).device_id(), ecdsa_certified());

    // The client may finish its side of the handshake before the server's verdict arrives, so
    // the proof is that the server refuses and the client's connection then dies.
    let client = tokio::spawn(async move {
        match connect(&client_ep, &fake, &addr).await {
            Ok(conn) => conn.closed().await.into(),
            Err(e) => e,
        }
    });
    assert!(within(accepted).await.expect("task").is_err());
    let client_error = within(client).await.expect("client task");
    assert!(
        matches!(client_error, NetError::Connection(_)),
        "{client_error:?}"
    );
}

#[tokio::test]
async fn alpn_mismatch_is_refused() {
    let (server_id, client_id) = (identity(1), identity(2));
    let (server_ep, addr) = server(&server_id, server_id.device_id());
    let accepted = accept_one(&server_ep);
    let client_ep = client_endpoint(localhost()).expect("client endpoint");

    let verifier = Arc::new(PinnedServerVerifier::new(server_id.device_id()));
    let mut tls = tls::client_config(&client_id, verifier).expect("client config");
    tls.alpn_protocols = vec![b"other/1".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic config");
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let target = addr.resolve().await.expect("resolve");
    let connecting = client_ep
        .connect_with(config, target, tls::SERVER_NAME)
        .expect("start connect");
    assert!(within(connecting).await.is_err());
    assert!(within(accepted).await.expect("task").is_err());
}

#[tokio::test]
async fn server_without_alpn_is_refused() {
    let (server_id, client_id) = (identity(1), identity(2));
    let mut tls = tls::server_config(&server_id).expect("server config");
    tls.alpn_protocols.clear();
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("quic config");
    let server_ep = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(crypto)),
        localhost(),
    )
    .expect("server endpoint");
    let addr = PeerAddr {
        key: server_id.device_id(),
        host: "127.0.0.1".into(),
        port: server_ep.local_addr().expect("bound").port(),
    };
    let _accepted = accept_one(&server_ep);
    let client_ep = client_endpoint(localhost()).expect("client endpoint");
    let result = within(connect(&client_ep, &client_id, &addr)).await;
    assert!(
        matches!(
            result,
            Err(NetError::MissingAlpn { found: None } | NetError::Connection(_))
        ),
        "{result:?}"
    );
}

/// A connected pair of streams: what the client writes raw, the server reads framed.
async fn raw_stream_pair() -> (
    quinn::SendStream,
    FramedRecv,
    quinn::Connection,
    quinn::Connection,
) {
    let (server_id, client_id) = (identity(1), identity(2));
    let (server_ep, addr) = server(&server_id, server_id.device_id());
    let accepted = accept_one(&server_ep);
    let client_ep = client_endpoint(localhost()).expect("client endpoint");
    let conn = within(connect(&client_ep, &client_id, &addr))
        .await
        .expect("connects");
    let (server_conn, _) = within(accepted).await.expect("task").expect("accepts");
    let (mut send, _recv) = conn.open_bi().await.expect("open stream");
    // A stream becomes visible to the peer with its first byte; send the frame version.
    send.write_all(&[crate::wire::frame::FRAME_VERSION])
        .await
        .expect("write");
    let (_s_send, s_recv) = within(server_conn.accept_bi()).await.expect("stream");
    (send, FramedRecv::new(s_recv), conn, server_conn)
}

#[tokio::test]
async fn garbage_on_a_stream_is_a_wire_error() {
    let (mut send, mut recv, _c, _s) = raw_stream_pair().await;
    send.write_all(&[0xee; 32]).await.expect("write garbage");
    match within(recv.recv()).await {
        Err(NetError::Wire(WireError::UnknownType { frame_type: 0xee })) => {}
        other => panic!("expected UnknownType, got {other:?}"),
    }
}

#[tokio::test]
async fn oversized_length_is_refused_from_the_header_alone() {
    let (mut send, mut recv, _c, _s) = raw_stream_pair().await;
    // Only the rest of the header: if the receiver waited for the payload this would hang.
    let mut header = vec![FrameType::Error as u8];
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    send.write_all(&header).await.expect("write header");
    match within(recv.recv()).await {
        Err(NetError::Wire(WireError::FrameTooLarge { len, max })) => {
            assert_eq!(len, u32::MAX as usize);
            assert_eq!(max, FrameType::Error.max_payload());
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
}

#[tokio::test]
async fn stream_ending_inside_a_frame_is_an_error() {
    let (mut send, mut recv, _c, _s) = raw_stream_pair().await;
    let bytes = frame(1).encode();
    send.write_all(&bytes[1..bytes.len() - 1])
        .await
        .expect("write");
    send.finish().expect("finish");
    match within(recv.recv()).await {
        Err(NetError::TruncatedFrame { buffered }) => assert_eq!(buffered, bytes.len() - 1),
        other => panic!("expected TruncatedFrame, got {other:?}"),
    }
}

#[test]
fn peer_addr_round_trips() {
    let key = identity(1).device_id();
    for text in [
        format!("{key}@relay.example.org:4433"),
        format!("{key}@127.0.0.1:1"),
        format!("{key}@[::1]:4433"),
        format!("{key}@[2001:db8::7]:65535"),
    ] {
        let addr: PeerAddr = text.parse().expect("parses");
        assert_eq!(addr.key, key);
        assert_eq!(addr.to_string(), text);
    }
    let v6: PeerAddr = format!("{key}@[::1]:4433").parse().expect("parses");
    assert_eq!((v6.host.as_str(), v6.port), ("::1", 4433));
}

#[test]
fn peer_addr_malformed_forms_are_typed() {
    let key = identity(1).device_id().to_string();
    let cases: Vec<(String, PeerAddrError)> = vec![
        ("relay.example.org:4433".into(), PeerAddrError::MissingAt),
        (
            "abcd@relay:1".into(),
            PeerAddrError::Key(IdParseError::Length {
                len: 4,
                expected: 64,
            }),
        ),
        (
            format!("{}@relay:1", "zz".repeat(32)),
            PeerAddrError::Key(IdParseError::NotHex { byte: b'z' }),
        ),
        (format!("{key}@relay"), PeerAddrError::MissingPort),
        (
            format!("{key}@relay:"),
            PeerAddrError::BadPort { port: "".into() },
        ),
        (
            format!("{key}@relay:0"),
            PeerAddrError::BadPort { port: "0".into() },
        ),
        (
            format!("{key}@relay:65536"),
            PeerAddrError::BadPort {
                port: "65536".into(),
            },
        ),
        (
            format!("{key}@relay:x1"),
            PeerAddrError::BadPort { port: "x1".into() },
        ),
        (format!("{key}@:4433"), PeerAddrError::EmptyHost),
        (
            format!("{key}@{}:1", "a".repeat(254)),
            PeerAddrError::HostTooLong { len: 254, max: 253 },
        ),
        (
            format!("{key}@re lay:1"),
            PeerAddrError::InvalidHostChar { ch: ' ' },
        ),
        (format!("{key}@::1:4433"), PeerAddrError::UnbracketedIpv6),
        (format!("{key}@[::1:4433"), PeerAddrError::BadBrackets),
        (format!("{key}@[::1]x:4433"), PeerAddrError::BadBrackets),
        (format!("{key}@[::1]"), PeerAddrError::MissingPort),
        (
            format!("{key}@[relay]:1"),
            PeerAddrError::BadIpv6 {
                host: "relay".into(),
            },
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(text.parse::<PeerAddr>(), Err(expected), "{text}");
    }
}

#[tokio::test]
async fn peer_addr_resolves_ip_literals() {
    let key = identity(1).device_id();
    let v4: PeerAddr = format!("{key}@127.0.0.1:4433").parse().expect("parses");
    assert_eq!(
        v4.resolve().await.expect("resolves"),
        SocketAddr::from(([127, 0, 0, 1], 4433))
    );
    let v6: PeerAddr = format!("{key}@[::1]:4433").parse().expect("parses");
    assert_eq!(
        v6.resolve().await.expect("resolves"),
        "[::1]:4433".parse::<SocketAddr>().expect("literal")
    );
}
