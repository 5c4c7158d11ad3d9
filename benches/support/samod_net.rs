//! samod (the Rust automerge-repo) plumbing shared by the benchmarks that run it beside
//! roamsync: a sync server on loopback TCP, peers dialing it, byte counts at the socket, and
//! documents laid out like our segment documents.
//!
//! - The sync server is a `samod::Repo` with an acceptor fed by a `TcpListener` on 127.0.0.1.
//! - A peer is another repo dialing the server over loopback TCP in samod's length-delimited
//!   framing, `TCP_NODELAY` on both ends so Nagle's algorithm adds no delay. Its socket counts
//!   the bytes it reads and writes (framing included), so what a peer was sent is measured
//!   where it crosses the wire, not estimated from the documents.
//! - A message is a map at the document's root, `{id, author, body, ts}`, under a key of 32 hex
//!   digits (hybrid-logical-clock timestamp, then device prefix), so that key order is
//!   conversation order.

// Each benchmark that includes this module uses part of it.
#![allow(dead_code)]

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{Automerge, AutomergeError, ObjType, ROOT};
use futures::FutureExt;
use futures::future::BoxFuture;
use samod::{BackoffConfig, DialError, Repo, Transport, Url};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Bound on each setup step (connecting, creating and syncing documents).
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(600);

/// Bytes that crossed one socket, framing included.
#[derive(Debug, Default)]
pub struct SocketTraffic {
    /// Bytes read from the socket.
    pub received: AtomicU64,
    /// Bytes written to the socket.
    pub sent: AtomicU64,
}

impl SocketTraffic {
    /// Bytes read so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Bytes written so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

/// A socket that counts what passes through it.
struct CountingIo<S> {
    inner: S,
    traffic: Arc<SocketTraffic>,
}

impl<S: AsyncRead + Unpin> AsyncRead for CountingIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.traffic.received.fetch_add(n as u64, Ordering::Relaxed);
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountingIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            self.traffic.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Dials the server over loopback TCP with Nagle's algorithm off, in samod's TCP framing,
/// counting the bytes of every connection it makes.
struct LoopbackDialer {
    addr: std::net::SocketAddr,
    traffic: Arc<SocketTraffic>,
}

impl samod::Dialer for LoopbackDialer {
    type Error = std::convert::Infallible;

    fn url(&self) -> Url {
        Url::parse(&format!("tcp://{}", self.addr)).expect("loopback url")
    }

    fn connect(&self) -> BoxFuture<'static, Result<Transport, DialError<Self::Error>>> {
        let addr = self.addr;
        let traffic = self.traffic.clone();
        async move {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(DialError::transient)?;
            stream.set_nodelay(true).map_err(DialError::transient)?;
            Ok(Transport::from_tokio_io(CountingIo {
                inner: stream,
                traffic,
            }))
        }
        .boxed()
    }
}

/// A sync server: a repo accepting every connection made to a loopback socket.
pub struct SyncServer {
    /// The server's repo.
    pub repo: Repo,
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl SyncServer {
    /// Starts a server on a free loopback port.
    pub async fn start() -> SyncServer {
        let repo = Repo::build_tokio().load().await;
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let acceptor = repo
            .make_acceptor(Url::parse(&format!("tcp://{addr}")).expect("url"))
            .expect("server running");
        let accept_loop = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if stream.set_nodelay(true).is_err() {
                    continue;
                }
                if acceptor.accept(Transport::from_tokio_io(stream)).is_err() {
                    break;
                }
            }
        });
        SyncServer {
            repo,
            addr,
            accept_loop,
        }
    }

    /// Stops the server's repo and its accept loop.
    pub async fn stop(self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.repo.stop()).await;
        self.accept_loop.abort();
    }
}

/// A peer: its repo, its connection to the server, and the bytes that crossed its socket.
pub struct Device {
    /// The peer's repo.
    pub repo: Repo,
    /// Its connection to the server.
    pub connection: samod::ConnectionId,
    /// Bytes its socket read and wrote.
    pub traffic: Arc<SocketTraffic>,
}

/// A new peer (empty in-memory repo) connected to the server at `addr`.
pub async fn connect_device(addr: std::net::SocketAddr) -> Device {
    let repo = Repo::build_tokio().load().await;
    let traffic = Arc::new(SocketTraffic::default());
    let dialer = repo
        .dial(
            BackoffConfig::default(),
            Arc::new(LoopbackDialer {
                addr,
                traffic: traffic.clone(),
            }),
        )
        .expect("repo running");
    step("connect", dialer.established())
        .await
        .expect("connected to the server");
    let connection = dialer.connection_id().expect("connected");
    Device {
        repo,
        connection,
        traffic,
    }
}

/// Runs a setup step, panicking after [`SETUP_TIMEOUT`].
pub async fn step<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(SETUP_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("samod setup step `{what}` timed out"))
}

/// A message key: HLC (milliseconds << 16 | counter) and device prefix, as 32 hex digits.
pub fn message_key(hlc: u64, device: u64) -> String {
    format!("{hlc:016x}{device:016x}")
}

/// A body of exactly `len` bytes of printable text, different for each message.
pub fn body(seq: u64, len: usize) -> String {
    const FILLER: &str =
        "see you at the station at ten, I will bring the tickets and some coffee. ";
    let mut s = format!("#{seq} ");
    while s.len() < len {
        s.push_str(FILLER);
    }
    s.truncate(len);
    s
}

/// Adds one message map at the root, in its own change.
pub fn put_message(
    doc: &mut Automerge,
    key: &str,
    id: i64,
    author: [u8; 32],
    text: &str,
    ts_us: i64,
) -> Result<(), AutomergeError> {
    doc.transact::<_, _, AutomergeError>(|tx| {
        let msg = tx.put_object(ROOT, key, ObjType::Map)?;
        tx.put(&msg, "id", id)?;
        tx.put(&msg, "author", author.to_vec())?;
        tx.put(&msg, "body", text)?;
        tx.put(&msg, "ts", ts_us)?;
        Ok(())
    })
    .map(|_| ())
    .map_err(|failure| failure.error)
}
