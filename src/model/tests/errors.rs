//! Every typed error of the model, from the call that produces it.

use automerge::{ActorId, Automerge, transaction::Transactable};

use super::{T0, account, device, replica, sync};
use crate::ids::{ConversationId, DocAddr, MessageId};
use crate::model::doc::actor_of;
use crate::model::hlc::Hlc;
use crate::model::limits::*;
use crate::model::{Attachment, ChangeBatch, Draft, ListFlag, ModelConfig, ModelError, Replica};

fn nowhere() -> ConversationId {
    ConversationId::from_bytes([0xee; 16])
}

fn no_message() -> MessageId {
    MessageId {
        hlc: Hlc::new(T0, 0),
        device: device(9),
    }
}

/// A replica of account 1 in a conversation with account 2, holding one message of each.
fn pair() -> (Replica, Replica, ConversationId, MessageId, MessageId) {
    let mut a = replica(1, 1, 16);
    let mut b = replica(2, 2, 16);
    let c = a.create_conversation(T0, "pair", &[account(2)]).unwrap();
    let ma = a.send(T0 + 1, &c, &Draft::text("from a")).unwrap();
    sync(&a, &mut b, T0 + 2);
    let mb = b.send(T0 + 3, &c, &Draft::text("from b")).unwrap();
    sync(&b, &mut a, T0 + 4);
    (a, b, c, ma, mb)
}

fn expect_too_large(
    r: Result<impl std::fmt::Debug, ModelError>,
    field: &str,
    len: usize,
    max: usize,
) {
    match r {
        Err(ModelError::TooLarge {
            field: f,
            len: l,
            max: m,
        }) => assert_eq!((f, l, m), (field, len, max)),
        other => panic!("expected TooLarge for {field}, got {other:?}"),
    }
}

fn expect_empty(r: Result<impl std::fmt::Debug, ModelError>, field: &str) {
    match r {
        Err(ModelError::Empty { field: f }) => assert_eq!(f, field),
        other => panic!("expected Empty for {field}, got {other:?}"),
    }
}

#[test]
fn unknown_conversation() {
    let mut a = replica(1, 1, 16);
    let c = nowhere();
    let m = no_message();
    let unknown = |e: ModelError| matches!(e, ModelError::UnknownConversation(x) if x == c);
    assert!(unknown(a.send(T0, &c, &Draft::text("x")).unwrap_err()));
    assert!(unknown(a.edit(&c, &m, "x").unwrap_err()));
    assert!(unknown(a.recall(&c, &m).unwrap_err()));
    assert!(unknown(a.react(&c, &m, "👍", true).unwrap_err()));
    assert!(unknown(a.mark_read(&c, &m).unwrap_err()));
    assert!(unknown(a.set_draft(&c, "x").unwrap_err()));
    assert!(unknown(a.set_flag(&c, ListFlag::Pinned, true).unwrap_err()));
    assert!(unknown(a.hide_message(&c, &m).unwrap_err()));
    assert!(unknown(a.set_title(&c, "x").unwrap_err()));
    assert!(unknown(a.set_setting(&c, "k", "v").unwrap_err()));
    assert!(unknown(a.add_member(T0, &c, &account(2)).unwrap_err()));
    assert!(unknown(a.remove_member(&c, &account(2)).unwrap_err()));
    assert!(unknown(a.history(&c, None, 10).unwrap_err()));
    assert!(unknown(a.message(&c, &m).unwrap_err()));
    assert!(unknown(a.unread_count(&c).unwrap_err()));
    assert!(unknown(a.members(&c).unwrap_err()));
    assert!(unknown(a.settings(&c).unwrap_err()));
    assert!(unknown(a.conversation_summary(&c).unwrap_err()));
}

#[test]
fn unknown_message() {
    let (mut a, _, c, ma, _) = pair();
    let m = no_message();
    let unknown = |e: ModelError| {
        matches!(e, ModelError::UnknownMessage { conversation, message }
            if conversation == c && message == m)
    };
    assert!(unknown(a.edit(&c, &m, "x").unwrap_err()));
    assert!(unknown(a.recall(&c, &m).unwrap_err()));
    assert!(unknown(a.react(&c, &m, "👍", true).unwrap_err()));
    assert!(unknown(a.hide_message(&c, &m).unwrap_err()));
    assert!(unknown(a.message(&c, &m).unwrap_err()));
    // The right timestamp with the wrong device is another message.
    let wrong_device = MessageId {
        hlc: ma.hlc,
        device: device(9),
    };
    assert!(matches!(
        a.message(&c, &wrong_device),
        Err(ModelError::UnknownMessage { .. })
    ));
}

#[test]
fn not_author() {
    let (mut a, _, c, ma, mb) = pair();
    let not_author = |e: ModelError| {
        matches!(e, ModelError::NotAuthor { message, author, caller }
            if message == mb && author == account(2) && caller == account(1))
    };
    assert!(not_author(a.edit(&c, &mb, "mine now").unwrap_err()));
    assert!(not_author(a.recall(&c, &mb).unwrap_err()));
    // Reacting to and hiding another account's message are fine.
    a.react(&c, &mb, "👍", true).unwrap();
    a.hide_message(&c, &mb).unwrap();
    a.edit(&c, &ma, "own").unwrap();
}

#[test]
fn recalled() {
    let (mut a, _, c, ma, _) = pair();
    a.react(&c, &ma, "👍", true).unwrap();
    a.recall(&c, &ma).unwrap();
    let recalled = |e: ModelError| matches!(e, ModelError::Recalled(m) if m == ma);
    assert!(recalled(a.edit(&c, &ma, "again").unwrap_err()));
    assert!(recalled(a.react(&c, &ma, "❤", true).unwrap_err()));
    // Taking a reaction back is still allowed.
    a.react(&c, &ma, "👍", false).unwrap();
    assert!(a.message(&c, &ma).unwrap().reactions.is_empty());
}

#[test]
fn not_member() {
    let (mut a, mut b, c, ma, _) = pair();
    a.remove_member(&c, &account(2)).unwrap();
    sync(&a, &mut b, T0 + 10);
    let not_member = |e: ModelError| {
        matches!(e, ModelError::NotMember { conversation, account: x }
            if conversation == c && x == account(2))
    };
    assert!(not_member(
        b.send(T0 + 11, &c, &Draft::text("still here?"))
            .unwrap_err()
    ));
    assert!(not_member(b.set_title(&c, "mine").unwrap_err()));
    assert!(not_member(b.set_setting(&c, "k", "v").unwrap_err()));
    assert!(not_member(
        b.add_member(T0 + 12, &c, &account(2)).unwrap_err()
    ));
    assert!(not_member(b.remove_member(&c, &account(1)).unwrap_err()));
    assert!(not_member(b.react(&c, &ma, "👍", true).unwrap_err()));
    // The former member still reads history and keeps its own list state.
    assert_eq!(b.history(&c, None, 10).unwrap().messages.len(), 2);
    b.set_flag(&c, ListFlag::Archived, true).unwrap();
}

#[test]
fn too_large() {
    let (mut a, _, c, ma, _) = pair();
    let held = |r: &Replica| {
        r.docs()
            .iter()
            .map(|d| (*d, r.version_vector(d)))
            .collect::<Vec<_>>()
    };
    let before = held(&a);
    let body = "x".repeat(MAX_BODY_BYTES + 1);
    expect_too_large(
        a.send(T0, &c, &Draft::text(body.clone())),
        "body",
        MAX_BODY_BYTES + 1,
        MAX_BODY_BYTES,
    );
    expect_too_large(
        a.edit(&c, &ma, &body),
        "body",
        MAX_BODY_BYTES + 1,
        MAX_BODY_BYTES,
    );
    let title = "t".repeat(MAX_TITLE_BYTES + 1);
    expect_too_large(
        a.create_conversation(T0, &title, &[]),
        "title",
        MAX_TITLE_BYTES + 1,
        MAX_TITLE_BYTES,
    );
    expect_too_large(
        a.set_title(&c, &title),
        "title",
        MAX_TITLE_BYTES + 1,
        MAX_TITLE_BYTES,
    );
    let reaction = "r".repeat(MAX_REACTION_BYTES + 1);
    expect_too_large(
        a.react(&c, &ma, &reaction, true),
        "reaction",
        MAX_REACTION_BYTES + 1,
        MAX_REACTION_BYTES,
    );
    let file = Attachment {
        hash: [1; 32],
        size: 1,
        mime: "text/plain".into(),
        name: "a.txt".into(),
    };
    let many = Draft {
        attachments: vec![file.clone(); MAX_ATTACHMENTS + 1],
        ..Draft::default()
    };
    expect_too_large(
        a.send(T0, &c, &many),
        "attachments",
        MAX_ATTACHMENTS + 1,
        MAX_ATTACHMENTS,
    );
    let long_name = Draft {
        attachments: vec![Attachment {
            name: "n".repeat(MAX_ATTACHMENT_NAME_BYTES + 1),
            ..file.clone()
        }],
        ..Draft::default()
    };
    expect_too_large(
        a.send(T0, &c, &long_name),
        "attachment name",
        MAX_ATTACHMENT_NAME_BYTES + 1,
        MAX_ATTACHMENT_NAME_BYTES,
    );
    let long_mime = Draft {
        attachments: vec![Attachment {
            mime: "m".repeat(MAX_MIME_BYTES + 1),
            ..file
        }],
        ..Draft::default()
    };
    expect_too_large(
        a.send(T0, &c, &long_mime),
        "attachment mime type",
        MAX_MIME_BYTES + 1,
        MAX_MIME_BYTES,
    );
    expect_too_large(
        a.history(&c, None, MAX_PAGE + 1),
        "page limit",
        MAX_PAGE + 1,
        MAX_PAGE,
    );
    expect_too_large(
        a.set_draft(&c, &"d".repeat(MAX_DRAFT_BYTES + 1)),
        "draft",
        MAX_DRAFT_BYTES + 1,
        MAX_DRAFT_BYTES,
    );
    expect_too_large(
        a.set_setting(&c, &"k".repeat(MAX_SETTING_BYTES + 1), "v"),
        "setting name",
        MAX_SETTING_BYTES + 1,
        MAX_SETTING_BYTES,
    );
    expect_too_large(
        a.set_setting(&c, "k", &"v".repeat(MAX_SETTING_BYTES + 1)),
        "setting value",
        MAX_SETTING_BYTES + 1,
        MAX_SETTING_BYTES,
    );
    assert_eq!(held(&a), before, "a refused call writes nothing");
    // At the limits everything is accepted.
    a.send(T0, &c, &Draft::text("x".repeat(MAX_BODY_BYTES)))
        .unwrap();
    a.set_title(&c, &"t".repeat(MAX_TITLE_BYTES)).unwrap();
    a.react(&c, &ma, &"r".repeat(MAX_REACTION_BYTES), true)
        .unwrap();
    assert_eq!(a.history(&c, None, MAX_PAGE).unwrap().messages.len(), 3);
    assert_eq!(
        a.conversation_summary(&c).unwrap().title,
        "t".repeat(MAX_TITLE_BYTES)
    );
}

#[test]
fn empty() {
    let (mut a, _, c, ma, _) = pair();
    expect_empty(a.send(T0, &c, &Draft::default()), "message");
    expect_empty(a.edit(&c, &ma, ""), "body");
    expect_empty(a.react(&c, &ma, "", true), "reaction");
    expect_empty(a.set_setting(&c, "", "v"), "setting name");
    // A message of attachments only is not empty.
    let photo = Draft {
        attachments: vec![Attachment {
            hash: [2; 32],
            size: 10,
            mime: "image/png".into(),
            name: String::new(),
        }],
        ..Draft::default()
    };
    let m = a.send(T0 + 5, &c, &photo).unwrap();
    assert_eq!(a.message(&c, &m).unwrap().body.as_deref(), Some(""));
}

#[test]
fn bad_config() {
    for cap in [0, 1, MAX_SEGMENT_CAP + 1] {
        let config = ModelConfig {
            segment_cap: cap,
            ..ModelConfig::default()
        };
        match Replica::new(account(1), device(1), config) {
            Err(ModelError::BadConfig {
                field,
                value,
                min,
                max,
            }) => {
                assert_eq!(
                    (field, value, min, max),
                    ("segment_cap", cap, MIN_SEGMENT_CAP, MAX_SEGMENT_CAP)
                );
            }
            other => panic!("cap {cap}: {other:?}"),
        }
    }
    for cap in [MIN_SEGMENT_CAP, MAX_SEGMENT_CAP] {
        let config = ModelConfig {
            segment_cap: cap,
            ..ModelConfig::default()
        };
        assert!(Replica::new(account(1), device(1), config).is_ok());
    }
}

#[test]
fn foreign_account_document_is_refused_and_others_still_apply() {
    let (mut a, b, c, _, _) = pair();
    let mut b = b;
    b.set_draft(&c, "b's secret draft").unwrap();
    let mb2 = b.send(T0 + 20, &c, &Draft::text("more")).unwrap();
    let all: Vec<ChangeBatch> = b
        .docs()
        .iter()
        .filter_map(|addr| b.changes_since(addr, &a.version_vector(addr)))
        .collect();
    assert!(all.iter().any(|x| x.addr == DocAddr::Account(account(2))));
    let report = a.apply(T0 + 21, all);
    assert_eq!(report.rejected.len(), 1);
    assert!(matches!(
        &report.rejected[0],
        (DocAddr::Account(x), ModelError::ForeignAccount { expected, got })
            if *x == account(2) && *expected == account(1) && *got == account(2)
    ));
    assert!(a.message(&c, &mb2).is_ok());
    assert_eq!(a.draft(&c), None);
    assert!(a.synced_doc(&DocAddr::Account(account(2))).is_none());
}

/// One change by `device`'s actor setting `key` in a fresh document: the first change of that
/// device, so two calls with different keys are two different changes with sequence number 1.
fn first_change(actor: ActorId, key: &str) -> automerge::Change {
    let mut doc = Automerge::new().with_actor(actor);
    let mut tx = doc.transaction();
    tx.put(automerge::ROOT, key, "x").unwrap();
    tx.commit();
    doc.get_last_local_change().unwrap()
}

#[test]
fn equivocation_across_batches_is_refused() {
    let mut a = replica(1, 1, 16);
    let c = nowhere();
    let addr = DocAddr::Meta(c);
    let forked = device(7);
    let one = first_change(actor_of(&forked), "one");
    let two = first_change(actor_of(&forked), "two");
    assert_eq!((one.seq(), two.seq()), (1, 1));
    assert_ne!(one.hash(), two.hash());
    let report = a.apply(
        T0,
        vec![ChangeBatch {
            addr,
            changes: vec![one.clone()],
        }],
    );
    assert!(report.rejected.is_empty());
    let report = a.apply(
        T0,
        vec![ChangeBatch {
            addr,
            changes: vec![two],
        }],
    );
    assert!(matches!(
        &report.rejected[..],
        [(x, ModelError::Equivocation { doc, device, seq })]
            if *x == addr && *doc == addr && *device == forked && *seq == 1
    ));
    // The first change stays; the same change again is only a duplicate.
    let report = a.apply(
        T0,
        vec![ChangeBatch {
            addr,
            changes: vec![one],
        }],
    );
    assert!(report.rejected.is_empty());
    assert_eq!(report.docs[0].1.duplicates, 1);
    assert_eq!(a.version_vector(&addr).seq(&forked), 1);
}

#[test]
fn equivocation_inside_one_batch_is_refused() {
    let mut a = replica(1, 1, 16);
    let addr = DocAddr::Meta(nowhere());
    let forked = device(7);
    let one = first_change(actor_of(&forked), "one");
    let two = first_change(actor_of(&forked), "two");
    let report = a.apply(
        T0,
        vec![ChangeBatch {
            addr,
            changes: vec![one, two],
        }],
    );
    assert!(
        matches!(
            &report.rejected[..],
            [(_, ModelError::Equivocation { device, seq: 1, .. })] if *device == forked
        ),
        "{report:?}"
    );
    let doc = a.synced_doc(&addr).unwrap();
    assert_eq!(doc.pending_len(), 0, "nothing of a refused batch is kept");
    assert_eq!(doc.version_vector().seq(&forked), 0);
}

#[test]
fn bad_actor_is_refused() {
    let mut a = replica(1, 1, 16);
    let addr = DocAddr::Meta(nowhere());
    let short = first_change(ActorId::from(&[1u8, 2, 3][..]), "k");
    let report = a.apply(
        T0,
        vec![ChangeBatch {
            addr,
            changes: vec![short],
        }],
    );
    assert!(matches!(
        &report.rejected[..],
        [(x, ModelError::BadActor { len: 3 })] if *x == addr
    ));
    // A refused batch changes nothing, not even its well-formed changes.
    let good = first_change(actor_of(&device(7)), "k");
    let short = first_change(ActorId::from(&[1u8, 2, 3][..]), "k");
    let report = a.apply(
        T0,
        vec![ChangeBatch {
            addr,
            changes: vec![good.clone(), short],
        }],
    );
    assert_eq!(report.rejected.len(), 1);
    let doc = a.synced_doc(&addr).unwrap();
    assert_eq!(doc.version_vector().seq(&device(7)), 0);
    assert_eq!(doc.pending_len(), 0);
    let report = a.apply(
        T0,
        vec![ChangeBatch {
            addr,
            changes: vec![good],
        }],
    );
    assert_eq!(report.docs[0].1.applied, 1);
}

#[test]
fn pending_overflow_is_refused() {
    let mut a = replica(1, 1, 16);
    let addr = DocAddr::Meta(nowhere());
    // Changes that all wait: each is the second change of its device, whose first never came.
    // Built directly (no operations) so that a hundred thousand of them stay cheap.
    let template = first_change(actor_of(&device(1)), "k").decode();
    let changes: Vec<automerge::Change> = (0..=MAX_PENDING_CHANGES as u32)
        .map(|i| {
            let mut bytes = [0u8; 32];
            bytes[..4].copy_from_slice(&i.to_be_bytes());
            let mut c = template.clone();
            c.actor_id = ActorId::from(&bytes[..]);
            c.seq = 2;
            c.operations.clear();
            c.hash = None;
            automerge::Change::from(c)
        })
        .collect();
    let report = a.apply(T0, vec![ChangeBatch { addr, changes }]);
    assert!(matches!(
        &report.rejected[..],
        [(x, ModelError::PendingOverflow { doc, max })]
            if *x == addr && *doc == addr && *max == MAX_PENDING_CHANGES
    ));
    assert_eq!(a.synced_doc(&addr).unwrap().pending_len(), 0);
}

#[test]
fn equivocation_among_waiting_changes_is_refused() {
    let mut a = replica(1, 1, 16);
    let addr = DocAddr::Meta(nowhere());
    let forked = device(7);
    let mut base = Automerge::new().with_actor(actor_of(&forked));
    let mut tx = base.transaction();
    tx.put(automerge::ROOT, "base", "x").unwrap();
    tx.commit();
    let first = base.get_last_local_change().unwrap();
    // Two different second changes of the same device.
    let second = |key: &str| {
        let mut fork = base.fork().with_actor(actor_of(&forked));
        let mut tx = fork.transaction();
        tx.put(automerge::ROOT, key, "y").unwrap();
        tx.commit();
        fork.get_last_local_change().unwrap()
    };
    let (one, two) = (second("one"), second("two"));
    assert_eq!((one.seq(), two.seq()), (2, 2));
    let batch = |c: &automerge::Change| ChangeBatch {
        addr,
        changes: vec![c.clone()],
    };
    let report = a.apply(T0, vec![batch(&one)]);
    assert_eq!(report.docs[0].1.pending, 1, "waits for the first change");
    let report = a.apply(T0, vec![batch(&two)]);
    assert!(
        matches!(
            &report.rejected[..],
            [(_, ModelError::Equivocation { device, seq: 2, .. })] if *device == forked
        ),
        "{report:?}"
    );
    let report = a.apply(T0, vec![batch(&first)]);
    assert_eq!(report.docs[0].1.applied, 2);
    assert_eq!(report.docs[0].1.pending, 0);
    assert_eq!(a.version_vector(&addr).seq(&forked), 2);
}

#[test]
fn exhausted_clock_is_a_clock_error_and_writes_nothing() {
    use crate::model::hlc::HlcError;

    let mut a = replica(1, 1, 16);
    let c = a.create_conversation(T0, "c", &[]).unwrap();
    a.clock_mut().resume(Hlc::from_u64(u64::MAX));
    let exhausted = |e: ModelError| matches!(e, ModelError::Clock(HlcError::Exhausted));
    assert!(exhausted(a.send(T0, &c, &Draft::text("x")).unwrap_err()));
    assert!(exhausted(a.create_conversation(T0, "d", &[]).unwrap_err()));
    assert!(exhausted(a.add_member(T0, &c, &account(2)).unwrap_err()));
    assert!(a.history(&c, None, 10).unwrap().messages.is_empty());
    assert_eq!(a.conversation_ids(), vec![c]);
    assert_eq!(a.members(&c).unwrap(), vec![account(1)]);
}

#[test]
fn conversation_exists() {
    // A peer that predicts the id this device will derive next gets there first.
    let mut a = replica(1, 1, 16);
    let predicted = ConversationId::derive(&device(1), Hlc::new(T0, 0));
    let squatter = first_change(actor_of(&device(9)), "title");
    let report = a.apply(
        T0,
        vec![ChangeBatch {
            addr: DocAddr::Meta(predicted),
            changes: vec![squatter],
        }],
    );
    assert!(report.rejected.is_empty());
    assert!(matches!(
        a.create_conversation(T0, "mine", &[]),
        Err(ModelError::ConversationExists(id)) if id == predicted
    ));
    // The clock moved on, so the next attempt derives another id.
    let c = a.create_conversation(T0, "mine", &[]).unwrap();
    assert_ne!(c, predicted);
}

#[test]
fn too_many_members() {
    let mut a = replica(1, 1, 16);
    let others = |n: usize| -> Vec<crate::ids::AccountId> {
        (0..n)
            .map(|i| {
                let mut b = [0xaa; 32];
                b[..8].copy_from_slice(&(i as u64).to_be_bytes());
                crate::ids::AccountId::from_bytes(b)
            })
            .collect()
    };
    expect_too_large(
        a.create_conversation(T0, "crowd", &others(MAX_MEMBERS)),
        "members",
        MAX_MEMBERS + 1,
        MAX_MEMBERS,
    );
    // Duplicates and the creator itself count once: this is one member over, not two.
    let mut crowd = others(MAX_MEMBERS);
    crowd.push(crowd[0]);
    crowd.push(account(1));
    expect_too_large(
        a.create_conversation(T0, "crowd", &crowd),
        "members",
        MAX_MEMBERS + 1,
        MAX_MEMBERS,
    );
    assert!(a.conversation_ids().is_empty());
}
