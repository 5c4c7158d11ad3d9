//! The relay's protocol logic as a sans-IO state machine.
//!
//! [`RelayCore`] holds everything the relay decides with: the verified device log of every
//! account, every group's chain of signed membership updates, every document's group and last
//! sequence number, and the state of each connection (its device, the account it claimed, whether
//! it is authenticated, its subscriptions, its rate limiter), plus pairing rendezvous. It does no
//! IO: the shell feeds it [`Input`]s with the time (`now_ms`) and executes the [`Output`]s it
//! returns, in order.
//!
//! **Durability contract.** Store operations ([`Output::Persist`]'s op and [`Output::Append`])
//! must reach the store in the order they are emitted. The outputs inside a `Persist`'s `then`
//! are executed only once its op is durable: an answer (`Done`) never precedes the write it
//! confirms. Every other output is executed as soon as it is returned. Appends are answered from
//! [`Input::EnvelopeStored`], which the shell feeds back in the order the store committed them.
//!
//! The core's memory runs ahead of the disk by the writes in flight; a crash loses only writes
//! that were never confirmed, which their senders still hold and send again.
//!
//! ```
//! use roamsync::crypto::device_log::DeviceLog;
//! use roamsync::crypto::identity::DeviceSecret;
//! use roamsync::crypto::rng::SeedRng;
//! use roamsync::relay::core::{ConnId, Input, Output, RelayCore};
//! use roamsync::relay::limits::RelayLimits;
//! use roamsync::wire::message::Message;
//!
//! let phone = DeviceSecret::generate(&mut SeedRng::from_seed([1; 32]));
//! let log = DeviceLog::create(&phone, "phone", "android").unwrap();
//! let mut relay = RelayCore::new(RelayLimits::default());
//! let conn = ConnId(1);
//! relay.handle(Input::Connected { conn, device: phone.device_id() }, 0);
//! // Creating the account: the shell persists the entries, then sends `Done`.
//! let out = relay.handle(
//!     Input::Message {
//!         conn,
//!         msg: Message::LogAppend {
//!             req: 1,
//!             account: log.account(),
//!             first_seq: 0,
//!             entries: log.entries().to_vec(),
//!         },
//!     },
//!     0,
//! );
//! assert!(out.iter().any(|o| matches!(o, Output::Persist { then, .. }
//!     if matches!(then[0], Output::Send { msg: Message::Done { req: 1 }, .. }))));
//! // Not authenticated yet: the connection has not said which account it speaks for.
//! assert!(!relay.connection(conn).unwrap().authenticated);
//! ```

use std::collections::{BTreeSet, HashMap};

use crate::crypto::device_log::{DeviceLog, DeviceLogEntry, DeviceLogError, EntryAction};
use crate::crypto::group::{GroupError, GroupUpdate};
use crate::ids::{AccountId, DeviceId, DocId};
use crate::relay::limits::{RelayLimits, TokenBucket};
use crate::wire::frame::ErrorCode;
use crate::wire::message::{Message, RENDEZVOUS_LEN};

mod accounts;
mod authors;
mod docs;
mod error;
mod groups;
mod interface;
mod pairing;
mod snapshots;

pub use error::RequestError;
pub use interface::{
    AuthRefusal, CatchUpItem, ConnId, Input, Output, PersistOp, RelayEvent, StoreOutcome,
};

/// Counters, for monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Requests handled (including refused ones).
    pub requests: u64,
    /// Requests refused with `RATE_LIMITED` by the token bucket.
    pub rate_limited: u64,
    /// Error answers sent.
    pub errors: u64,
    /// Envelope pushes emitted.
    pub pushes: u64,
    /// Datagrams forwarded (each counted once, whatever the fan-out).
    pub datagrams_forwarded: u64,
    /// Datagrams dropped as invalid, unauthorised or over the rate.
    pub datagrams_dropped: u64,
    /// Inputs that named an unknown connection or append, or arrived out of order.
    pub unexpected_inputs: u64,
}

/// The state of a connection, as [`RelayCore::connection`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// The device (its TLS key).
    pub device: DeviceId,
    /// The account its `Hello` claimed, if any.
    pub account: Option<AccountId>,
    /// Whether the device is current in the relay's log of that account.
    pub authenticated: bool,
    /// Documents it subscribed to.
    pub subscriptions: usize,
}

/// What the relay's store holds, to start a core from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelaySnapshot {
    /// Each account's encoded device-log entries, in order.
    pub logs: Vec<(AccountId, Vec<Vec<u8>>)>,
    /// Each group's encoded updates, in version order.
    pub groups: Vec<(DocId, Vec<Vec<u8>>)>,
    /// Each document: `(doc, group, last_seq)`.
    pub docs: Vec<(DocId, DocId, u64)>,
    /// Stored envelope bytes per account.
    pub usage: Vec<(AccountId, u64)>,
}

/// Why a snapshot could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A stored device log does not decode or verify.
    #[error("stored device log of account {account}: {source}")]
    Log {
        /// The account.
        account: AccountId,
        /// What is wrong.
        #[source]
        source: DeviceLogError,
    },
    /// A stored group update does not decode or does not follow the one before.
    #[error("stored update {index} of group {group}: {source}")]
    Group {
        /// The group.
        group: DocId,
        /// Position of the update in the stored list.
        index: usize,
        /// What is wrong.
        #[source]
        source: GroupError,
    },
}

/// One connection.
#[derive(Debug)]
struct Conn {
    device: DeviceId,
    account: Option<AccountId>,
    authenticated: bool,
    /// Closed by the core; waiting for the shell's `Disconnected`. Nothing more is sent to it.
    closing: bool,
    subs: BTreeSet<DocId>,
    bucket: TokenBucket,
    /// Rendezvous this connection offered.
    offered: BTreeSet<[u8; RENDEZVOUS_LEN]>,
    /// Rendezvous this connection joined.
    joined: BTreeSet<[u8; RENDEZVOUS_LEN]>,
    new_accounts: u32,
    appends_in_flight: usize,
    append_bytes_in_flight: usize,
}

/// A group's chain of updates; never empty.
#[derive(Debug)]
struct GroupChain {
    updates: Vec<GroupUpdate>,
}

impl GroupChain {
    fn latest(&self) -> &GroupUpdate {
        // A chain is created with its version-0 update and only grows.
        &self.updates[self.updates.len() - 1]
    }

    /// Whether `account` is a member at any version, newest first.
    fn was_member(&self, account: &AccountId) -> bool {
        self.updates.iter().rev().any(|u| u.is_member(account))
    }
}

/// A document the relay stores envelopes of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DocState {
    group: DocId,
    last_seq: u64,
}

/// An append waiting for the store.
#[derive(Debug)]
struct PendingAppend {
    doc: DocId,
    account: AccountId,
    bytes: Vec<u8>,
}

/// A pairing rendezvous.
#[derive(Debug)]
struct Rendezvous {
    inviter: ConnId,
    joiner: Option<ConnId>,
    expires_ms: u64,
}

/// The relay's state machine. See the module documentation.
#[derive(Debug)]
pub struct RelayCore {
    limits: RelayLimits,
    accounts: HashMap<AccountId, DeviceLog>,
    /// The accounts whose log lists each device (added at some point, revoked or not). Logs
    /// only grow, so entries are only ever added.
    device_accounts: HashMap<DeviceId, BTreeSet<AccountId>>,
    groups: HashMap<DocId, GroupChain>,
    /// Groups each account is a member of (latest version).
    member_of: HashMap<AccountId, BTreeSet<DocId>>,
    docs: HashMap<DocId, DocState>,
    usage: HashMap<AccountId, u64>,
    conns: HashMap<ConnId, Conn>,
    /// Connections whose `Hello` claimed each account (authenticated or not), not closing.
    by_account: HashMap<AccountId, BTreeSet<ConnId>>,
    subscribers: HashMap<DocId, BTreeSet<ConnId>>,
    rendezvous: HashMap<[u8; RENDEZVOUS_LEN], Rendezvous>,
    pending: HashMap<(ConnId, u32), PendingAppend>,
    stats: RelayStats,
}

impl RelayCore {
    /// An empty relay.
    pub fn new(limits: RelayLimits) -> Self {
        Self {
            limits,
            accounts: HashMap::new(),
            device_accounts: HashMap::new(),
            groups: HashMap::new(),
            member_of: HashMap::new(),
            docs: HashMap::new(),
            usage: HashMap::new(),
            conns: HashMap::new(),
            by_account: HashMap::new(),
            subscribers: HashMap::new(),
            rendezvous: HashMap::new(),
            pending: HashMap::new(),
            stats: RelayStats::default(),
        }
    }

    /// A relay holding what its store holds. Device logs are verified again; group chains are
    /// decoded and checked to follow each other (their signatures were checked when posted).
    pub fn load(limits: RelayLimits, snapshot: RelaySnapshot) -> Result<Self, LoadError> {
        let mut core = Self::new(limits);
        for (account, encoded) in snapshot.logs {
            let log = encoded
                .iter()
                .map(|e| DeviceLogEntry::decode(e))
                .collect::<Result<Vec<_>, _>>()
                .and_then(|entries| DeviceLog::verify(&account, entries))
                .map_err(|source| LoadError::Log { account, source })?;
            core.index_devices(account, log.entries());
            core.accounts.insert(account, log);
        }
        for (group, encoded) in snapshot.groups {
            let mut updates: Vec<GroupUpdate> = Vec::with_capacity(encoded.len());
            for (index, bytes) in encoded.iter().enumerate() {
                let update = GroupUpdate::decode(bytes)
                    .and_then(|u| u.check_follows(updates.last()).map(|()| u))
                    .and_then(|u| {
                        if u.group == group {
                            Ok(u)
                        } else {
                            Err(GroupError::WrongGroup {
                                expected: group,
                                found: u.group,
                            })
                        }
                    })
                    .map_err(|source| LoadError::Group {
                        group,
                        index,
                        source,
                    })?;
                updates.push(update);
            }
            if let Some(latest) = updates.last() {
                for m in &latest.members {
                    core.member_of.entry(*m).or_default().insert(group);
                }
                core.groups.insert(group, GroupChain { updates });
            }
        }
        for (doc, group, last_seq) in snapshot.docs {
            core.docs.insert(doc, DocState { group, last_seq });
        }
        core.usage.extend(snapshot.usage);
        Ok(core)
    }

    /// The limits in force.
    pub fn limits(&self) -> &RelayLimits {
        &self.limits
    }

    /// Counters since start.
    pub fn stats(&self) -> RelayStats {
        self.stats
    }

    /// A connection's state, if it is open.
    pub fn connection(&self, conn: ConnId) -> Option<ConnInfo> {
        self.conns.get(&conn).map(|c| ConnInfo {
            device: c.device,
            account: c.account,
            authenticated: c.authenticated,
            subscriptions: c.subs.len(),
        })
    }

    /// Stored (and in-flight) envelope bytes charged to `account`.
    pub fn usage(&self, account: &AccountId) -> u64 {
        self.usage.get(account).copied().unwrap_or(0)
    }

    /// Handles one input at `now_ms` and returns what to do, in order.
    pub fn handle(&mut self, input: Input, now_ms: u64) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Connected { conn, device } => {
                self.handle_connected(conn, device, now_ms, &mut out)
            }
            Input::Message { conn, msg } => self.handle_message(conn, msg, now_ms, &mut out),
            Input::Datagram { conn, bytes } => self.handle_datagram(conn, bytes, now_ms, &mut out),
            Input::Disconnected { conn } => self.handle_disconnected(conn),
            Input::EnvelopeStored {
                conn,
                req,
                doc,
                outcome,
            } => self.handle_envelope_stored(conn, req, doc, outcome, &mut out),
        }
        out
    }

    fn handle_connected(
        &mut self,
        conn: ConnId,
        device: DeviceId,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        if self.conns.contains_key(&conn) {
            self.stats.unexpected_inputs += 1;
            return;
        }
        if self.conns.len() >= self.limits.max_connections {
            out.push(Output::Close {
                conn,
                code: ErrorCode::RATE_LIMITED,
                reason: format!(
                    "the relay serves at most {} connections; retry later",
                    self.limits.max_connections
                ),
            });
            return;
        }
        self.conns.insert(
            conn,
            Conn {
                device,
                account: None,
                authenticated: false,
                closing: false,
                subs: BTreeSet::new(),
                bucket: TokenBucket::full(&self.limits, now_ms),
                offered: BTreeSet::new(),
                joined: BTreeSet::new(),
                new_accounts: 0,
                appends_in_flight: 0,
                append_bytes_in_flight: 0,
            },
        );
    }

    fn handle_disconnected(&mut self, conn: ConnId) {
        if !self.conns.contains_key(&conn) {
            self.stats.unexpected_inputs += 1;
            return;
        }
        self.detach(conn);
        self.conns.remove(&conn);
    }

    fn handle_message(&mut self, conn: ConnId, msg: Message, now_ms: u64, out: &mut Vec<Output>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            self.stats.unexpected_inputs += 1;
            return;
        };
        if c.closing {
            return;
        }
        self.stats.requests += 1;
        let req = msg.req();
        if !c.bucket.try_take(&self.limits, now_ms) {
            self.stats.rate_limited += 1;
            let err = RequestError::RateLimited {
                rate_per_s: self.limits.rate_per_s,
                burst: self.limits.burst,
            };
            self.refuse(conn, req, &err, out);
            return;
        }
        let result = match msg {
            Message::Hello { req, account, .. } => self.handle_hello(conn, req, account, out),
            Message::LogAppend {
                req,
                account,
                first_seq,
                entries,
            } => self.handle_log_append(conn, req, account, first_seq, entries, out),
            Message::FetchLog {
                req,
                account,
                from_seq,
            } => {
                self.handle_fetch_log(conn, req, account, from_seq, out);
                Ok(())
            }
            Message::PostGroup { req, update } => self.handle_post_group(conn, req, update, out),
            Message::FetchGroup {
                req,
                group,
                from_version,
            } => self.handle_fetch_group(conn, req, group, from_version, out),
            Message::Subscribe { req, items } => self.handle_subscribe(conn, req, items, out),
            Message::Append {
                req,
                group,
                envelope,
            } => self.handle_append(conn, req, group, envelope, out),
            Message::Fetch {
                req,
                doc,
                after_seq,
                limit,
            } => self.handle_fetch(conn, req, doc, after_seq, limit, out),
            Message::PutSnapshot {
                req,
                group,
                envelope,
            } => self.handle_put_snapshot(conn, req, group, envelope, out),
            Message::PairOffer { req, rendezvous } => {
                self.handle_pair_offer(conn, req, rendezvous, now_ms, out)
            }
            Message::PairJoin {
                req,
                rendezvous,
                request,
            } => self.handle_pair_join(conn, req, rendezvous, request, now_ms, out),
            Message::PairAnswer {
                req,
                rendezvous,
                response,
            } => self.handle_pair_answer(conn, req, rendezvous, response, now_ms, out),
            // A device reporting an error needs no answer (answering could loop).
            Message::Error { .. } => Ok(()),
            other => Err(RequestError::NotARequest {
                what: message_name(&other),
            }),
        };
        if let Err(err) = result {
            self.refuse(conn, req, &err, out);
        }
    }

    /// Answers `req` with an error.
    fn refuse(&mut self, conn: ConnId, req: u32, err: &RequestError, out: &mut Vec<Output>) {
        self.stats.errors += 1;
        out.push(Output::Send {
            conn,
            msg: err.to_message(req),
        });
    }

    /// The device and account of an authenticated connection.
    fn authenticated(
        &self,
        conn: ConnId,
        what: &'static str,
    ) -> Result<(DeviceId, AccountId), RequestError> {
        match self.conns.get(&conn) {
            Some(Conn {
                device,
                account: Some(account),
                authenticated: true,
                closing: false,
                ..
            }) => Ok((*device, *account)),
            _ => Err(RequestError::NotAuthenticated { what }),
        }
    }

    /// Whether `account` is a member of `group` at its latest version.
    fn is_member(&self, group: &DocId, account: &AccountId) -> bool {
        self.groups
            .get(group)
            .is_some_and(|g| g.latest().is_member(account))
    }

    /// Checks that `account` may use `group`.
    fn check_member(&self, group: &DocId, account: &AccountId) -> Result<(), RequestError> {
        if self.is_member(group, account) {
            Ok(())
        } else {
            Err(RequestError::NotMember {
                account: *account,
                group: *group,
            })
        }
    }

    /// Records that `account`'s log lists the devices `entries` introduce.
    fn index_devices(&mut self, account: AccountId, entries: &[DeviceLogEntry]) {
        for entry in entries {
            if let EntryAction::Genesis(info) | EntryAction::Add(info) = &entry.action {
                self.device_accounts
                    .entry(info.keys.device)
                    .or_default()
                    .insert(account);
            }
        }
    }

    /// [`Self::authenticated`] for a request whose envelope must be the connection's device's
    /// own (`PutSnapshot`: a snapshot asks its readers to trust its maker, so nobody else may
    /// upload it).
    fn authenticated_author(
        &self,
        conn: ConnId,
        what: &'static str,
        author: DeviceId,
    ) -> Result<(DeviceId, AccountId), RequestError> {
        let (device, account) = self.authenticated(conn, what)?;
        if author != device {
            return Err(RequestError::AuthorMismatch { author, device });
        }
        Ok((device, account))
    }

    /// Authenticated, open connections of `account`.
    fn authenticated_conns(&self, account: &AccountId) -> impl Iterator<Item = ConnId> + '_ {
        self.by_account
            .get(account)
            .into_iter()
            .flatten()
            .copied()
            .filter(|id| {
                self.conns
                    .get(id)
                    .is_some_and(|c| c.authenticated && !c.closing)
            })
    }

    /// Closes `conn` now: it leaves every index, and nothing more is sent to it but the
    /// returned `Error` and `Close`.
    fn close_outputs(&mut self, conn: ConnId, code: ErrorCode, reason: String) -> [Output; 2] {
        self.detach(conn);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.closing = true;
            c.authenticated = false;
        }
        self.stats.errors += 1;
        [
            Output::Send {
                conn,
                msg: Message::Error {
                    req: 0,
                    code,
                    text: reason.clone(),
                },
            },
            Output::Close { conn, code, reason },
        ]
    }

    /// Removes `conn` from the account index, its subscriptions and its pairings.
    fn detach(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let account = c.account;
        let subs = std::mem::take(&mut c.subs);
        let offered = std::mem::take(&mut c.offered);
        let joined = std::mem::take(&mut c.joined);
        if let Some(account) = account {
            remove_from_index(&mut self.by_account, &account, &conn);
        }
        for doc in subs {
            remove_from_index(&mut self.subscribers, &doc, &conn);
        }
        for id in offered {
            self.remove_rendezvous(&id);
        }
        for id in joined {
            if let Some(r) = self.rendezvous.get_mut(&id) {
                if r.joiner == Some(conn) {
                    r.joiner = None;
                }
            }
        }
    }
}

/// Removes `value` from the set under `key`, dropping the set when it empties.
fn remove_from_index<K: std::hash::Hash + Eq, V: Ord>(
    index: &mut HashMap<K, BTreeSet<V>>,
    key: &K,
    value: &V,
) {
    if let Some(set) = index.get_mut(key) {
        set.remove(value);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

/// The name of a message type, for error texts.
fn message_name(msg: &Message) -> &'static str {
    match msg {
        Message::Hello { .. } => "Hello",
        Message::LogAppend { .. } => "LogAppend",
        Message::FetchLog { .. } => "FetchLog",
        Message::PostGroup { .. } => "PostGroup",
        Message::FetchGroup { .. } => "FetchGroup",
        Message::Subscribe { .. } => "Subscribe",
        Message::Append { .. } => "Append",
        Message::Fetch { .. } => "Fetch",
        Message::PairOffer { .. } => "PairOffer",
        Message::PairJoin { .. } => "PairJoin",
        Message::PairAnswer { .. } => "PairAnswer",
        Message::PutSnapshot { .. } => "PutSnapshot",
        Message::Snapshot { .. } => "Snapshot",
        Message::HelloOk { .. } => "HelloOk",
        Message::Done { .. } => "Done",
        Message::Ack { .. } => "Ack",
        Message::Envelopes { .. } => "Envelopes",
        Message::LogEntries { .. } => "LogEntries",
        Message::GroupUpdates { .. } => "GroupUpdates",
        Message::PairRequested { .. } => "PairRequested",
        Message::PairAnswered { .. } => "PairAnswered",
        Message::PeerHello { .. } => "PeerHello",
        Message::PeerSync { .. } => "PeerSync",
        Message::Error { .. } => "Error",
    }
}

#[cfg(test)]
mod tests;
