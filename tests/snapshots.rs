//! Snapshots end to end on loopback: devices upload snapshots of their documents to a real relay,
//! and a newly linked device catches up from them (or without them, or despite a lying one).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use roamsync::crypto::device_log::DeviceLog;
use roamsync::crypto::envelope::{EnvelopeHeader, SealedEnvelope};
use roamsync::crypto::identity::DeviceSecret;
use roamsync::crypto::keys::{DocKey, KeyEpoch, KeySource};
use roamsync::engine::{Engine, SNAPSHOT_AFTER_CHANGES};
use roamsync::ids::{AccountId, ConversationId, DocAddr, DocId};
use roamsync::model::Message as ChatMessage;
use roamsync::net::PeerAddr;
use roamsync::relay::store::{RelayReader, StoredSnapshot};
use roamsync::store::{Durability, StorageKey, Store};
use roamsync::wire::message::{Message, Subscription};
use support::raw::Client;
use support::*;

fn segment(c: &ConversationId) -> DocId {
    DocAddr::Segment(*c, 0).doc_id()
}

fn meta(c: &ConversationId) -> DocId {
    DocAddr::Meta(*c).doc_id()
}

async fn send_many(engine: &Engine, c: &ConversationId, n: usize, tag: &str) {
    for i in 0..n {
        engine.send(c, &format!("{tag} message {i}")).await.unwrap();
    }
}

/// The relay's snapshot of `doc` for `account`, waiting until it has one covering more than
/// `after`.
/// Device "a1" of a new account writes 300 messages in a conversation, waits for its segment's
/// snapshot on the relay, writes `more` after it and shuts down. Returns the account, the
/// conversation, that snapshot and the segment's last sequence number on the relay.
async fn snapshot_then_more(
    dir: &Path,
    addr: &PeerAddr,
    more: usize,
    label: &str,
) -> (AccountId, ConversationId, StoredSnapshot, u64) {
    let a1 = account(dir, "a1", addr).await;
    let me = a1.account();
    let chat = a1.create_conversation("chat", &[]).await.unwrap();
    send_many(&a1, &chat, 300, "before").await;
    until_uploaded(&a1).await;
    let snapshot = until_snapshot(dir, segment(&chat), me, 0).await;
    send_many(&a1, &chat, more, label).await;
    until_uploaded(&a1).await;
    let end = last_seq(dir, segment(&chat));
    a1.shutdown().await;
    (me, chat, snapshot, end)
}

async fn until_snapshot(dir: &Path, doc: DocId, account: AccountId, after: u64) -> StoredSnapshot {
    let deadline = Instant::now() + WAIT;
    let reader = RelayReader::open(&dir.join("relay")).unwrap();
    loop {
        if let Some(s) = reader.snapshot(&doc, &account).unwrap() {
            if s.covers > after {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot of {doc} on the relay"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The relay's last sequence number of `doc`.
fn last_seq(dir: &Path, doc: DocId) -> u64 {
    let reader = RelayReader::open(&dir.join("relay")).unwrap();
    reader
        .docs()
        .unwrap()
        .into_iter()
        .find(|d| d.doc == doc)
        .map_or(0, |d| d.last_seq)
}

/// Every message of a conversation, oldest first.
async fn full_history(engine: &Engine, c: &ConversationId) -> Vec<ChatMessage> {
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let page = engine.history(c, before, 500).await.unwrap();
        let mut msgs = page.messages;
        msgs.extend(out);
        out = msgs;
        match page.next {
            Some(n) => before = Some(n),
            None => return out,
        }
    }
}

/// A stopped device's identity and keys, read from its store.
struct Stored {
    secret: DeviceSecret,
    log: DeviceLog,
    keys: Vec<(DocId, KeyEpoch, DocKey)>,
}

fn stored(dir: &Path, name: &str, account: AccountId) -> Stored {
    let key = StorageKey::from_bytes(*blake3::hash(name.as_bytes()).as_bytes());
    let store = Store::open(&dir.join(format!("{name}.db")), &key, Durability::Full).unwrap();
    let entries = store.device_log().unwrap().unwrap();
    Stored {
        secret: store.device_secret().unwrap().unwrap(),
        log: DeviceLog::verify(&account, entries).unwrap(),
        keys: store.doc_keys().unwrap(),
    }
}

/// The keys of one group, for envelopes of any of its documents.
struct GroupKeys<'a>(&'a Stored, DocId);

impl KeySource for GroupKeys<'_> {
    fn doc_key(&self, _doc: &DocId, epoch: KeyEpoch) -> Option<&DocKey> {
        self.0
            .keys
            .iter()
            .find(|(d, e, _)| *d == self.1 && *e == epoch)
            .map(|(_, _, k)| k)
    }
}

/// What a new device of the account receives in a catch-up of `items` from cursor 0.
#[derive(Debug, Default)]
struct CatchUp {
    /// Bytes on the wire (message frames, headers included).
    bytes: usize,
    /// Snapshots received.
    snapshots: usize,
    /// Bytes of the snapshot messages.
    snapshot_bytes: usize,
    /// Envelopes received.
    envelopes: usize,
}

async fn catch_up_bytes(relay: &PeerAddr, who: Stored, items: Vec<Subscription>) -> CatchUp {
    let mut client = Client::connect_as(relay, who.secret, who.log).await;
    client.hello(1).await;
    client.send(Message::Subscribe { req: 2, items }).await;
    let mut out = CatchUp::default();
    // Where each document's catch-up stands: after a snapshot, what it covers.
    let mut at: std::collections::HashMap<DocId, u64> = std::collections::HashMap::new();
    loop {
        let msg = client.next().await;
        let len = msg.encode().len() + 6;
        out.bytes += len;
        match &msg {
            Message::Done { req: 2 } => return out,
            Message::Snapshot { doc, envelope, .. } => {
                out.snapshots += 1;
                out.snapshot_bytes += len;
                let header = SealedEnvelope::decode(envelope).unwrap().header;
                assert_eq!(header.first_seq, header.last_seq);
                assert!(!at.contains_key(doc), "the snapshot comes first");
                at.insert(*doc, header.first_seq);
            }
            Message::Envelopes { doc, items, .. } => {
                out.envelopes += items.len();
                // The envelopes continue from the cursor, or from what the snapshot covers.
                let from = at.entry(*doc).or_insert(0);
                if let Some(first) = items.first() {
                    assert_eq!(first.prev, *from, "{doc}");
                }
                if let Some(last) = items.last() {
                    *from = last.seq;
                }
            }
            Message::Error { .. } => panic!("{msg:?}"),
            _ => {}
        }
    }
}

/// Every document of `conversations` and the account document, from cursor 0.
fn all_docs(
    account: AccountId,
    conversations: &[ConversationId],
    snapshot: bool,
) -> Vec<Subscription> {
    let own = DocAddr::Account(account).doc_id();
    let mut items = vec![Subscription {
        doc: own,
        group: own,
        after_seq: 0,
        snapshot,
    }];
    for c in conversations {
        for doc in [meta(c), segment(c)] {
            items.push(Subscription {
                doc,
                group: meta(c),
                after_seq: 0,
                snapshot,
            });
        }
    }
    items
}

/// Seals `honest`'s plaintext, passed through `change`, again as the stopped device `name` of
/// `account`, claiming it covers `covers`, and puts it on the relay for the account.
async fn put_forged_snapshot(
    dir: &Path,
    relay: &PeerAddr,
    (name, account): (&str, AccountId),
    chat: &ConversationId,
    honest: &StoredSnapshot,
    covers: u64,
    change: impl FnOnce(&mut Vec<u8>),
) {
    let who = stored(dir, name, account);
    let old = SealedEnvelope::decode(&honest.bytes).unwrap();
    let keys = GroupKeys(&who, meta(chat));
    let mut plaintext = old
        .open(&segment(chat), &keys, |_: &_, _: &_, _: KeyEpoch| true)
        .unwrap()
        .plaintext;
    change(&mut plaintext);
    let key = keys
        .doc_key(&segment(chat), old.header.epoch)
        .unwrap()
        .clone();
    let header = EnvelopeHeader {
        first_seq: covers,
        last_seq: covers,
        ..old.header
    };
    let forged = SealedEnvelope::seal(&who.secret, &key, header, &plaintext).unwrap();
    let mut client = Client::connect_as(relay, who.secret, who.log).await;
    client.hello(1).await;
    let answer = client
        .request(Message::PutSnapshot {
            req: 2,
            group: meta(chat),
            envelope: forged,
        })
        .await;
    assert_eq!(answer, Message::Done { req: 2 });
    let served = until_snapshot(dir, segment(chat), account, honest.covers).await;
    assert_eq!(served.covers, covers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_device_catches_up_from_snapshots_and_the_envelopes_after_them() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    let a1 = account(dir.path(), "a1", &addr).await;
    let me = a1.account();
    let chats = [
        a1.create_conversation("big", &[]).await.unwrap(),
        a1.create_conversation("medium", &[]).await.unwrap(),
        a1.create_conversation("small", &[]).await.unwrap(),
    ];
    send_many(&a1, &chats[0], 300, "big").await;
    send_many(&a1, &chats[1], 280, "medium").await;
    send_many(&a1, &chats[2], 50, "small").await;
    until_uploaded(&a1).await;
    // The two large segments get snapshots; the small one stays under the threshold.
    let big = until_snapshot(dir.path(), segment(&chats[0]), me, 0).await;
    until_snapshot(dir.path(), segment(&chats[1]), me, 0).await;
    // Many envelopes after the big one's snapshot, fewer than make a new one: a stale snapshot.
    send_many(&a1, &chats[0], 200, "later").await;
    until_uploaded(&a1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reader = RelayReader::open(&dir.path().join("relay")).unwrap();
    let now = reader.snapshot(&segment(&chats[0]), &me).unwrap().unwrap();
    assert_eq!(
        now.covers, big.covers,
        "no new snapshot under the threshold"
    );
    assert!(last_seq(dir.path(), segment(&chats[0])) > now.covers + 150);
    assert_eq!(reader.snapshot(&segment(&chats[2]), &me).unwrap(), None);
    assert!(a1.sync_status().await.unwrap().snapshots_made >= 2);

    // A new device reads every message of every conversation, as the old one shows them.
    let a2 = linked(dir.path(), "a2", &addr, &a1).await;
    for (c, n) in chats.iter().zip([500, 280, 50]) {
        until_listed(&a2, c).await;
        until_history(&a2, c, n).await;
        assert_eq!(full_history(&a2, c).await, full_history(&a1, c).await);
    }
    let status = a2.sync_status().await.unwrap();
    assert!(status.snapshots_taken >= 2, "{status:?}");
    assert_eq!(status.snapshots_distrusted, 0);

    // What a new device receives, with and without snapshots.
    let messages = 500 + 280 + 50;
    a1.shutdown().await;
    let with = catch_up_bytes(
        &addr,
        stored(dir.path(), "a1", me),
        all_docs(me, &chats, true),
    )
    .await;
    let without = catch_up_bytes(
        &addr,
        stored(dir.path(), "a1", me),
        all_docs(me, &chats, false),
    )
    .await;
    assert!(with.snapshots >= 2 && without.snapshots == 0);
    println!(
        "catch-up of {messages} messages in 3 conversations: {} B ({:.0} B/message) with \
         snapshots ({} snapshots of {} B, {} envelopes), {} B ({:.0} B/message, {} envelopes) \
         without",
        with.bytes,
        with.bytes as f64 / messages as f64,
        with.snapshots,
        with.snapshot_bytes,
        with.envelopes,
        without.bytes,
        without.bytes as f64 / messages as f64,
        without.envelopes,
    );
    // What the snapshots replace: the envelopes the catch-up without them has in excess.
    let covered = without.envelopes - with.envelopes;
    println!(
        "the snapshots stand for {covered} envelopes: {:.0} B per message instead of {:.0} B",
        with.snapshot_bytes as f64 / covered as f64,
        (without.bytes - (with.bytes - with.snapshot_bytes)) as f64 / covered as f64,
    );
    assert!(with.bytes < without.bytes);
    a2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_snapshots_on_the_relay_a_new_device_still_gets_everything() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    let mut cfg = config(dir.path(), "a1", &addr);
    cfg.snapshot_after_changes = None;
    let a1 = Engine::create_account(cfg, "a1").await.unwrap();
    until_live(&a1).await;
    let chat = a1.create_conversation("chat", &[]).await.unwrap();
    send_many(&a1, &chat, SNAPSHOT_AFTER_CHANGES as usize + 40, "plain").await;
    until_uploaded(&a1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reader = RelayReader::open(&dir.path().join("relay")).unwrap();
    assert_eq!(
        reader.snapshot(&segment(&chat), &a1.account()).unwrap(),
        None
    );
    let a2 = linked(dir.path(), "a2", &addr, &a1).await;
    until_listed(&a2, &chat).await;
    until_history(&a2, &chat, SNAPSHOT_AFTER_CHANGES as usize + 40).await;
    assert_eq!(
        full_history(&a2, &chat).await,
        full_history(&a1, &chat).await
    );
    assert_eq!(a2.sync_status().await.unwrap().snapshots_taken, 0);
    a2.shutdown().await;
    a1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_leaves_changes_out_is_detected_and_the_document_fetched_whole() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    // Forty more after the snapshot, under the threshold: the relay's snapshot lacks them.
    let (me, chat, honest, end) = snapshot_then_more(dir.path(), &addr, 40, "left out").await;
    assert!(end > honest.covers);

    // A real device of the account seals the old state again, claiming it covers everything.
    let forger = ("a1", me);
    put_forged_snapshot(dir.path(), &addr, forger, &chat, &honest, end, |_| {}).await;

    // The old device writes on: its next change depends on what the snapshot left out.
    let a1 = Engine::open(config(dir.path(), "a1", &addr)).await.unwrap();
    until_live(&a1).await;
    a1.send(&chat, "after the lie").await.unwrap();
    until_uploaded(&a1).await;

    let a2 = linked(dir.path(), "a2", &addr, &a1).await;
    until_listed(&a2, &chat).await;
    until_history(&a2, &chat, 341).await;
    assert_eq!(
        full_history(&a2, &chat).await,
        full_history(&a1, &chat).await
    );
    let status = a2.sync_status().await.unwrap();
    assert!(status.snapshots_distrusted >= 1, "{status:?}");
    a2.shutdown().await;
    a1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_accounts_snapshot_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    // Alice's devices make no snapshots; Bob's do.
    let mut cfg = config(dir.path(), "a1", &addr);
    cfg.snapshot_after_changes = None;
    let a1 = Engine::create_account(cfg, "a1").await.unwrap();
    until_live(&a1).await;
    let b1 = account(dir.path(), "b1", &addr).await;
    let chat = b1
        .create_conversation("shared", &[a1.account()])
        .await
        .unwrap();
    until_listed(&a1, &chat).await;
    send_many(&b1, &chat, 300, "bob").await;
    until_uploaded(&b1).await;
    until_snapshot(dir.path(), segment(&chat), b1.account(), 0).await;
    until_history(&a1, &chat, 300).await;
    let reader = RelayReader::open(&dir.path().join("relay")).unwrap();
    assert_eq!(
        reader.snapshot(&segment(&chat), &a1.account()).unwrap(),
        None
    );

    // Alice's new device catches up from envelopes alone (and makes no snapshot of its own,
    // which would be Alice's to take).
    let code = a1.invite_device().await.unwrap();
    let mut cfg = config(dir.path(), "a2", &addr);
    cfg.snapshot_after_changes = None;
    let a2 = Engine::link(cfg, &code, "a2").await.unwrap();
    until_live(&a2).await;
    until_listed(&a2, &chat).await;
    until_history(&a2, &chat, 300).await;
    assert_eq!(
        full_history(&a2, &chat).await,
        full_history(&b1, &chat).await
    );
    assert_eq!(a2.sync_status().await.unwrap().snapshots_taken, 0);

    // At the protocol level: asking for a snapshot as Alice's device never yields Bob's.
    let alice = a1.account();
    a1.shutdown().await;
    let CatchUp { snapshots, .. } = catch_up_bytes(
        &addr,
        stored(dir.path(), "a1", alice),
        vec![Subscription {
            doc: segment(&chat),
            group: meta(&chat),
            after_seq: 0,
            snapshot: true,
        }],
    )
    .await;
    assert_eq!(snapshots, 0);
    a2.shutdown().await;
    b1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_snapshot_falls_back_to_the_envelopes() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    let (me, chat, honest, end) = snapshot_then_more(dir.path(), &addr, 20, "after").await;
    // Signed by a real device, but of a snapshot format this version does not read.
    let forger = ("a1", me);
    let covers = honest.covers + (end - honest.covers) / 2;
    put_forged_snapshot(dir.path(), &addr, forger, &chat, &honest, covers, |p| {
        p[0] = 9
    })
    .await;
    let a1 = Engine::open(config(dir.path(), "a1", &addr)).await.unwrap();
    until_live(&a1).await;
    // The old device remembers the snapshot it made: no new one after a restart (without the
    // stored mark its 320 changes would be due at once).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(a1.sync_status().await.unwrap().snapshots_made, 0);
    let a2 = linked(dir.path(), "a2", &addr, &a1).await;
    until_listed(&a2, &chat).await;
    // Every envelope arrives, the ones the refused snapshot claimed to cover too.
    until_history(&a2, &chat, 320).await;
    assert_eq!(
        full_history(&a2, &chat).await,
        full_history(&a1, &chat).await
    );
    assert_eq!(a2.sync_status().await.unwrap().snapshots_taken, 0);
    a2.shutdown().await;
    a1.shutdown().await;
}
