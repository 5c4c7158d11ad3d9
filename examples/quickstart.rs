//! Three devices of two accounts chatting, going offline and converging.
//!
//! Alice has a phone and a laptop, Bob has a phone. Every device holds its own replica; the
//! devices exchange only opaque change batches, encoded to bytes as a transport would carry them.
//! The network here is an in-memory loop; the QUIC relay arrives with the networking layer.
//!
//! Run with `cargo run --example quickstart`.

use roamsync::ids::{AccountId, DeviceId, DocAddr};
use roamsync::model::{ChangeBatch, Draft, ListFlag, ModelConfig, Replica};

fn device(account: AccountId, n: u8) -> Replica {
    let mut id = [n; 32];
    id[31] = 0x5a;
    Replica::new(account, DeviceId::from_bytes(id), ModelConfig::default())
        .expect("default config is valid")
}

/// Sends `from` everything `to` may hold and lacks, as encoded batches. Account documents only
/// travel between devices of the same account.
fn push(from: &Replica, to: &mut Replica, now_ms: u64) -> usize {
    let mut wire: Vec<Vec<u8>> = Vec::new();
    for addr in from.docs() {
        if matches!(addr, DocAddr::Account(a) if a != to.account()) {
            continue;
        }
        if let Some(batch) = from.changes_since(&addr, &to.version_vector(&addr)) {
            wire.push(batch.encode());
        }
    }
    let bytes: usize = wire.iter().map(Vec::len).sum();
    let batches = wire
        .iter()
        .map(|b| ChangeBatch::decode(b).expect("batches from a replica decode"))
        .collect();
    let report = to.apply(now_ms, batches);
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    bytes
}

fn sync_all(devices: &mut [&mut Replica], now_ms: u64) -> usize {
    let mut bytes = 0;
    for i in 0..devices.len() {
        for j in 0..devices.len() {
            if i != j {
                let (from, to) = if i < j {
                    let (a, b) = devices.split_at_mut(j);
                    (&*a[i], &mut *b[0])
                } else {
                    let (a, b) = devices.split_at_mut(i);
                    (&*b[0], &mut *a[j])
                };
                bytes += push(from, to, now_ms);
            }
        }
    }
    bytes
}

fn show(name: &str, r: &Replica) {
    println!("  {name}:");
    for c in r.conversation_list().expect("every segment is in memory") {
        println!(
            "    [{}{}] {:?}  unread {}  draft {:?}",
            if c.pinned { "pinned" } else { "" },
            if c.muted { " muted" } else { "" },
            c.title,
            c.unread,
            c.draft.unwrap_or_default()
        );
        let page = r
            .history(&c.id, None, 50)
            .expect("listed conversation exists");
        for m in page.messages {
            let who = if m.author == r.account() {
                "me "
            } else {
                "them"
            };
            let body = if m.recalled {
                "(recalled)".to_string()
            } else {
                m.body.unwrap_or_default()
            };
            let mut notes = Vec::new();
            if m.edited {
                notes.push("edited".to_string());
            }
            for rx in &m.reactions {
                notes.push(format!("{}×{}", rx.reaction, rx.accounts.len()));
            }
            println!(
                "      {who}: {body} {}",
                if notes.is_empty() {
                    String::new()
                } else {
                    format!("[{}]", notes.join(", "))
                }
            );
        }
    }
}

fn main() {
    let alice = AccountId::from_bytes([0xa1; 32]);
    let bob = AccountId::from_bytes([0xb0; 32]);
    let mut alice_phone = device(alice, 1);
    let mut alice_laptop = device(alice, 2);
    let mut bob_phone = device(bob, 3);
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
        "   unread on Alice's phone before reading: {}",
        alice_phone.unread_count(&chat).unwrap()
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
        "4. The laptop goes offline. Bob posts by mistake, recalls it, writes again; the laptop writes too."
    );
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

    show("Alice's phone", &alice_phone);
    show("Alice's laptop", &alice_laptop);
    show("Bob's phone", &bob_phone);

    let list = |r: &Replica| r.conversation_list().unwrap();
    let page = |r: &Replica| r.history(&chat, None, 50).unwrap().messages;
    assert_eq!(
        list(&alice_phone),
        list(&alice_laptop),
        "Alice's devices agree"
    );
    assert_eq!(
        page(&alice_phone),
        page(&bob_phone),
        "both accounts see the same history"
    );
    println!("\nAll devices converged.");
}
