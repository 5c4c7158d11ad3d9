//! Discovery tests: tokens, the packet codec, the sans-IO core, and real multicast sockets on
//! 127.0.0.1 (in this process and between two processes).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use proptest::prelude::*;
use tokio::sync::{mpsc, watch};

use super::*;
use crate::ids::AccountId;

/// A wall-clock time in the middle of an epoch.
const T0: u64 = 1_700_000_000_000 / TOKEN_ROTATE_MS * TOKEN_ROTATE_MS + TOKEN_ROTATE_MS / 2;

/// Interval of the socket tests: short, so they finish quickly.
const TEST_INTERVAL_MS: u64 = 100;
/// How long a socket test waits for a device that should be found.
const FIND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a socket test listens for a device that should not be found.
const QUIET_WINDOW: Duration = Duration::from_millis(1_000);
/// Set in the environment of the child process of `another_process_on_the_host_is_found`.
const PEER_ENV: &str = "ROAMSYNC_TEST_DISCOVERY_PEER";

fn device(n: u8) -> DeviceId {
    DeviceId::from_bytes([n; 32])
}

fn key(n: u8) -> DiscoveryKey {
    DiscoveryKey::derive(&[n; 32])
}

fn account(key_seed: u8, devices: &[u8]) -> DiscoveryAccount {
    DiscoveryAccount {
        key: key(key_seed),
        devices: devices.iter().map(|&n| device(n)).collect(),
    }
}

fn from(last: u8) -> SocketAddr {
    SocketAddr::from(([192, 168, 1, last], 47_700))
}

fn core(own: u8, acct: DiscoveryAccount) -> Discovery {
    Discovery::new(
        device(own),
        4000 + u16::from(own),
        2_000,
        acct,
        SeedRng::from_seed([own; 32]),
        T0,
    )
}

// ---- Key and tokens ----

#[test]
fn key_is_derived_under_its_context_and_redacted() {
    let secret = [9; 32];
    assert_eq!(
        DiscoveryKey::derive(&secret).0,
        blake3::derive_key("roamsync 2026 lan discovery", &secret)
    );
    assert_ne!(DiscoveryKey::derive(&secret).0, secret);
    assert_eq!(format!("{:?}", key(1)), "DiscoveryKey(<redacted>)");
}

#[test]
fn token_rotates_per_epoch_and_differs_per_device_and_key() {
    let (k, d) = (key(1), device(1));
    let now = token(&k, &d, T0);
    // Constant within an epoch, different in the next and the previous.
    assert_eq!(token(&k, &d, T0 + TOKEN_ROTATE_MS / 4), now);
    assert_ne!(token(&k, &d, T0 + TOKEN_ROTATE_MS), now);
    assert_ne!(token(&k, &d, T0 - TOKEN_ROTATE_MS), now);
    assert_eq!(now, token_in_epoch(&k, &d, T0 / TOKEN_ROTATE_MS));
    // Per device and per key.
    assert_ne!(token(&k, &device(2), T0), now);
    assert_ne!(token(&key(2), &d, T0), now);
    // Exactly the first 16 bytes of keyed blake3 over epoch (u64 BE) || device id.
    let mut input = (T0 / TOKEN_ROTATE_MS).to_be_bytes().to_vec();
    input.extend_from_slice(d.as_bytes());
    assert_eq!(now.0[..], blake3::keyed_hash(&k.0, &input).as_bytes()[..16]);
}

#[test]
fn identify_accepts_the_previous_current_and_next_epoch_only() {
    let (k, a, b) = (key(1), device(1), device(2));
    let candidates = [a, b];
    let e = epoch(T0);
    for accepted in [e - 1, e, e + 1] {
        let t = token_in_epoch(&k, &b, accepted);
        assert_eq!(
            identify(&k, &candidates, &a, T0, &t),
            Some(b),
            "epoch {accepted}"
        );
    }
    for refused in [e - 2, e + 2, 0] {
        let t = token_in_epoch(&k, &b, refused);
        assert_eq!(
            identify(&k, &candidates, &a, T0, &t),
            None,
            "epoch {refused}"
        );
    }
    // At epoch 0 there is no previous epoch, and nothing underflows.
    let t = token_in_epoch(&k, &b, 0);
    assert_eq!(identify(&k, &candidates, &a, 0, &t), Some(b));
}

#[test]
fn identify_refuses_other_keys_own_device_and_garbage() {
    let (k, a, b) = (key(1), device(1), device(2));
    let candidates = [a, b];
    let t = token(&k, &b, T0);
    // Another account's key.
    assert_eq!(identify(&key(2), &candidates, &a, T0, &t), None);
    // The device's own token, heard through multicast loopback.
    assert_eq!(identify(&k, &candidates, &b, T0, &t), None);
    // A device not in the list.
    assert_eq!(identify(&k, &[a], &a, T0, &t), None);
    // Random bytes.
    assert_eq!(identify(&k, &candidates, &a, T0, &Token([0xa5; 16])), None);
}

// ---- The packet ----

#[test]
fn packet_layout_is_magic_version_token_port() {
    let packet = Announcement {
        token: Token([7; 16]),
        quic_port: 0x1234,
    }
    .encode();
    let mut expected = b"RSDC".to_vec();
    expected.push(1);
    expected.extend_from_slice(&[7; 16]);
    expected.extend_from_slice(&[0x12, 0x34]);
    assert_eq!(packet, expected);
    assert_eq!(packet.len(), PACKET_LEN);
}

#[test]
fn decode_refuses_wrong_magic_version_length_and_port() {
    let good = Announcement {
        token: Token([7; 16]),
        quic_port: 4433,
    }
    .encode();
    assert_eq!(
        Announcement::decode(&good).ok(),
        Some(Announcement {
            token: Token([7; 16]),
            quic_port: 4433
        })
    );

    let mut magic = good.clone();
    magic[0] = b'X';
    assert!(matches!(
        Announcement::decode(&magic),
        Err(DiscoveryError::WrongMagic { found }) if found == *b"XSDC"
    ));

    let mut version = good.clone();
    version[4] = 2;
    assert!(matches!(
        Announcement::decode(&version),
        Err(DiscoveryError::UnsupportedVersion {
            found: 2,
            supported: 1
        })
    ));
    // A later version may be longer: it is refused as a version, not a length.
    version.push(0);
    assert!(matches!(
        Announcement::decode(&version),
        Err(DiscoveryError::UnsupportedVersion { found: 2, .. })
    ));

    for len in [0, 3, 4, 5, PACKET_LEN - 1] {
        assert!(
            matches!(
                Announcement::decode(&good[..len]),
                Err(DiscoveryError::WrongLength { len: l, expected: PACKET_LEN }) if l == len
            ),
            "length {len}"
        );
    }
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(
        Announcement::decode(&long),
        Err(DiscoveryError::WrongLength { len, expected: PACKET_LEN }) if len == PACKET_LEN + 1
    ));

    let mut zero = good;
    zero[PACKET_LEN - 2..].copy_from_slice(&[0, 0]);
    assert!(matches!(
        Announcement::decode(&zero),
        Err(DiscoveryError::ZeroPort)
    ));
}

#[test]
fn packets_reveal_neither_account_nor_device() {
    let secret = [0x42; 32];
    let account_id = AccountId::from_bytes(*blake3::hash(&secret).as_bytes());
    let k = DiscoveryKey::derive(&secret);
    let mut seen = Vec::new();
    for n in 1..=8u8 {
        let d = device(n);
        let mut state = Discovery::new(
            d,
            4433,
            2_000,
            DiscoveryAccount {
                key: k.clone(),
                devices: vec![d],
            },
            SeedRng::from_seed([n; 32]),
            T0,
        );
        for e in 0..4 {
            let packet = state
                .poll_announcement(T0 + e * TOKEN_ROTATE_MS)
                .expect("due");
            // No 4-byte window of any id or secret appears in the packet.
            for secretish in [&d.as_bytes()[..], account_id.as_bytes(), &secret, &k.0] {
                for window in secretish.windows(4) {
                    assert!(
                        !packet.windows(4).any(|w| w == window),
                        "packet {packet:02x?} contains {window:02x?}"
                    );
                }
            }
            seen.push(packet);
        }
    }
    // Every device and epoch announces another token: an outsider cannot link them.
    let tokens: std::collections::HashSet<_> = seen.iter().map(|p| p[5..21].to_vec()).collect();
    assert_eq!(tokens.len(), seen.len());
}

proptest! {
    #[test]
    fn packet_round_trips(token: [u8; 16], quic_port in 1..=u16::MAX) {
        let a = Announcement { token: Token(token), quic_port };
        let packet = a.encode();
        prop_assert_eq!(packet.len(), PACKET_LEN);
        prop_assert_eq!(Announcement::decode(&packet).ok(), Some(a));
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = Announcement::decode(&bytes);
        let mut state = core(1, account(1, &[1, 2]));
        let _ = state.handle_packet(from(9), &bytes, T0);
    }

    #[test]
    fn mutated_packets_never_panic(token: [u8; 16], at in 0..PACKET_LEN, byte: u8, cut in 0..=PACKET_LEN) {
        let mut packet = Announcement { token: Token(token), quic_port: 9 }.encode();
        packet[at] = byte;
        packet.truncate(cut);
        let mut state = core(1, account(1, &[1, 2]));
        let _ = state.handle_packet(from(9), &packet, T0);
    }

    #[test]
    fn the_token_table_agrees_with_identify(
        key_seed in 1..4u8,
        announcer in 1..6u8,
        announced_at in 0..(4 * TOKEN_ROTATE_MS),
        heard_after in 0..(3 * TOKEN_ROTATE_MS),
    ) {
        let k = key(key_seed);
        let devices: Vec<DeviceId> = (1..=4).map(device).collect();
        let acct = DiscoveryAccount { key: key(1), devices: devices.clone() };
        let t = token(&k, &device(announcer), T0 + announced_at);
        let heard = T0 + announced_at + heard_after;
        let mut table = TokenTable::default();
        prop_assert_eq!(
            table.lookup(&acct, &device(1), heard, &t),
            identify(&acct.key, &devices, &device(1), heard, &t)
        );
    }
}

// ---- The sans-IO core ----

#[test]
fn announcements_follow_the_interval_with_bounded_jitter() {
    let mut state = core(1, account(1, &[1, 2]));
    let interval = state.interval_ms();
    let first = state
        .poll_announcement(T0)
        .expect("the first is due at once");
    assert_eq!(Announcement::decode(&first).expect("valid").quic_port, 4001);
    assert_eq!(state.poll_announcement(T0), None);
    let mut now = T0;
    let mut gaps = std::collections::HashSet::new();
    for _ in 0..50 {
        let next = state.poll_timeout();
        let gap = next - now;
        assert!(gap <= interval && gap >= interval - interval / ANNOUNCE_JITTER_DIVISOR);
        gaps.insert(gap);
        assert_eq!(state.poll_announcement(next - 1), None);
        assert!(state.poll_announcement(next).is_some());
        now = next;
    }
    assert!(gaps.len() > 10, "the jitter varies: {gaps:?}");
    // Too short an interval is raised to the minimum.
    let fast = Discovery::new(
        device(1),
        1,
        0,
        account(1, &[1]),
        SeedRng::from_seed([0; 32]),
        T0,
    );
    assert_eq!(fast.interval_ms(), MIN_ANNOUNCE_INTERVAL_MS);
}

#[test]
fn a_device_is_reported_once_per_interval_and_address() {
    let mut a = core(1, account(1, &[1, 2]));
    let mut b = core(2, account(1, &[1, 2]));
    let packet = b.poll_announcement(T0).expect("due");
    let interval = a.interval_ms();
    let found = Discovered {
        device: device(2),
        addr: SocketAddr::new(from(2).ip(), 4002),
    };
    assert_eq!(
        a.handle_packet(from(2), &packet, T0).ok(),
        Some(Some(found))
    );
    assert_eq!(a.handle_packet(from(2), &packet, T0 + 1).ok(), Some(None));
    assert_eq!(
        a.handle_packet(from(2), &packet, T0 + interval - 1).ok(),
        Some(None)
    );
    assert_eq!(
        a.handle_packet(from(2), &packet, T0 + interval).ok(),
        Some(Some(found))
    );
    // Another address is another report, up to MAX_ADDRS_PER_DEVICE per interval.
    let later = T0 + 2 * interval;
    let reported = (10..20)
        .filter(|&n| {
            a.handle_packet(from(n), &packet, later)
                .expect("valid")
                .is_some()
        })
        .count();
    assert_eq!(reported, MAX_ADDRS_PER_DEVICE);
    // A wall clock set back does not silence a device for long.
    assert!(
        a.handle_packet(from(2), &packet, T0)
            .expect("valid")
            .is_some()
    );
}

#[test]
fn own_and_other_accounts_announcements_are_not_reported() {
    let mut a = core(1, account(1, &[1, 2]));
    let own = a.poll_announcement(T0).expect("due");
    assert_eq!(a.handle_packet(from(1), &own, T0).ok(), Some(None));
    let mut stranger = core(2, account(2, &[1, 2]));
    let theirs = stranger.poll_announcement(T0).expect("due");
    assert_eq!(a.handle_packet(from(2), &theirs, T0).ok(), Some(None));
    assert!(matches!(
        a.handle_packet(from(2), b"hello", T0),
        Err(DiscoveryError::WrongMagic { found }) if found == *b"hell"
    ));
    assert!(matches!(
        a.handle_packet(from(2), b"RSD", T0),
        Err(DiscoveryError::WrongLength { len: 3, .. })
    ));
}

#[test]
fn account_changes_take_effect_at_once() {
    let mut a = core(1, account(1, &[1]));
    let mut b = core(2, account(1, &[1, 2]));
    let packet = b.poll_announcement(T0).expect("due");
    // Not yet in A's device list.
    assert_eq!(a.handle_packet(from(2), &packet, T0).ok(), Some(None));
    // Linked.
    a.handle_account(account(1, &[1, 2]));
    assert!(
        a.handle_packet(from(2), &packet, T0)
            .expect("valid")
            .is_some()
    );
    // Revoked, then linked again: it was forgotten, so it is reported again at once.
    a.handle_account(account(1, &[1]));
    assert_eq!(a.handle_packet(from(2), &packet, T0 + 1).ok(), Some(None));
    a.handle_account(account(1, &[1, 2]));
    assert!(
        a.handle_packet(from(2), &packet, T0 + 2)
            .expect("valid")
            .is_some()
    );
    // A new key: B's old-key announcements no longer match, and A announces under the new key.
    a.handle_account(account(3, &[1, 2]));
    assert_eq!(a.handle_packet(from(3), &packet, T0 + 3).ok(), Some(None));
    let mine = a.poll_announcement(T0 + 3).expect("due");
    let t = Announcement::decode(&mine).expect("valid").token;
    assert_eq!(
        identify(&key(3), &[device(1)], &device(2), T0 + 3, &t),
        Some(device(1))
    );
}

// ---- Real sockets ----

/// A group and port of this process alone, so that tests running at the same time (in this
/// process or another) do not hear each other. Ports stay below the usual ephemeral range.
fn test_group(offset: u16) -> SocketAddrV4 {
    let pid = std::process::id();
    let [_, _, hi, lo] = pid.to_be_bytes();
    let slot = u16::try_from(pid % 750).expect("below 750");
    SocketAddrV4::new(Ipv4Addr::new(239, 255, hi, lo), 20_000 + slot * 16 + offset)
}

fn loopback_config(group: SocketAddrV4) -> DiscoveryConfig {
    DiscoveryConfig {
        enabled: true,
        group,
        interface: Ipv4Addr::LOCALHOST,
        interval_ms: TEST_INTERVAL_MS,
    }
}

/// A running discovery task and what it finds.
struct Node {
    _handle: DiscoveryHandle,
    account: watch::Sender<DiscoveryAccount>,
    found: mpsc::UnboundedReceiver<Discovered>,
}

fn node(group: SocketAddrV4, own: u8, acct: DiscoveryAccount) -> Node {
    let (account, account_rx) = watch::channel(acct);
    let (found_tx, found) = mpsc::unbounded_channel();
    let handle = spawn_discovery(
        loopback_config(group),
        device(own),
        5000 + u16::from(own),
        account_rx,
        found_tx,
    )
    .expect("discovery starts");
    assert!(handle.is_running());
    Node {
        _handle: handle,
        account,
        found,
    }
}

/// Waits for `device` to be reported; every report on the way must be one of `allowed`.
async fn find(
    found: &mut mpsc::UnboundedReceiver<Discovered>,
    device: DeviceId,
    allowed: &[DeviceId],
) -> Discovered {
    tokio::time::timeout(FIND_TIMEOUT, async {
        loop {
            let d = found.recv().await.expect("task running");
            assert!(allowed.contains(&d.device), "unexpected report {d:?}");
            if d.device == device {
                return d;
            }
        }
    })
    .await
    .expect("found in time")
}

#[tokio::test]
async fn two_devices_of_one_account_find_each_other_and_another_account_finds_nobody() {
    let group = test_group(0);
    let mut a = node(group, 1, account(1, &[1, 2, 3]));
    let mut b = node(group, 2, account(1, &[1, 2, 3]));
    // Same device list, another key: it hears both and recognises neither.
    let mut c = node(group, 3, account(2, &[1, 2, 3]));

    let b_seen = find(&mut a.found, device(2), &[device(2)]).await;
    assert_eq!(b_seen.addr, SocketAddr::from(([127, 0, 0, 1], 5002)));
    let a_seen = find(&mut b.found, device(1), &[device(1)]).await;
    assert_eq!(a_seen.addr, SocketAddr::from(([127, 0, 0, 1], 5001)));

    tokio::time::sleep(QUIET_WINDOW).await;
    assert!(matches!(
        c.found.try_recv(),
        Err(mpsc::error::TryRecvError::Empty)
    ));
    // At most one report per interval: about ten in the window, not one per packet.
    let mut reports = 0;
    while let Ok(d) = a.found.try_recv() {
        assert_eq!(d.device, device(2));
        reports += 1;
    }
    let window_intervals = QUIET_WINDOW.as_millis() / u128::from(TEST_INTERVAL_MS);
    assert!(
        reports <= window_intervals as usize + 2,
        "{reports} reports"
    );
}

#[tokio::test]
async fn a_device_linked_later_is_found() {
    let group = test_group(1);
    let mut a = node(group, 1, account(1, &[1]));
    let _b = node(group, 2, account(1, &[1, 2]));
    tokio::time::sleep(Duration::from_millis(4 * TEST_INTERVAL_MS)).await;
    assert!(a.found.try_recv().is_err(), "B is not in A's list yet");
    a.account.send_replace(account(1, &[1, 2]));
    find(&mut a.found, device(2), &[device(2)]).await;
}

#[tokio::test]
async fn another_process_on_the_host_is_found() {
    let group = test_group(2);
    let mut a = node(group, 1, account(1, &[1, 2]));
    let exe = std::env::current_exe().expect("test binary");
    let mut child = std::process::Command::new(exe)
        .args([
            "net::discovery::tests::discovery_peer_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(PEER_ENV, group.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("child process starts");
    let found = find(&mut a.found, device(2), &[device(2)]).await;
    assert_eq!(found.addr.ip(), IpAddr::from(Ipv4Addr::LOCALHOST));
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("joined")
        .expect("child waited for");
    assert!(
        status.success(),
        "the child did not find this process: {status}"
    );
}

/// The other process of `another_process_on_the_host_is_found`: device 2, which must find
/// device 1. Run by that test only.
#[tokio::test]
#[ignore = "run as a child process by another_process_on_the_host_is_found"]
async fn discovery_peer_process() {
    let group: SocketAddrV4 = std::env::var(PEER_ENV)
        .expect("started by another_process_on_the_host_is_found")
        .parse()
        .expect("a group address");
    let mut b = node(group, 2, account(1, &[1, 2]));
    find(&mut b.found, device(1), &[device(1)]).await;
    // Keep announcing a little, so the parent hears this process even if it started late.
    tokio::time::sleep(Duration::from_millis(5 * TEST_INTERVAL_MS)).await;
}

#[tokio::test]
async fn a_disabled_config_spawns_nothing_and_a_unicast_group_is_refused() {
    let (_tx, rx) = watch::channel(account(1, &[1]));
    let (found, _found_rx) = mpsc::unbounded_channel();
    let disabled = DiscoveryConfig {
        enabled: false,
        ..DiscoveryConfig::default()
    };
    let handle = spawn_discovery(disabled, device(1), 1, rx.clone(), found.clone()).expect("ok");
    assert!(!handle.is_running());
    let unicast = DiscoveryConfig {
        group: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 47_700),
        ..DiscoveryConfig::default()
    };
    assert!(matches!(
        spawn_discovery(unicast, device(1), 1, rx, found),
        Err(DiscoveryError::NotMulticast { .. })
    ));
}

#[test]
fn spawning_outside_a_runtime_is_a_typed_error() {
    let (_tx, rx) = watch::channel(account(1, &[1]));
    let (found, _found_rx) = mpsc::unbounded_channel();
    assert!(matches!(
        spawn_discovery(loopback_config(test_group(3)), device(1), 1, rx, found),
        Err(DiscoveryError::NoRuntime)
    ));
}

#[test]
fn default_config_is_multicast_on_the_default_interface() {
    let config = DiscoveryConfig::default();
    assert!(config.enabled);
    assert!(config.group.ip().is_multicast());
    assert_eq!(
        config.group,
        SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, 77), 47_700)
    );
    assert!(config.interface.is_unspecified());
    assert_eq!(config.interval_ms, 2_000);
}
