//! Three devices of two accounts chatting, going offline and converging.
//!
//! Alice has a phone and a laptop, Bob has a phone. Every device keeps its replica in its own
//! encrypted SQLite store (the embedded default storage), and every operation is durable when it
//! returns. The devices exchange only opaque change batches, encoded to bytes as a transport would
//! carry them; the network here is an in-memory loop until the QUIC relay lands. At the end
//! Alice's laptop restarts and finds everything on its disk.
//!
//! Run with `cargo run --example quickstart`.

use std::path::{Path, PathBuf};

use roamsync::ids::{AccountId, ConversationId, DeviceId, DocAddr};
use roamsync::model::{ChangeBatch, Draft, ListFlag, Message};
use roamsync::store::{StorageKey, StoreConfig, StoredReplica};

fn device_path(dir: &Path, n: u8) -> PathBuf {
    dir.join(format!("device-{n}.db"))
}

fn device(dir: &Path, account: AccountId, n: u8) -> StoredReplica {
    let mut id = [n; 32];
    id[31] = 0x5a;
    // A real app keeps the storage key in the OS keystore.
    let key = StorageKey::from_bytes([n; 32]);
    let device = DeviceId::from_bytes(id);
    StoredReplica::open(
        &device_path(dir, n),
        &key,
        account,
        device,
        StoreConfig::default(),
    )
    .expect("a store opens")
}

/// Sends `from` everything `to` may hold and lacks, as encoded batches. Account documents only
/// travel between devices of the same account.
fn push(from: &mut StoredReplica, to: &mut StoredReplica, now_ms: u64) -> usize {
    let mut wire: Vec<Vec<u8>> = Vec::new();
    for addr in from.docs().expect("store readable") {
        if matches!(addr, DocAddr::Account(a) if a != to.replica().account()) {
            continue;
        }
        let have = to.version_vector(&addr).expect("store readable");
        if let Some(batch) = from.changes_since(&addr, &have).expect("store readable") {
            for part in batch.split() {
                wire.push(part.encode());
            }
        }
    }
    let bytes: usize = wire.iter().map(Vec::len).sum();
    let batches = wire
        .iter()
        .map(|b| ChangeBatch::decode(b).expect("batches from a replica decode"))
        .collect();
    let report = to.apply(now_ms, batches).expect("store writable");
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    bytes
}

/// Every device pushes to every other one.
fn sync_all(devices: &mut [&mut StoredReplica], now_ms: u64) -> usize {
    let mut bytes = 0;
    for i in 0..devices.len() {
        for j in 0..devices.len() {
            if i == j {
                continue;
            }
            let (from, to) = if i < j {
                let (a, b) = devices.split_at_mut(j);
                (&mut *a[i], &mut *b[0])
            } else {
                let (a, b) = devices.split_at_mut(i);
                (&mut *b[0], &mut *a[j])
            };
            bytes += push(from, to, now_ms);
        }
    }
    bytes
}

fn describe(m: &Message, me: AccountId) -> String {
    let who = if m.author == me { "me  " } else { "them" };
    let body = if m.recalled {
        "(recalled)".to_string()
    } else {
        m.body.clone().unwrap_or_default()
    };
    let mut notes = Vec::new();
    if m.edited {
        notes.push("edited".to_string());
    }
    for rx in &m.reactions {
        notes.push(format!("{}×{}", rx.reaction, rx.accounts.len()));
    }
    if notes.is_empty() {
        format!("{who}: {body}")
    } else {
        format!("{who}: {body} [{}]", notes.join(", "))
    }
}

fn show(name: &str, r: &mut StoredReplica) {
    println!("  {name}:");
    let me = r.replica().account();
    for c in r.conversation_list().expect("store readable") {
        println!(
            "    [{}] {:?}  unread {}  draft {:?}",
            if c.pinned { "pinned" } else { "" },
            c.title,
            c.unread,
            c.draft.unwrap_or_default()
        );
        let page = r
            .history(&c.id, None, 50)
            .expect("listed conversation exists");
        for m in page.messages {
            println!("      {}", describe(&m, me));
        }
    }
}

fn page(r: &mut StoredReplica, chat: &ConversationId) -> Vec<Message> {
    r.history(chat, None, 50)
        .expect("conversation exists")
        .messages
}

fn main() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let alice = AccountId::from_bytes([0xa1; 32]);
    let bob = AccountId::from_bytes([0xb0; 32]);
    let mut alice_phone = device(dir.path(), alice, 1);
    let mut alice_laptop = device(dir.path(), alice, 2);
    let mut bob_phone = device(dir.path(), bob, 3);
    let mut now = 1_700_000_000_000u64;

    println!("1. Alice creates a chat with Bob on her phone and says hello.");
    let chat = alice_phone
        .create_conversation(now, "Alice & Bob", &[bob])
        .unwrap();
    let hello = alice_phone
        .send(now + 1, &chat, &Draft::text("Hi Bob! Lunch tomorow?"))
        .unwrap();
    now += 10;
    sync_all(
        &mut [&mut alice_phone, &mut alice_laptop, &mut bob_phone],
        now,
    );

    println!("2. Alice fixes the typo from her laptop; Bob reacts and answers.");
    alice_laptop
        .edit(&chat, &hello, "Hi Bob! Lunch tomorrow?")
        .unwrap();
    bob_phone.react(&chat, &hello, "👍", true).unwrap();
    let answer = Draft {
        reply_to: Some(hello),
        ..Draft::text("Sure, 12:30 at the usual place.")
    };
    let reply = bob_phone.send(now + 2, &chat, &answer).unwrap();
    now += 10;
    sync_all(
        &mut [&mut alice_phone, &mut alice_laptop, &mut bob_phone],
        now,
    );
    println!(
        "   unread on Alice's phone and laptop: {} and {}",
        alice_phone.unread_count(&chat).unwrap(),
        alice_laptop.unread_count(&chat).unwrap()
    );

    println!("3. Alice reads on her phone, pins the chat and starts a draft; the laptop follows.");
    alice_phone.mark_read(&chat, &reply).unwrap();
    alice_phone.set_flag(&chat, ListFlag::Pinned, true).unwrap();
    alice_phone.set_draft(&chat, "Can I bring a fri").unwrap();
    now += 10;
    sync_all(
        &mut [&mut alice_phone, &mut alice_laptop, &mut bob_phone],
        now,
    );
    println!(
        "   on the laptop: unread {}, pinned {}, draft {:?}",
        alice_laptop.unread_count(&chat).unwrap(),
        alice_laptop.conversation_list().unwrap()[0].pinned,
        alice_laptop.draft(&chat).unwrap_or_default()
    );

    println!("4. The laptop goes offline. Bob posts by mistake, recalls it, writes again;");
    println!("   the laptop writes too, offline.");
    let oops = bob_phone
        .send(now + 1, &chat, &Draft::text("wrong chat, ignore"))
        .unwrap();
    bob_phone.recall(&chat, &oops).unwrap();
    bob_phone
        .send(now + 2, &chat, &Draft::text("See you!"))
        .unwrap();
    alice_laptop
        .send(
            now + 3,
            &chat,
            &Draft::text("(written offline on the laptop)"),
        )
        .unwrap();
    now += 10;
    sync_all(&mut [&mut alice_phone, &mut bob_phone], now);

    println!("5. The laptop comes back and everything converges.");
    let bytes = sync_all(
        &mut [&mut alice_phone, &mut alice_laptop, &mut bob_phone],
        now + 10,
    );
    println!("   ({bytes} bytes of change batches exchanged in the final round)\n");

    show("Alice's phone", &mut alice_phone);
    show("Alice's laptop", &mut alice_laptop);
    show("Bob's phone", &mut bob_phone);

    assert_eq!(
        alice_phone.conversation_list().unwrap(),
        alice_laptop.conversation_list().unwrap(),
        "Alice's devices agree"
    );
    assert_eq!(
        page(&mut alice_phone, &chat),
        page(&mut bob_phone, &chat),
        "both accounts see the same history"
    );
    println!("\nAll devices converged.");

    println!("\n6. Alice's laptop restarts: everything is on its disk, encrypted.");
    let before = (
        alice_laptop.conversation_list().unwrap(),
        page(&mut alice_laptop, &chat),
    );
    drop(alice_laptop);
    let mut alice_laptop = device(dir.path(), alice, 2);
    let after = (
        alice_laptop.conversation_list().unwrap(),
        page(&mut alice_laptop, &chat),
    );
    assert_eq!(after, before, "the reopened store holds the same state");
    let size = std::fs::metadata(device_path(dir.path(), 2)).map_or(0, |m| m.len());
    println!("   reopened its store ({size} bytes): same conversation list, same history.");
}
