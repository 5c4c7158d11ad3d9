//! History paging against a plain sorted list, over segments whose key ranges overlap because
//! devices wrote offline.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::{T0, account, replica, sync};
use crate::ids::MessageId;
use crate::model::{Cursor, Draft, Replica};

#[derive(Clone, Debug)]
enum Action {
    /// Device `0..3` sends.
    Send(usize),
    /// `from` delivers everything it holds to `to`.
    Sync(usize, usize),
    /// Device 0 hides the n-th message it knows of.
    Hide(usize),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (0usize..3).prop_map(Action::Send),
        2 => (0usize..3, 0usize..3).prop_map(|(f, t)| Action::Sync(f, t)),
        1 => any::<usize>().prop_map(Action::Hide),
    ]
}

fn pair(rs: &mut [Replica], from: usize, to: usize) -> (&Replica, &mut Replica) {
    if from < to {
        let (l, r) = rs.split_at_mut(to);
        (&l[from], &mut r[0])
    } else {
        let (l, r) = rs.split_at_mut(from);
        (&r[0], &mut l[to])
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn pages_match_a_sorted_list(
        cap in 2usize..5,
        actions in proptest::collection::vec(action(), 1..40),
        limits in proptest::collection::vec(1usize..9, 3),
        cursor_at in any::<proptest::sample::Index>(),
    ) {
        // Devices 0 and 1 of account 1, device 2 of account 2.
        let mut rs = vec![replica(1, 1, cap), replica(1, 2, cap), replica(2, 3, cap)];
        let c = rs[0].create_conversation(T0, "paging", &[account(2)]).unwrap();
        for to in 1..3 {
            let (from, to) = pair(&mut rs, 0, to);
            sync(from, to, T0);
        }
        let mut sent: BTreeSet<MessageId> = BTreeSet::new();
        let mut hidden: BTreeSet<MessageId> = BTreeSet::new();
        for (step, a) in actions.iter().enumerate() {
            let now = T0 + 1 + step as u64;
            match a {
                Action::Send(d) => {
                    sent.insert(rs[*d].send(now, &c, &Draft::text(format!("{step}"))).unwrap());
                }
                Action::Sync(f, t) if f != t => {
                    let (from, to) = pair(&mut rs, *f, *t);
                    sync(from, to, now);
                }
                Action::Sync(..) => {}
                Action::Hide(n) => {
                    let known: Vec<MessageId> = sent
                        .iter()
                        .filter(|m| rs[0].message(&c, m).is_ok())
                        .copied()
                        .collect();
                    if !known.is_empty() {
                        let m = known[n % known.len()];
                        rs[0].hide_message(&c, &m).unwrap();
                        hidden.insert(m);
                    }
                }
            }
        }
        for f in 0..3 {
            for t in 0..3 {
                if f != t {
                    let (from, to) = pair(&mut rs, f, t);
                    sync(from, to, T0 + 1_000);
                }
            }
        }
        for (i, r) in rs.iter().enumerate() {
            let visible: Vec<MessageId> = sent
                .iter()
                .filter(|m| i == 2 || !hidden.contains(m))
                .copied()
                .collect();
            for &limit in &limits {
                let mut got: Vec<MessageId> = Vec::new();
                let mut before = None;
                loop {
                    let page = r.history(&c, before, limit).unwrap();
                    prop_assert!(page.messages.len() <= limit);
                    got.splice(0..0, page.messages.iter().map(|m| m.id));
                    match page.next {
                        Some(next) => before = Some(next),
                        None => break,
                    }
                }
                prop_assert_eq!(&got, &visible, "replica {}, limit {}", i, limit);
            }
            // A page before any message: the `limit` visible messages just older than it.
            if !sent.is_empty() {
                let all: Vec<MessageId> = sent.iter().copied().collect();
                let at = all[cursor_at.index(all.len())];
                let older: Vec<MessageId> = visible.iter().filter(|m| **m < at).copied().collect();
                let limit = limits[0];
                let page = r.history(&c, Some(Cursor::before(&at)), limit).unwrap();
                let ids: Vec<MessageId> = page.messages.iter().map(|m| m.id).collect();
                prop_assert_eq!(&ids[..], &older[older.len().saturating_sub(limit)..]);
            }
        }
    }
}
