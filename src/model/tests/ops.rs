//! Every operation of a replica and what the queries show afterwards, locally and on other devices.

use automerge::ReadDoc;

use super::{T0, account, device, replica, sync, sync_pair};
use crate::ids::{DocAddr, MessageId};
use crate::model::hlc::HlcError;
use crate::model::message::{self, ATTACHMENTS, BODY};
use crate::model::{Attachment, Cursor, Draft, ListFlag, Message, Reaction, Replica};

fn attachment(n: u8) -> Attachment {
    Attachment {
        hash: [n; 32],
        size: 1234,
        mime: "image/jpeg".into(),
        name: format!("photo{n}.jpg"),
    }
}

/// Every message, oldest first, by walking pages of `limit`.
fn walk(r: &Replica, c: &crate::ids::ConversationId, limit: usize) -> Vec<Message> {
    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let page = r.history(c, before, limit).unwrap();
        assert!(page.messages.len() <= limit);
        pages.push(page.messages);
        match page.next {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    pages.into_iter().rev().flatten().collect()
}

fn ids(messages: &[Message]) -> Vec<MessageId> {
    messages.iter().map(|m| m.id).collect()
}

#[test]
fn send_and_reply_reach_the_other_account() {
    let mut a = replica(1, 1, 16);
    let mut b = replica(2, 2, 16);
    let c = a.create_conversation(T0, "pair", &[account(2)]).unwrap();
    let draft = Draft {
        body: "look".into(),
        reply_to: None,
        attachments: vec![attachment(7)],
    };
    let m1 = a.send(T0 + 1, &c, &draft).unwrap();
    assert_eq!(m1.device, device(1));
    let report = sync(&a, &mut b, T0 + 2);
    assert_eq!(report.new_messages, vec![(c, m1)]);

    let got = b.message(&c, &m1).unwrap();
    assert_eq!(got.author, account(1));
    assert_eq!(got.body.as_deref(), Some("look"));
    assert_eq!(got.attachments, vec![attachment(7)]);
    assert!(!got.edited && !got.recalled && got.reactions.is_empty());
    assert_eq!(b.unread_count(&c).unwrap(), 1);
    assert_eq!(b.members(&c).unwrap(), vec![account(1), account(2)]);

    // A reply from a device whose wall clock is behind still sorts after what it answers.
    let reply = Draft {
        reply_to: Some(m1),
        ..Draft::text("nice")
    };
    let m2 = b.send(T0 - 5_000, &c, &reply).unwrap();
    assert!(m2 > m1);
    assert_eq!(
        b.unread_count(&c).unwrap(),
        0,
        "sending reads what came before"
    );
    sync(&b, &mut a, T0 + 3);
    let history = a.history(&c, None, 10).unwrap();
    assert_eq!(ids(&history.messages), vec![m1, m2]);
    assert_eq!(history.messages[1].reply_to, Some(m1));
    assert_eq!(history.next, None);
    let summary = a.conversation_summary(&c).unwrap();
    assert_eq!(summary.last_message.map(|m| m.id), Some(m2));
    assert_eq!(summary.last_activity, m2.hlc);
    assert_eq!(summary.unread, 1);
}

#[test]
fn edit_replaces_the_body_everywhere() {
    let mut a1 = replica(1, 1, 16);
    let mut a2 = replica(1, 2, 16);
    let mut b = replica(2, 3, 16);
    let c = a1.create_conversation(T0, "edit", &[account(2)]).unwrap();
    let m = a1.send(T0 + 1, &c, &Draft::text("helo")).unwrap();
    sync(&a1, &mut a2, T0 + 2);
    // Another device of the author account may edit too.
    a2.edit(&c, &m, "hello").unwrap();
    sync(&a2, &mut b, T0 + 3);
    sync(&a2, &mut a1, T0 + 3);
    for r in [&a1, &a2, &b] {
        let got = r.message(&c, &m).unwrap();
        assert_eq!(got.body.as_deref(), Some("hello"));
        assert!(got.edited);
    }
}

#[test]
fn recall_removes_body_and_attachments_from_the_current_state() {
    let mut a = replica(1, 1, 16);
    let mut b = replica(2, 2, 16);
    let c = a.create_conversation(T0, "recall", &[account(2)]).unwrap();
    let draft = Draft {
        attachments: vec![attachment(1), attachment(2)],
        ..Draft::text("oops")
    };
    let m = a.send(T0 + 1, &c, &draft).unwrap();
    sync(&a, &mut b, T0 + 2);
    a.recall(&c, &m).unwrap();
    // Recalling twice is not an error and writes nothing.
    let vv = a.version_vector(&DocAddr::Segment(c, 0));
    a.recall(&c, &m).unwrap();
    assert_eq!(a.version_vector(&DocAddr::Segment(c, 0)), vv);
    sync(&a, &mut b, T0 + 3);
    for r in [&a, &b] {
        let got = r.message(&c, &m).unwrap();
        assert!(got.recalled);
        assert_eq!(got.body, None);
        assert!(got.attachments.is_empty());
        // Not just hidden by the reader: the current document state no longer holds them.
        let doc = r.synced_doc(&DocAddr::Segment(c, 0)).unwrap().doc();
        let (obj, _) = message::locate(doc, &m.key()).unwrap();
        assert!(doc.get(&obj, BODY).unwrap().is_none());
        assert!(doc.get(&obj, ATTACHMENTS).unwrap().is_none());
    }
}

#[test]
fn edit_concurrent_with_recall_stays_recalled_everywhere() {
    let mut a1 = replica(1, 1, 16);
    let mut a2 = replica(1, 2, 16);
    let mut b = replica(2, 3, 16);
    let c = a1.create_conversation(T0, "race", &[account(2)]).unwrap();
    let m = a1.send(T0 + 1, &c, &Draft::text("first")).unwrap();
    sync(&a1, &mut a2, T0 + 2);
    sync(&a1, &mut b, T0 + 2);
    a1.recall(&c, &m).unwrap();
    a2.edit(&c, &m, "second").unwrap();
    // Deliver in different orders to different replicas.
    sync(&a2, &mut b, T0 + 3);
    sync(&a1, &mut b, T0 + 3);
    sync_pair(&mut a1, &mut a2, T0 + 4);
    let reference = a1.message(&c, &m).unwrap();
    assert!(reference.recalled);
    assert_eq!(reference.body, None);
    for r in [&a2, &b] {
        assert_eq!(r.message(&c, &m).unwrap(), reference);
    }
}

#[test]
fn reactions_are_per_account_and_per_emoji() {
    let mut a = replica(1, 1, 16);
    let mut b = replica(2, 2, 16);
    let c = a.create_conversation(T0, "rx", &[account(2)]).unwrap();
    let m = a.send(T0 + 1, &c, &Draft::text("react to me")).unwrap();
    sync(&a, &mut b, T0 + 2);
    a.react(&c, &m, "👍", true).unwrap();
    b.react(&c, &m, "👍", true).unwrap();
    b.react(&c, &m, "❤", true).unwrap();
    // Adding again changes nothing.
    let vv = b.version_vector(&DocAddr::Segment(c, 0));
    b.react(&c, &m, "❤", true).unwrap();
    assert_eq!(b.version_vector(&DocAddr::Segment(c, 0)), vv);
    sync_pair(&mut a, &mut b, T0 + 3);
    let expected = vec![
        Reaction {
            reaction: "❤".into(),
            accounts: vec![account(2)],
        },
        Reaction {
            reaction: "👍".into(),
            accounts: vec![account(1), account(2)],
        },
    ];
    assert_eq!(a.message(&c, &m).unwrap().reactions, expected);
    assert_eq!(b.message(&c, &m).unwrap().reactions, expected);

    a.react(&c, &m, "👍", false).unwrap();
    b.react(&c, &m, "❤", false).unwrap();
    sync_pair(&mut a, &mut b, T0 + 4);
    let expected = vec![Reaction {
        reaction: "👍".into(),
        accounts: vec![account(2)],
    }];
    assert_eq!(a.message(&c, &m).unwrap().reactions, expected);
    assert_eq!(b.message(&c, &m).unwrap().reactions, expected);
}

#[test]
fn concurrent_reaction_add_and_remove_converge() {
    let mut a1 = replica(1, 1, 16);
    let mut a2 = replica(1, 2, 16);
    let mut b = replica(2, 3, 16);
    let c = a1.create_conversation(T0, "rx", &[account(2)]).unwrap();
    let m = a1.send(T0 + 1, &c, &Draft::text("hi")).unwrap();
    a1.react(&c, &m, "👍", true).unwrap();
    sync(&a1, &mut a2, T0 + 2);
    sync(&a1, &mut b, T0 + 2);
    // Concurrently: a1 removes the account's 👍, a2 removes and adds it again, b adds its own.
    a1.react(&c, &m, "👍", false).unwrap();
    a2.react(&c, &m, "👍", false).unwrap();
    a2.react(&c, &m, "👍", true).unwrap();
    b.react(&c, &m, "👍", true).unwrap();
    sync(&b, &mut a1, T0 + 3);
    sync(&a2, &mut a1, T0 + 3);
    sync(&a1, &mut a2, T0 + 4);
    sync(&a1, &mut b, T0 + 4);
    let reactions = a1.message(&c, &m).unwrap().reactions;
    // The re-add is concurrent with a1's removal, so it survives; b's is untouched.
    assert_eq!(
        reactions,
        vec![Reaction {
            reaction: "👍".into(),
            accounts: vec![account(1), account(2)],
        }]
    );
    assert_eq!(a2.message(&c, &m).unwrap().reactions, reactions);
    assert_eq!(b.message(&c, &m).unwrap().reactions, reactions);
}

#[test]
fn account_read_position_is_the_furthest_of_its_devices() {
    let mut a1 = replica(1, 1, 16);
    let mut a2 = replica(1, 2, 16);
    let mut b = replica(2, 3, 16);
    let c = b.create_conversation(T0, "read", &[account(1)]).unwrap();
    let m: Vec<MessageId> = (0..3)
        .map(|i| {
            b.send(T0 + 1 + i, &c, &Draft::text(format!("{i}")))
                .unwrap()
        })
        .collect();
    sync(&b, &mut a1, T0 + 5);
    sync(&b, &mut a2, T0 + 5);
    assert_eq!(a1.read_position(&c), None);
    assert_eq!(a1.unread_count(&c).unwrap(), 3);
    a1.mark_read(&c, &m[2]).unwrap();
    a2.mark_read(&c, &m[0]).unwrap();
    assert_eq!(a1.unread_count(&c).unwrap(), 0);
    assert_eq!(a2.unread_count(&c).unwrap(), 2);
    sync_pair(&mut a1, &mut a2, T0 + 6);
    for r in [&a1, &a2] {
        assert_eq!(r.read_position(&c), Some(m[2].key()));
        assert_eq!(r.unread_count(&c).unwrap(), 0);
    }
    // Marking an older message read never moves the position back.
    a2.mark_read(&c, &m[1]).unwrap();
    assert_eq!(a2.read_position(&c), Some(m[2].key()));
    // Another account's position is its own: b never marked anything read, and its own messages
    // are never unread to it.
    assert_eq!(b.read_position(&c), None);
    assert_eq!(b.unread_count(&c).unwrap(), 0);
    let a_acct = a1.synced_doc(&DocAddr::Account(account(1))).unwrap();
    assert!(b.synced_doc(&DocAddr::Account(account(1))).is_none());
    assert!(a_acct.version_vector().seq(&device(1)) > 0);
}

#[test]
fn unread_count_excludes_own_recalled_and_hidden_messages() {
    let mut a1 = replica(1, 1, 16);
    let mut a2 = replica(1, 2, 16);
    let mut b = replica(2, 3, 16);
    let c = b.create_conversation(T0, "unread", &[account(1)]).unwrap();
    b.send(T0 + 1, &c, &Draft::text("b1")).unwrap();
    sync(&b, &mut a1, T0 + 2);
    sync(&b, &mut a2, T0 + 2);
    assert_eq!(a1.unread_count(&c).unwrap(), 1);
    // Another device of the account writes; only its segment arrives, not its read position.
    a2.send(T0 + 3, &c, &Draft::text("a2")).unwrap();
    let segment = DocAddr::Segment(c, 0);
    let only_segment = a2
        .changes_since(&segment, &a1.version_vector(&segment))
        .unwrap();
    a1.apply(T0 + 4, vec![only_segment]);
    assert_eq!(a1.history(&c, None, 10).unwrap().messages.len(), 2);
    assert_eq!(
        a1.unread_count(&c).unwrap(),
        0,
        "a message from this account, on any device, reads what came before it"
    );

    let recalled = b.send(T0 + 5, &c, &Draft::text("b2")).unwrap();
    let hidden = b.send(T0 + 6, &c, &Draft::text("b3")).unwrap();
    b.send(T0 + 7, &c, &Draft::text("b4")).unwrap();
    b.recall(&c, &recalled).unwrap();
    sync(&b, &mut a1, T0 + 8);
    assert_eq!(a1.unread_count(&c).unwrap(), 2, "b3 and b4; b2 is recalled");
    a1.hide_message(&c, &hidden).unwrap();
    assert_eq!(a1.unread_count(&c).unwrap(), 1);
    assert_eq!(a1.conversation_summary(&c).unwrap().unread, 1);
}

#[test]
fn draft_is_shared_by_the_account_only() {
    let mut a1 = replica(1, 1, 16);
    let mut a2 = replica(1, 2, 16);
    let mut b = replica(2, 3, 16);
    let c = a1.create_conversation(T0, "draft", &[account(2)]).unwrap();
    sync(&a1, &mut a2, T0 + 1);
    sync(&a1, &mut b, T0 + 1);
    a1.set_draft(&c, "half a thought").unwrap();
    sync(&a1, &mut a2, T0 + 2);
    sync(&a1, &mut b, T0 + 2);
    assert_eq!(a2.draft(&c).as_deref(), Some("half a thought"));
    assert_eq!(
        a2.conversation_summary(&c).unwrap().draft.as_deref(),
        Some("half a thought")
    );
    assert_eq!(b.draft(&c), None);
    a2.set_draft(&c, "").unwrap();
    sync(&a2, &mut a1, T0 + 3);
    assert_eq!(a1.draft(&c), None);
    // Clearing an absent draft writes nothing.
    let vv = a1.version_vector(&DocAddr::Account(account(1)));
    a1.set_draft(&c, "").unwrap();
    assert_eq!(a1.version_vector(&DocAddr::Account(account(1))), vv);
}

#[test]
fn list_flags_order_the_list_and_sync_to_the_account() {
    let mut a1 = replica(1, 1, 16);
    let mut a2 = replica(1, 2, 16);
    let old = a1.create_conversation(T0, "old", &[]).unwrap();
    let new = a1.create_conversation(T0 + 10, "new", &[]).unwrap();
    let order = |r: &Replica| {
        r.conversation_list()
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(order(&a1), vec![new, old], "newest activity first");
    a1.set_flag(&old, ListFlag::Pinned, true).unwrap();
    a1.set_flag(&old, ListFlag::Muted, true).unwrap();
    a1.set_flag(&new, ListFlag::Archived, true).unwrap();
    sync(&a1, &mut a2, T0 + 11);
    for r in [&a1, &a2] {
        assert_eq!(order(r), vec![old, new], "pinned first");
        let list = r.conversation_list().unwrap();
        assert!(list[0].pinned && list[0].muted && !list[0].archived);
        assert!(!list[1].pinned && !list[1].muted && list[1].archived);
    }
    a2.set_flag(&old, ListFlag::Pinned, false).unwrap();
    a2.set_flag(&new, ListFlag::Archived, false).unwrap();
    sync(&a2, &mut a1, T0 + 12);
    assert_eq!(order(&a1), vec![new, old]);
    let list = a1.conversation_list().unwrap();
    assert!(!list[0].archived && !list[1].pinned && list[1].muted);
}

#[test]
fn hide_is_for_this_account_only() {
    let mut a1 = replica(1, 1, 16);
    let mut a2 = replica(1, 2, 16);
    let mut b = replica(2, 3, 16);
    let c = a1.create_conversation(T0, "hide", &[account(2)]).unwrap();
    let m1 = a1.send(T0 + 1, &c, &Draft::text("keep")).unwrap();
    let m2 = a1.send(T0 + 2, &c, &Draft::text("hide me")).unwrap();
    a1.hide_message(&c, &m2).unwrap();
    sync(&a1, &mut a2, T0 + 3);
    sync(&a1, &mut b, T0 + 3);
    for r in [&a1, &a2] {
        assert_eq!(ids(&r.history(&c, None, 10).unwrap().messages), vec![m1]);
        // Still readable by id.
        assert_eq!(r.message(&c, &m2).unwrap().body.as_deref(), Some("hide me"));
        let summary = r.conversation_summary(&c).unwrap();
        assert_eq!(summary.last_message.map(|m| m.id), Some(m1));
    }
    assert_eq!(
        ids(&b.history(&c, None, 10).unwrap().messages),
        vec![m1, m2]
    );
}

#[test]
fn members_title_and_settings() {
    let mut a = replica(1, 1, 16);
    let mut b = replica(2, 2, 16);
    let c = a.create_conversation(T0, "group", &[account(2)]).unwrap();
    a.add_member(T0 + 1, &c, &account(3)).unwrap();
    // Adding a member twice is not an error.
    a.add_member(T0 + 2, &c, &account(3)).unwrap();
    a.set_title(&c, "renamed").unwrap();
    a.set_setting(&c, "theme", "dark").unwrap();
    a.set_setting(&c, "emoji", "🐢").unwrap();
    sync(&a, &mut b, T0 + 3);
    assert_eq!(
        b.members(&c).unwrap(),
        vec![account(1), account(2), account(3)]
    );
    let summary = b.conversation_summary(&c).unwrap();
    assert_eq!(summary.title, "renamed");
    assert_eq!(summary.member_count, 3);
    assert!(summary.is_member);
    assert_eq!(
        b.settings(&c).unwrap(),
        vec![
            ("emoji".to_string(), "🐢".to_string()),
            ("theme".to_string(), "dark".to_string())
        ]
    );
    // b may change shared state too; a member can leave.
    b.set_title(&c, "by b").unwrap();
    b.remove_member(&c, &account(3)).unwrap();
    sync(&b, &mut a, T0 + 4);
    assert_eq!(a.conversation_summary(&c).unwrap().title, "by b");
    assert_eq!(a.members(&c).unwrap(), vec![account(1), account(2)]);
    a.remove_member(&c, &account(2)).unwrap();
    // Removing a non-member is not an error.
    a.remove_member(&c, &account(3)).unwrap();
    sync(&a, &mut b, T0 + 5);
    assert!(!b.conversation_summary(&c).unwrap().is_member);
    assert_eq!(b.members(&c).unwrap(), vec![account(1)]);
}

#[test]
fn history_pages_across_segments_exactly_once_in_order() {
    let mut a = replica(1, 1, 2);
    let mut b = replica(2, 2, 2);
    let c = a.create_conversation(T0, "pages", &[account(2)]).unwrap();
    let mut sent = Vec::new();
    for i in 0..4 {
        sent.push(a.send(T0 + i, &c, &Draft::text(format!("a{i}"))).unwrap());
    }
    sync(&a, &mut b, T0 + 10);
    // Both write offline, so their segments overlap in key ranges.
    for i in 0..5 {
        sent.push(
            a.send(T0 + 20 + 2 * i, &c, &Draft::text(format!("a{i}")))
                .unwrap(),
        );
        sent.push(
            b.send(T0 + 21 + 2 * i, &c, &Draft::text(format!("b{i}")))
                .unwrap(),
        );
    }
    sync_pair(&mut a, &mut b, T0 + 40);
    sent.sort();
    assert!(a.docs().len() >= 6, "several segments: {:?}", a.docs());
    for r in [&a, &b] {
        for limit in [1, 2, 3, 5, 7, 14, 100] {
            assert_eq!(ids(&walk(r, &c, limit)), sent, "limit {limit}");
        }
        // A page that starts before a given message.
        let before = r.history(&c, Some(Cursor::before(&sent[5])), 3).unwrap();
        assert_eq!(ids(&before.messages), sent[2..5].to_vec());
        assert_eq!(before.next, Some(Cursor::before(&sent[2])));
        assert!(r.history(&c, None, 0).unwrap().messages.is_empty());
    }
}

#[test]
fn history_without_absent_segments_leaves_them_out_and_says_so() {
    let mut a = replica(1, 1, 2);
    let c = a.create_conversation(T0, "gaps", &[]).unwrap();
    // Segments of two: 0 = m0 m1, 1 = m2 m3, 2 = m4.
    let sent: Vec<MessageId> = (0..5)
        .map(|i| a.send(T0 + i, &c, &Draft::text(format!("m{i}"))).unwrap())
        .collect();
    let absent = std::collections::BTreeSet::from([1]);
    let page = a.history_without(&c, None, 10, &absent).unwrap();
    assert_eq!(ids(&page.messages), vec![sent[0], sent[1], sent[4]]);
    assert!(page.incomplete);
    // A page that ends before the absent segment is complete.
    let page = a.history_without(&c, None, 1, &absent).unwrap();
    assert_eq!(ids(&page.messages), vec![sent[4]]);
    assert!(!page.incomplete);
    // Nothing absent: the plain history.
    let page = a
        .history_without(&c, None, 10, &Default::default())
        .unwrap();
    assert_eq!(page, a.history(&c, None, 10).unwrap());
    assert!(!page.incomplete && ids(&page.messages) == sent);
}

#[test]
fn a_segment_installed_from_a_save_reads_like_one_applied() {
    let mut a = replica(1, 1, 4);
    let c = a.create_conversation(T0, "install", &[]).unwrap();
    for i in 0..6 {
        a.send(T0 + i, &c, &Draft::text(format!("m{i}"))).unwrap();
    }
    // Another device of the account: the meta document by changes, segment 0 from a save.
    let mut b = replica(1, 2, 4);
    let meta = a
        .changes_since(&DocAddr::Meta(c), &crate::model::VersionVector::new())
        .unwrap();
    b.apply(T0 + 10, vec![meta]);
    let seg0 = DocAddr::Segment(c, 0);
    let save = a.save_doc(&seg0).unwrap();
    assert!(b.install_segment(&seg0, &save).unwrap());
    assert_eq!(b.version_vector(&seg0), a.version_vector(&seg0));
    // The rest by changes, as a catch-up after the snapshot would.
    sync(&a, &mut b, T0 + 11);
    assert_eq!(ids(&walk(&b, &c, 3)), ids(&walk(&a, &c, 3)));
    assert_eq!(b.unread_count(&c).unwrap(), a.unread_count(&c).unwrap());
    // What is stored of it is the save, loadable like any chunk.
    let stored = b.take_unsaved();
    let (_, unsaved) = stored.iter().find(|(addr, _)| *addr == seg0).unwrap();
    let reloaded = crate::model::doc::SyncedDoc::load_parts(
        seg0,
        device(2),
        None,
        std::slice::from_ref(&unsaved.applied),
        &[],
    )
    .unwrap();
    assert_eq!(reloaded.version_vector(), a.version_vector(&seg0));
    // A segment that holds changes is not replaced.
    assert!(!b.install_segment(&seg0, &save).unwrap());
    assert!(
        b.install_segment(&DocAddr::Meta(c), &save).is_err(),
        "only segments are installed"
    );
}

#[test]
fn message_by_id_across_segments() {
    let mut a = replica(1, 1, 2);
    let c = a.create_conversation(T0, "lookup", &[]).unwrap();
    let sent: Vec<MessageId> = (0..7)
        .map(|i| a.send(T0 + i, &c, &Draft::text(format!("m{i}"))).unwrap())
        .collect();
    assert_eq!(
        a.docs()
            .iter()
            .filter(|d| matches!(d, DocAddr::Segment(..)))
            .count(),
        4
    );
    for (i, id) in sent.iter().enumerate() {
        let m = a.message(&c, id).unwrap();
        assert_eq!(m.id, *id);
        assert_eq!(m.body, Some(format!("m{i}")));
    }
    // Same timestamp, another device: not this message.
    let other = MessageId {
        hlc: sent[3].hlc,
        device: device(9),
    };
    assert!(a.message(&c, &other).is_err());
}

#[test]
fn far_future_message_is_shown_but_does_not_drag_the_clock() {
    let mut a = replica(1, 1, 16);
    let mut b = replica(2, 2, 16);
    let c = a.create_conversation(T0, "skew", &[account(2)]).unwrap();
    sync(&a, &mut b, T0 + 1);
    let hour_ms = 3_600_000;
    let future = a
        .send(T0 + hour_ms, &c, &Draft::text("from the future"))
        .unwrap();
    let before = b.clock().last();
    let report = sync(&a, &mut b, T0 + 2);
    assert_eq!(report.clock_skew.len(), 1);
    let (id, err) = &report.clock_skew[0];
    assert_eq!(*id, future);
    assert!(matches!(
        err,
        HlcError::TooFarInFuture { remote_ms, local_ms, .. }
            if *remote_ms == T0 + hour_ms && *local_ms == T0 + 2
    ));
    assert_eq!(b.clock().last(), before);
    assert_eq!(report.new_messages, vec![(c, future)]);
    assert_eq!(
        b.message(&c, &future).unwrap().body.as_deref(),
        Some("from the future")
    );
    // b's next message is stamped by its own clock, before the future one.
    let mine = b.send(T0 + 3, &c, &Draft::text("now")).unwrap();
    assert!(mine.hlc.physical_ms() < T0 + 10);
    assert_eq!(
        ids(&b.history(&c, None, 10).unwrap().messages),
        vec![mine, future]
    );
    // A message within the bound moves the clock forward.
    let near = a.send(T0 + hour_ms + 1, &c, &Draft::text("later")).unwrap();
    let report = sync(&a, &mut b, T0 + hour_ms);
    assert!(report.clock_skew.is_empty());
    assert!(b.clock().last() >= near.hlc);
}

/// An edit concurrent with a recall writes the body again in the merge; the author's devices
/// remove it when they see both, so the text leaves the current state of every replica.
#[test]
fn edit_concurrent_with_recall_leaves_no_text_in_the_document() {
    let mut a1 = replica(1, 1, 16);
    let mut a2 = replica(1, 2, 16);
    let c = a1.create_conversation(T0, "race", &[]).unwrap();
    let m = a1.send(T0 + 1, &c, &Draft::text("first")).unwrap();
    sync(&a1, &mut a2, T0 + 2);
    a1.recall(&c, &m).unwrap();
    a2.edit(&c, &m, "second").unwrap();
    sync_pair(&mut a1, &mut a2, T0 + 3);
    // The repairs are changes too; a bystander that receives everything converges to no text.
    let mut b = replica(2, 3, 16);
    sync(&a1, &mut b, T0 + 4);
    sync(&a2, &mut b, T0 + 4);
    for r in [&a1, &a2, &b] {
        let doc = r.synced_doc(&DocAddr::Segment(c, 0)).unwrap().doc();
        let (obj, _) = message::locate(doc, &m.key()).unwrap();
        assert!(doc.get(&obj, BODY).unwrap().is_none());
    }
}
