//! A device speaking protocol messages directly, for tests of the relay.

use std::sync::Arc;

use quinn::VarInt;
use quinn::crypto::rustls::QuicClientConfig;
use roamsync::crypto::device_log::DeviceLog;
use roamsync::crypto::envelope::{EnvelopeHeader, EnvelopeKind, SealedEnvelope};
use roamsync::crypto::group::{GroupUpdate, SealedLabel};
use roamsync::crypto::identity::DeviceSecret;
use roamsync::crypto::keys::{DocKey, KeyEpoch};
use roamsync::crypto::rng::SeedRng;
use roamsync::ids::{AccountId, ConversationId, DocAddr, DocId};
use roamsync::net::{FramedRecv, FramedSend, Identity, PeerAddr, PinnedServerVerifier};
use roamsync::wire::frame::Frame;
use roamsync::wire::message::Message;

use super::WAIT;

/// A device speaking protocol messages directly.
pub struct Client {
    pub secret: DeviceSecret,
    pub log: DeviceLog,
    pub conn: quinn::Connection,
    pub send: FramedSend,
    pub recv: FramedRecv,
    _endpoint: quinn::Endpoint,
}

impl Client {
    pub async fn connect(relay: &PeerAddr, seed: u8) -> Client {
        let secret = DeviceSecret::generate(&mut SeedRng::from_seed([seed; 32]));
        let log = DeviceLog::create(&secret, "smoke", "test").unwrap();
        Client::connect_as(relay, secret, log).await
    }

    /// Connects with receive windows of `window_bytes` (stream) and twice that (connection)
    /// instead of the transport's, so a client that stops reading blocks the relay's writer
    /// after a few pushes.
    pub async fn connect_with_window(relay: &PeerAddr, seed: u8, window_bytes: u32) -> Client {
        let secret = DeviceSecret::generate(&mut SeedRng::from_seed([seed; 32]));
        let log = DeviceLog::create(&secret, "smoke", "test").unwrap();
        let identity = Identity::from_device(&secret).unwrap();
        let endpoint = roamsync::net::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let verifier = Arc::new(PinnedServerVerifier::new(relay.key));
        let tls = roamsync::net::tls::client_config(&identity, verifier).unwrap();
        let crypto = QuicClientConfig::try_from(tls).unwrap();
        let mut transport = roamsync::net::transport_config();
        transport
            .stream_receive_window(VarInt::from_u32(window_bytes))
            .receive_window(VarInt::from_u32(2 * window_bytes));
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        let addr = relay.resolve().await.unwrap();
        let conn = endpoint
            .connect_with(config, addr, roamsync::net::tls::SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        Client {
            secret,
            log,
            conn,
            send: FramedSend::new(send),
            recv: FramedRecv::new(recv),
            _endpoint: endpoint,
        }
    }

    /// Connects as an existing device of an existing account (whose log the relay holds).
    pub async fn connect_as(relay: &PeerAddr, secret: DeviceSecret, log: DeviceLog) -> Client {
        let identity = Identity::from_device(&secret).unwrap();
        let endpoint = roamsync::net::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = roamsync::net::connect(&endpoint, &identity, relay)
            .await
            .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        Client {
            secret,
            log,
            conn,
            send: FramedSend::new(send),
            recv: FramedRecv::new(recv),
            _endpoint: endpoint,
        }
    }

    pub fn account(&self) -> AccountId {
        self.log.account()
    }

    pub async fn send(&mut self, msg: Message) {
        self.send.send(&Frame::Message(msg)).await.unwrap();
    }

    pub async fn next(&mut self) -> Message {
        match tokio::time::timeout(WAIT, self.recv.recv()).await {
            Ok(Ok(Some(Frame::Message(m)))) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    pub async fn request(&mut self, msg: Message) -> Message {
        self.send(msg).await;
        self.next().await
    }

    /// Creates the account on the relay and authenticates.
    pub async fn sign_in(&mut self) {
        let (account, entries) = (self.account(), self.log.entries().to_vec());
        let done = self
            .request(Message::LogAppend {
                req: 1,
                account,
                first_seq: 0,
                entries,
            })
            .await;
        assert_eq!(done, Message::Done { req: 1 });
        let hello = self
            .request(Message::Hello {
                req: 2,
                account,
                log_len: 1,
                log_head: self.log.head(),
            })
            .await;
        assert!(
            matches!(hello, Message::HelloOk { log_len: 1, .. }),
            "{hello:?}"
        );
    }

    /// Says hello for an account whose log the relay already holds.
    pub async fn hello(&mut self, req: u32) {
        let (account, log_len, log_head) = (self.account(), self.log.len() as u32, self.log.head());
        let hello = self
            .request(Message::Hello {
                req,
                account,
                log_len,
                log_head,
            })
            .await;
        assert!(matches!(hello, Message::HelloOk { .. }), "{hello:?}");
    }

    pub fn update(&self, version: u32, members: Vec<AccountId>) -> GroupUpdate {
        let addr = DocAddr::Meta(ConversationId::from_bytes([7; 16]));
        let mut rng = SeedRng::from_seed([9; 32]);
        let label = SealedLabel::seal(&addr, KeyEpoch(0), &DocKey::from_bytes([1; 32]), &mut rng);
        GroupUpdate::sign(
            &self.secret,
            self.account(),
            addr.doc_id(),
            version,
            members,
            Vec::new(),
            label,
        )
        .unwrap()
    }

    pub fn envelope(&self, doc: DocId, seq: u64) -> SealedEnvelope {
        let header = EnvelopeHeader {
            kind: EnvelopeKind::Changes,
            doc,
            epoch: KeyEpoch(0),
            author: self.secret.device_id(),
            first_seq: seq,
            last_seq: seq,
        };
        SealedEnvelope::seal(
            &self.secret,
            &DocKey::from_bytes([1; 32]),
            header,
            b"sealed",
        )
        .unwrap()
    }
}
