//! The async shell of LAN discovery: one task that owns the multicast socket, sends what
//! [`Discovery`] schedules and hands it every datagram received.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{Discovered, Discovery, DiscoveryAccount, DiscoveryError};
use crate::crypto::rng::SeedRng;
use crate::ids::DeviceId;

/// The default discovery group, in the administratively scoped (site-local) IPv4 range.
pub const DEFAULT_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 77, 77);
/// The default discovery port.
pub const DEFAULT_PORT: u16 = 47_700;
/// The default announcement interval.
pub const DEFAULT_INTERVAL_MS: u64 = 2_000;
/// Announcements stay on the local link: routers do not forward them.
pub const MULTICAST_TTL: u32 = 1;
/// The receive buffer: larger than any announcement, so a longer datagram is seen whole and
/// refused by its length rather than cut to look like one.
pub const RECV_BUFFER_BYTES: usize = 512;
/// How long the task pauses after a failed receive before trying again, so that a persistent
/// socket error does not spin.
pub const RECV_ERROR_PAUSE_MS: u64 = 100;

/// Where and how often to announce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// Whether to run discovery at all; a disabled config spawns nothing.
    pub enabled: bool,
    /// The multicast group and port every device of every account sends to and listens on.
    pub group: SocketAddrV4,
    /// The local interface to join the group on and send from; `UNSPECIFIED` leaves the choice
    /// to the operating system (the interface of the default route).
    pub interface: Ipv4Addr,
    /// How often to announce (with up to a quarter less, at random, each time).
    pub interval_ms: u64,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            group: SocketAddrV4::new(DEFAULT_GROUP, DEFAULT_PORT),
            interface: Ipv4Addr::UNSPECIFIED,
            interval_ms: DEFAULT_INTERVAL_MS,
        }
    }
}

/// The running discovery task; dropping the handle stops it and closes its socket.
#[derive(Debug)]
pub struct DiscoveryHandle {
    task: Option<JoinHandle<()>>,
}

impl DiscoveryHandle {
    /// Whether a task is running (false for a disabled config, or once the task ended because
    /// the receiver of `found` was dropped).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for DiscoveryHandle {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Starts discovery on the current Tokio runtime: announces `own` with `quic_port` to the group
/// and sends every device of the account heard on `found` (a device at one address at most once
/// per interval). `account` carries the key and the device list; a change takes effect at once.
/// The task ends when the handle is dropped or `found`'s receiver is.
pub fn spawn_discovery(
    config: DiscoveryConfig,
    own: DeviceId,
    quic_port: u16,
    mut account: watch::Receiver<DiscoveryAccount>,
    found: mpsc::UnboundedSender<Discovered>,
) -> Result<DiscoveryHandle, DiscoveryError> {
    if !config.enabled {
        return Ok(DiscoveryHandle { task: None });
    }
    if !config.group.ip().is_multicast() {
        return Err(DiscoveryError::NotMulticast {
            group: config.group,
        });
    }
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| DiscoveryError::NoRuntime)?;
    let socket = {
        // Registering the socket with the reactor needs the runtime's context.
        let _entered = runtime.enter();
        UdpSocket::from_std(multicast_socket(&config)?.into()).map_err(|source| {
            DiscoveryError::Socket {
                group: config.group,
                step: "register with the runtime",
                source,
            }
        })?
    };
    let core = Discovery::new(
        own,
        quic_port,
        config.interval_ms,
        account.borrow_and_update().clone(),
        jitter_rng(&own),
        now_ms(),
    );
    let task = runtime.spawn(run(socket, config.group.into(), core, account, found));
    Ok(DiscoveryHandle { task: Some(task) })
}

/// A non-blocking UDP socket bound to the group's port on every address, sharing the port with
/// other processes, joined to the group, hearing its own host's announcements.
fn multicast_socket(config: &DiscoveryConfig) -> Result<Socket, DiscoveryError> {
    let group = config.group;
    let step = |step: &'static str| {
        move |source| DiscoveryError::Socket {
            group,
            step,
            source,
        }
    };
    let socket =
        Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(step("create"))?;
    socket
        .set_reuse_address(true)
        .map_err(step("set SO_REUSEADDR"))?;
    #[cfg(all(
        unix,
        not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))
    ))]
    socket
        .set_reuse_port(true)
        .map_err(step("set SO_REUSEPORT"))?;
    // Without this, Linux also delivers datagrams of every other group joined on the host that
    // arrive at this port.
    #[cfg(target_os = "linux")]
    socket
        .set_multicast_all_v4(false)
        .map_err(step("clear IP_MULTICAST_ALL"))?;
    socket
        .set_nonblocking(true)
        .map_err(step("set non-blocking"))?;
    let bind = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, group.port());
    socket.bind(&bind.into()).map_err(step("bind"))?;
    socket
        .join_multicast_v4(group.ip(), &config.interface)
        .map_err(step("join group"))?;
    if !config.interface.is_unspecified() {
        socket
            .set_multicast_if_v4(&config.interface)
            .map_err(step("set IP_MULTICAST_IF"))?;
    }
    socket
        .set_multicast_loop_v4(true)
        .map_err(step("set IP_MULTICAST_LOOP"))?;
    socket
        .set_multicast_ttl_v4(MULTICAST_TTL)
        .map_err(step("set IP_MULTICAST_TTL"))?;
    Ok(socket)
}

/// The task: announce when due, take account changes, hand received datagrams to the core.
async fn run(
    socket: UdpSocket,
    group: SocketAddr,
    mut core: Discovery,
    mut account: watch::Receiver<DiscoveryAccount>,
    found: mpsc::UnboundedSender<Discovered>,
) {
    let mut buf = [0u8; RECV_BUFFER_BYTES];
    let mut watching = true;
    loop {
        let now = now_ms();
        if let Some(packet) = core.poll_announcement(now) {
            if let Err(e) = socket.send_to(&packet, group).await {
                // No route (the network is down) is normal on a mobile device; keep trying.
                tracing::debug!(%group, error = %e, "discovery announcement not sent");
            }
        }
        let wait = Duration::from_millis(core.poll_timeout().saturating_sub(now));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = found.closed() => return,
            changed = account.changed(), if watching => match changed {
                Ok(()) => core.handle_account(account.borrow_and_update().clone()),
                // The sender is gone: keep the last account until the handle is dropped.
                Err(_) => watching = false,
            },
            received = socket.recv_from(&mut buf) => match received {
                Ok((len, from)) => match core.handle_packet(from, &buf[..len], now_ms()) {
                    Ok(Some(discovered)) => {
                        if found.send(discovered).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::trace!(%from, error = %e, "not a discovery announcement"),
                },
                Err(e) => {
                    tracing::debug!(error = %e, "discovery receive failed");
                    tokio::time::sleep(Duration::from_millis(RECV_ERROR_PAUSE_MS)).await;
                }
            },
        }
    }
}

/// The generator of announcement jitter. Jitter only needs to differ between devices, not to be
/// secret, so a failure to read OS randomness falls back to the clock and the device id.
fn jitter_rng(own: &DeviceId) -> SeedRng {
    let mut seed = [0u8; 32];
    if getrandom::fill(&mut seed).is_err() {
        seed[..8].copy_from_slice(&now_ms().to_be_bytes());
        seed[8..].copy_from_slice(&own.as_bytes()[..24]);
    }
    SeedRng::from_seed(seed)
}

/// The wall clock in milliseconds since the Unix epoch. Tokens are per wall-clock epoch, so
/// devices must agree on it within an epoch; a monotonic clock would not do.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
