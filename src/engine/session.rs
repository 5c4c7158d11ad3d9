//! One device's session with one relay, sans-IO: request ids, what each open request was for,
//! and per-document cursors with gap detection.
//!
//! The relay numbers every stored envelope with a global sequence number; a device's cursor for
//! a document is the highest number up to which it holds *every* envelope of that document.
//! Answers to a fetch or to the catch-up after a subscription are contiguous from the cursor
//! asked for. A push carries `prev`, the document's previous number: when `prev` is at or below
//! the cursor the push extends it; when it is above, something was missed (a push dropped on a
//! slow link, a race with the catch-up), and the device fetches from its cursor. An append's
//! acknowledgement carries `prev` too, so the author counts its own envelopes in.
//!
//! **Catch-up order.** Documents to subscribe wait in a queue; each has a [`Tier`], computed when
//! it is sent (what the device knows then decides it). A tier's subscriptions go out only once
//! no subscription of a more urgent tier is still catching up: the account document first, then
//! every conversation's meta document, then each conversation's newest segment, then older
//! segments. So the conversation list and the newest page of every conversation are ready
//! before older history is touched.

use std::collections::{BTreeSet, HashMap};

use crate::ids::{AccountId, DocId};

/// Most envelopes asked for by one fetch.
pub const FETCH_LIMIT: u32 = 4_096;

/// What an open request was for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Pending {
    /// The greeting.
    Hello,
    /// Device-log entries sent.
    LogAppend,
    /// This device's missing log entries sent at connection; hello follows once stored.
    LogAppendThenHello,
    /// A device log asked for.
    FetchLog(AccountId),
    /// A group update posted.
    PostGroup {
        /// The group.
        group: DocId,
        /// Its version.
        version: u32,
    },
    /// A group's updates asked for.
    FetchGroup(DocId),
    /// Subscriptions (and their catch-up).
    Subscribe(Vec<DocId>),
    /// An outbox envelope sent.
    Append {
        /// Its outbox row.
        outbox: i64,
    },
    /// A range of a document asked for.
    Fetch(DocId),
    /// A snapshot uploaded.
    PutSnapshot {
        /// The document.
        doc: DocId,
        /// The relay sequence number it covers.
        covers: u64,
        /// The changes of the document it holds.
        changes: u64,
    },
    /// A pairing offer registered, by rendezvous.
    PairOffer([u8; 32]),
    /// A pairing answer forwarded.
    PairAnswer,
}

/// How urgent a document's catch-up is: lower goes first.
pub(crate) type Tier = u8;
/// The account document: conversation list state, drafts, read positions.
pub(crate) const TIER_ACCOUNT: Tier = 0;
/// Conversation meta documents: titles, members, segment lists.
pub(crate) const TIER_META: Tier = 1;
/// Each conversation's newest segment: its latest page.
pub(crate) const TIER_NEWEST: Tier = 2;
/// Older segments.
pub(crate) const TIER_OLDER: Tier = 3;

/// A catch-up's progress on one relay, counted since the connection was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CatchUpCounts {
    /// Documents whose catch-up has finished.
    pub docs_done: u64,
    /// Documents subscribed or waiting to be (grows as segments are discovered).
    pub docs_total: u64,
    /// Envelopes received in catch-up and fetch answers.
    pub envelopes: u64,
    /// Bytes of those envelopes.
    pub bytes: u64,
}

/// A document's cursor on one relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct DocCursor {
    /// Every envelope up to this number is held.
    pub seq: u64,
    /// A fetch from `seq` is open.
    pub fetching: bool,
    /// A push showed envelopes past `seq` that are not held yet.
    pub behind: bool,
    /// The subscription's catch-up is still running.
    pub catching_up: bool,
}

/// What to do after envelopes of a document arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CursorStep {
    /// The cursor moved here (store it once the envelopes are applied).
    pub advanced_to: Option<u64>,
    /// Fetch the document from this cursor.
    pub fetch_after: Option<u64>,
}

/// The request bookkeeping and cursors of one relay connection.
#[derive(Debug, Default)]
pub(crate) struct Session {
    next_req: u32,
    pending: HashMap<u32, Pending>,
    cursors: HashMap<DocId, DocCursor>,
    /// Documents waiting to be subscribed.
    queued: BTreeSet<DocId>,
    /// The tier of each open subscription, by request id.
    open_tiers: HashMap<u32, Tier>,
    /// Documents queued since the connection was made, and those whose catch-up finished.
    counted: BTreeSet<DocId>,
    finished: BTreeSet<DocId>,
    /// Envelopes and bytes received in catch-up and fetch answers.
    received: (u64, u64),
}

impl Session {
    /// A session whose cursors start at the stored ones.
    pub fn new(cursors: impl IntoIterator<Item = (DocId, u64)>) -> Self {
        Session {
            next_req: 0,
            pending: HashMap::new(),
            queued: BTreeSet::new(),
            open_tiers: HashMap::new(),
            counted: BTreeSet::new(),
            finished: BTreeSet::new(),
            received: (0, 0),
            cursors: cursors
                .into_iter()
                .map(|(doc, seq)| {
                    (
                        doc,
                        DocCursor {
                            seq,
                            ..DocCursor::default()
                        },
                    )
                })
                .collect(),
        }
    }

    /// Forgets open requests, queued subscriptions and progress (the connection ended; the next
    /// one subscribes everything again); cursors stay.
    pub fn reset(&mut self) {
        self.pending.clear();
        self.queued.clear();
        self.open_tiers.clear();
        self.counted.clear();
        self.finished.clear();
        self.received = (0, 0);
        for c in self.cursors.values_mut() {
            c.fetching = false;
            c.behind = false;
            c.catching_up = false;
        }
    }

    /// A fresh request id for `what`.
    pub fn request(&mut self, what: Pending) -> u32 {
        self.next_req = self.next_req.wrapping_add(1).max(1);
        self.pending.insert(self.next_req, what);
        self.next_req
    }

    /// What request `req` was, if it is open; `done` closes it.
    pub fn pending(&self, req: u32) -> Option<&Pending> {
        self.pending.get(&req)
    }

    /// Closes request `req`.
    pub fn finish(&mut self, req: u32) -> Option<Pending> {
        self.pending.remove(&req)
    }

    /// Outbox rows whose append is open.
    pub fn appends_in_flight(&self) -> std::collections::HashSet<i64> {
        self.pending
            .values()
            .filter_map(|p| match p {
                Pending::Append { outbox } => Some(*outbox),
                _ => None,
            })
            .collect()
    }

    /// Whether an open request is one `f` picks.
    pub fn any_pending(&self, f: impl Fn(&Pending) -> bool) -> bool {
        self.pending.values().any(f)
    }

    /// Open requests.
    pub fn open_requests(&self) -> usize {
        self.pending.len()
    }

    /// The cursor of `doc` (0 if none).
    pub fn cursor(&self, doc: &DocId) -> u64 {
        self.cursors.get(doc).map_or(0, |c| c.seq)
    }

    /// Queues `docs` for subscription (a document already queued stays once).
    pub fn queue_subscriptions(&mut self, docs: impl IntoIterator<Item = DocId>) {
        for d in docs {
            self.queued.insert(d);
            self.counted.insert(d);
        }
    }

    /// The next documents to subscribe, all of one tier, removed from the queue: the most urgent
    /// queued tier, once no open subscription is more urgent. `None` when there is nothing to
    /// send yet. `tier_of` ranks a document with what the device knows now.
    pub fn next_subscriptions(
        &mut self,
        tier_of: impl Fn(&DocId) -> Tier,
    ) -> Option<(Tier, Vec<DocId>)> {
        let ranked: Vec<(Tier, DocId)> = self.queued.iter().map(|d| (tier_of(d), *d)).collect();
        let tier = ranked.iter().map(|(t, _)| *t).min()?;
        if self.open_tiers.values().any(|open| *open < tier) {
            return None;
        }
        let docs: Vec<DocId> = ranked
            .into_iter()
            .filter(|(t, _)| *t == tier)
            .map(|(_, d)| d)
            .collect();
        for d in &docs {
            self.queued.remove(d);
        }
        Some((tier, docs))
    }

    /// Subscription request `req` of `tier` was sent.
    pub fn subscribed(&mut self, req: u32, tier: Tier) {
        self.open_tiers.insert(req, tier);
    }

    /// Subscription request `req` ended (its catch-up is done, or it was refused).
    pub fn subscription_ended(&mut self, req: u32) {
        self.open_tiers.remove(&req);
    }

    /// The most urgent tier still waiting or catching up; `None` once everything is caught up.
    pub fn catching_up_tier(&self, tier_of: impl Fn(&DocId) -> Tier) -> Option<Tier> {
        let open = self.open_tiers.values().copied().min();
        let queued = self.queued.iter().map(tier_of).min();
        match (open, queued) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the greeting, a device log or a group's updates are still awaited: until they
    /// are in, the documents to catch up on are not all known.
    pub fn setting_up(&self) -> bool {
        self.pending.values().any(|p| {
            matches!(
                p,
                Pending::Hello
                    | Pending::LogAppendThenHello
                    | Pending::FetchLog(_)
                    | Pending::FetchGroup(_)
            )
        })
    }

    /// Counts envelopes of a catch-up or fetch answer.
    pub fn count_received(&mut self, envelopes: u64, bytes: u64) {
        self.received.0 += envelopes;
        self.received.1 += bytes;
    }

    /// The catch-up's progress since the connection was made.
    pub fn counts(&self) -> CatchUpCounts {
        CatchUpCounts {
            docs_done: self.finished.len() as u64,
            docs_total: self.counted.len() as u64,
            envelopes: self.received.0,
            bytes: self.received.1,
        }
    }

    /// Whether `doc` is waiting to be subscribed or still catching up.
    pub fn is_catching_up(&self, doc: &DocId) -> bool {
        self.queued.contains(doc) || self.cursors.get(doc).is_some_and(|c| c.catching_up)
    }

    /// Marks `docs` as catching up after a subscription.
    pub fn start_catch_up(&mut self, docs: &[DocId]) {
        for d in docs {
            self.cursors.entry(*d).or_default().catching_up = true;
        }
    }

    /// The answer to a fetch or catch-up of `doc`; `span` is the first item's `prev` and the
    /// last item's sequence number (`None` for an empty answer). The items are contiguous from
    /// the cursor that was asked for, which is not always the cursor now: after a refused
    /// snapshot, the envelopes after what it covers arrive with a `prev` past the cursor. Such a
    /// gap never moves the cursor; the document is marked behind and fetched from its cursor
    /// (at once, or when the catch-up ends). `more` continues a fetch.
    pub fn on_fetched(&mut self, doc: DocId, span: Option<(u64, u64)>, more: bool) -> CursorStep {
        let c = self.cursors.entry(doc).or_default();
        let mut step = CursorStep::default();
        let gap = span.is_some_and(|(prev, _)| prev > c.seq);
        if let Some((_, last)) = span {
            if !gap && last > c.seq {
                c.seq = last;
                step.advanced_to = Some(last);
            }
        }
        if gap {
            c.behind = true;
        }
        if more || (gap && !c.catching_up) {
            c.fetching = true;
            step.fetch_after = Some(c.seq);
        } else {
            c.fetching = false;
        }
        step
    }

    /// A fetch or catch-up answer of `doc`, given as each item's `(seq, prev)`: the chained
    /// prefix (each item's `prev` the `seq` before it) goes to [`Session::on_fetched`], and an
    /// item that breaks the chain is taken as a push ([`Session::on_pushed`]), so a gap inside
    /// an answer is fetched instead of moved over.
    pub fn on_answer(&mut self, doc: DocId, items: &[(u64, u64)], more: bool) -> CursorStep {
        let chained = items
            .windows(2)
            .position(|w| w[1].1 != w[0].0)
            .map_or(items.len(), |i| i + 1);
        let span = items.first().map(|first| (first.1, items[chained - 1].0));
        let mut step = self.on_fetched(doc, span, more);
        if let Some(&(seq, prev)) = items.get(chained) {
            let s = self.on_pushed(doc, seq, prev);
            step.advanced_to = s.advanced_to.or(step.advanced_to);
            step.fetch_after = step.fetch_after.or(s.fetch_after);
        }
        step
    }

    /// A snapshot of `doc` covering every envelope up to `covers` was applied.
    pub fn on_snapshot(&mut self, doc: DocId, covers: u64) -> CursorStep {
        let c = self.cursors.entry(doc).or_default();
        let mut step = CursorStep::default();
        if covers > c.seq {
            c.seq = covers;
            step.advanced_to = Some(covers);
        }
        step
    }

    /// A snapshot of `doc` was refused: what it covered is missing, so the document is fetched
    /// from its cursor once the catch-up ends (even if no envelope after it shows the gap).
    pub fn snapshot_refused(&mut self, doc: DocId) {
        self.cursors.entry(doc).or_default().behind = true;
    }

    /// Starts `doc` over from sequence number 0 (what it holds is not to be trusted as
    /// complete): the cursor goes to 0 and a fetch from 0 is taken as open. Returns the cursor.
    pub fn restart(&mut self, doc: DocId) -> u64 {
        let c = self.cursors.entry(doc).or_default();
        c.seq = 0;
        c.behind = false;
        c.fetching = true;
        0
    }

    /// The state of `doc`'s cursor, if it has one.
    pub fn doc_cursor(&self, doc: &DocId) -> Option<DocCursor> {
        self.cursors.get(doc).copied()
    }

    /// A pushed envelope of `doc`, or this device's own acknowledged one.
    pub fn on_pushed(&mut self, doc: DocId, seq: u64, prev: u64) -> CursorStep {
        let c = self.cursors.entry(doc).or_default();
        let mut step = CursorStep::default();
        if seq <= c.seq {
            return step;
        }
        if prev <= c.seq {
            c.seq = seq;
            step.advanced_to = Some(seq);
            return step;
        }
        c.behind = true;
        if !c.fetching && !c.catching_up {
            c.fetching = true;
            step.fetch_after = Some(c.seq);
        }
        step
    }

    /// The catch-up of `docs` finished; returns the documents that need a fetch because pushes
    /// during the catch-up showed envelopes past the cursor.
    pub fn end_catch_up(&mut self, docs: &[DocId]) -> Vec<(DocId, u64)> {
        let mut fetch = Vec::new();
        for d in docs {
            let c = self.cursors.entry(*d).or_default();
            if self.counted.contains(d) {
                self.finished.insert(*d);
            }
            c.catching_up = false;
            if c.behind && !c.fetching {
                c.fetching = true;
                fetch.push((*d, c.seq));
            }
        }
        fetch
    }

    /// Puts `doc`'s cursor back to `seq` (what arrived past it could not be used yet), and
    /// forgets an open fetch so a new one can start.
    pub fn rewind(&mut self, doc: &DocId, seq: u64) {
        let c = self.cursors.entry(*doc).or_default();
        c.seq = seq;
        c.fetching = false;
    }

    /// A fetch of `doc` that ended without reaching the end (more) or failed.
    pub fn fetch_failed(&mut self, doc: &DocId) {
        if let Some(c) = self.cursors.get_mut(doc) {
            c.fetching = false;
        }
    }

    /// Clears the "behind" mark once a fetch reached the end.
    pub fn caught_up(&mut self, doc: &DocId) {
        if let Some(c) = self.cursors.get_mut(doc) {
            if !c.fetching {
                c.behind = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_inside_an_answer_is_fetched_not_moved_over() {
        let mut s = Session::new([(doc(), 10)]);
        let req = s.request(Pending::Fetch(doc()));
        assert!(s.pending(req).is_some());
        // 12 is missing between 11 and 13.
        let step = s.on_answer(doc(), &[(11, 10), (13, 12), (14, 13)], false);
        assert_eq!(s.cursor(&doc()), 11);
        assert_eq!(step.fetch_after, Some(11));
        assert!(s.doc_cursor(&doc()).is_some_and(|c| c.behind && c.fetching));
        // A chained answer moves the cursor to its end.
        let mut s = Session::new([(doc(), 10)]);
        let step = s.on_answer(doc(), &[(11, 10), (12, 11), (14, 12)], false);
        assert_eq!(s.cursor(&doc()), 14);
        assert_eq!(step.fetch_after, None);
    }

    fn doc() -> DocId {
        DocId::from_bytes([1; 32])
    }

    #[test]
    fn contiguous_pushes_advance_the_cursor() {
        let mut s = Session::new([(doc(), 10)]);
        assert_eq!(s.on_pushed(doc(), 12, 10).advanced_to, Some(12));
        assert_eq!(s.on_pushed(doc(), 15, 12).advanced_to, Some(15));
        // An old or repeated push changes nothing.
        assert_eq!(s.on_pushed(doc(), 12, 10), CursorStep::default());
        assert_eq!(s.cursor(&doc()), 15);
    }

    #[test]
    fn a_gap_fetches_once_from_the_cursor() {
        let mut s = Session::new([(doc(), 10)]);
        let step = s.on_pushed(doc(), 20, 18);
        assert_eq!(step.advanced_to, None);
        assert_eq!(step.fetch_after, Some(10));
        // A second push while the fetch is open does not fetch again.
        assert_eq!(s.on_pushed(doc(), 22, 20).fetch_after, None);
        let step = s.on_fetched(doc(), Some((10, 22)), false);
        assert_eq!(step.advanced_to, Some(22));
        assert_eq!(step.fetch_after, None);
        s.caught_up(&doc());
        assert_eq!(s.on_pushed(doc(), 25, 22).advanced_to, Some(25));
    }

    #[test]
    fn pushes_during_catch_up_wait_for_its_end() {
        let mut s = Session::new([(doc(), 0)]);
        s.start_catch_up(&[doc()]);
        assert_eq!(s.on_pushed(doc(), 50, 40).fetch_after, None);
        assert_eq!(
            s.on_fetched(doc(), Some((0, 30)), false).advanced_to,
            Some(30)
        );
        assert_eq!(s.end_catch_up(&[doc()]), vec![(doc(), 30)]);
        // A catch-up that covered everything needs no fetch.
        let mut s = Session::new([(doc(), 0)]);
        s.start_catch_up(&[doc()]);
        s.on_fetched(doc(), Some((0, 30)), false);
        assert!(s.end_catch_up(&[doc()]).is_empty());
    }

    fn d(n: u8) -> DocId {
        DocId::from_bytes([n; 32])
    }

    /// Documents 1 (account), 2–3 (metas), 4–5 (newest segments), 6 (an older segment).
    fn tier(doc: &DocId) -> Tier {
        match doc.as_bytes()[0] {
            1 => TIER_ACCOUNT,
            2 | 3 => TIER_META,
            4 | 5 => TIER_NEWEST,
            _ => TIER_OLDER,
        }
    }

    #[test]
    fn subscriptions_go_out_in_catch_up_order() {
        let mut s = Session::new([]);
        s.queue_subscriptions([d(6), d(4), d(2), d(1), d(3), d(5)]);
        assert_eq!(s.catching_up_tier(tier), Some(TIER_ACCOUNT));
        let (t, docs) = s
            .next_subscriptions(tier)
            .expect("the account document first");
        assert_eq!((t, docs), (TIER_ACCOUNT, vec![d(1)]));
        s.subscribed(10, t);
        // Nothing else goes while the account document is catching up.
        assert_eq!(s.next_subscriptions(tier), None);
        s.subscription_ended(10);
        let (t, docs) = s.next_subscriptions(tier).expect("metas next");
        assert_eq!((t, docs), (TIER_META, vec![d(2), d(3)]));
        s.subscribed(11, t);
        assert_eq!(s.next_subscriptions(tier), None);
        // A meta learned meanwhile may go alongside the metas already catching up.
        s.queue_subscriptions([d(7)]);
        let meta7 = |doc: &DocId| if *doc == d(7) { TIER_META } else { tier(doc) };
        assert_eq!(s.next_subscriptions(meta7), Some((TIER_META, vec![d(7)])));
        s.subscribed(12, TIER_META);
        s.subscription_ended(11);
        assert_eq!(
            s.next_subscriptions(tier),
            None,
            "meta 7 is still catching up"
        );
        s.subscription_ended(12);
        assert_eq!(s.catching_up_tier(tier), Some(TIER_NEWEST));
        let (t, docs) = s.next_subscriptions(tier).expect("newest segments");
        assert_eq!((t, docs), (TIER_NEWEST, vec![d(4), d(5)]));
        s.subscribed(13, t);
        // An urgent document is not held back by a less urgent catch-up.
        s.queue_subscriptions([d(1)]);
        assert_eq!(s.next_subscriptions(tier), Some((TIER_ACCOUNT, vec![d(1)])));
        s.subscribed(14, TIER_ACCOUNT);
        s.subscription_ended(14);
        s.subscription_ended(13);
        assert_eq!(s.next_subscriptions(tier), Some((TIER_OLDER, vec![d(6)])));
        s.subscribed(15, TIER_OLDER);
        assert_eq!(s.catching_up_tier(tier), Some(TIER_OLDER));
        s.subscription_ended(15);
        assert_eq!(s.catching_up_tier(tier), None);
        assert_eq!(s.next_subscriptions(tier), None);
    }

    #[test]
    fn progress_counts_documents_once_and_resets_with_the_connection() {
        let mut s = Session::new([]);
        s.queue_subscriptions([d(1), d(2)]);
        s.queue_subscriptions([d(2), d(3)]);
        s.start_catch_up(&[d(1), d(2)]);
        s.count_received(3, 300);
        s.end_catch_up(&[d(1), d(2)]);
        // A second catch-up of the same document does not count it twice.
        s.start_catch_up(&[d(2)]);
        s.end_catch_up(&[d(2)]);
        let c = s.counts();
        assert_eq!((c.docs_done, c.docs_total), (2, 3));
        assert_eq!((c.envelopes, c.bytes), (3, 300));
        s.reset();
        assert_eq!(s.counts(), CatchUpCounts::default());
        assert_eq!(
            s.next_subscriptions(tier),
            None,
            "the queue went with the connection"
        );
    }

    #[test]
    fn a_long_fetch_continues_and_requests_are_tracked() {
        let mut s = Session::new([]);
        let step = s.on_fetched(doc(), Some((0, 100)), true);
        assert_eq!(step.fetch_after, Some(100));
        let req = s.request(Pending::Fetch(doc()));
        assert_eq!(s.pending(req), Some(&Pending::Fetch(doc())));
        assert_eq!(s.finish(req), Some(Pending::Fetch(doc())));
        assert_eq!(s.open_requests(), 0);
        let r1 = s.request(Pending::Hello);
        s.reset();
        assert_eq!(s.pending(r1), None);
        assert_eq!(s.cursor(&doc()), 100, "cursors survive a reconnect");
    }

    #[test]
    fn a_snapshot_moves_the_cursor_and_envelopes_after_it_extend_it() {
        let mut s = Session::new([]);
        s.start_catch_up(&[doc()]);
        assert_eq!(s.on_snapshot(doc(), 40).advanced_to, Some(40));
        // The catch-up continues after what the snapshot covers.
        let step = s.on_fetched(doc(), Some((40, 55)), false);
        assert_eq!(step.advanced_to, Some(55));
        assert!(s.end_catch_up(&[doc()]).is_empty());
        assert_eq!(s.cursor(&doc()), 55);
        // A snapshot behind the cursor changes nothing.
        assert_eq!(s.on_snapshot(doc(), 30), CursorStep::default());
        assert_eq!(s.cursor(&doc()), 55);
    }

    #[test]
    fn after_a_refused_snapshot_the_envelopes_past_it_do_not_move_the_cursor() {
        let mut s = Session::new([]);
        s.start_catch_up(&[doc()]);
        s.snapshot_refused(doc());
        // The relay goes on after what the snapshot covered: a gap from cursor 0.
        let step = s.on_fetched(doc(), Some((40, 55)), false);
        assert_eq!(step, CursorStep::default());
        assert_eq!(s.cursor(&doc()), 0);
        // When the catch-up ends, the document is fetched from 0.
        assert_eq!(s.end_catch_up(&[doc()]), vec![(doc(), 0)]);
        let step = s.on_fetched(doc(), Some((0, 55)), false);
        assert_eq!(step.advanced_to, Some(55));
        s.caught_up(&doc());
        assert_eq!(s.doc_cursor(&doc()).map(|c| c.behind), Some(false));
    }

    #[test]
    fn a_refused_snapshot_with_nothing_after_it_still_fetches() {
        let mut s = Session::new([]);
        s.start_catch_up(&[doc()]);
        s.snapshot_refused(doc());
        // The catch-up's answer after the snapshot is empty.
        assert_eq!(s.on_fetched(doc(), None, false), CursorStep::default());
        assert_eq!(s.end_catch_up(&[doc()]), vec![(doc(), 0)]);
    }

    #[test]
    fn a_gap_in_a_fetch_answer_fetches_from_the_cursor_again() {
        let mut s = Session::new([(doc(), 10)]);
        let step = s.on_fetched(doc(), Some((20, 30)), false);
        assert_eq!(step.advanced_to, None);
        assert_eq!(step.fetch_after, Some(10));
        assert_eq!(s.cursor(&doc()), 10);
    }

    #[test]
    fn a_restart_goes_back_to_zero() {
        let mut s = Session::new([(doc(), 70)]);
        assert_eq!(s.restart(doc()), 0);
        assert_eq!(s.cursor(&doc()), 0);
        // Pushes past the old cursor wait for the fetch from 0.
        assert_eq!(s.on_pushed(doc(), 80, 70), CursorStep::default());
        let step = s.on_fetched(doc(), Some((0, 70)), false);
        assert_eq!(step.advanced_to, Some(70));
    }
}
