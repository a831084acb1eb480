//! Who gets which item. Every item goes to `overlap` different annotators, never twice to the
//! same one and never with another's answer. An item shown is held for its annotator (a
//! lease) until they decide it, or until the lease runs out and the item is needed elsewhere;
//! items already started are finished first, so overlap (and with it agreement) builds early.
//! A skip passes the item on to someone else; undo takes back the annotator's latest
//! decision and shows that item again, in the same letter order.
//!
//! The board is kept in memory and mirrors the database, which is written first: what the
//! board says has been committed. Items are filed as fresh (nobody has seen them), in
//! progress, or complete, so a request looks only at the items in progress and the first
//! fresh one, however many items there are.

use std::collections::{BTreeSet, HashMap};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::Task;
use super::answer::{AnswerBody, Decision, Rules};
use super::items::{Content, Item};
use super::store::{Assigned, Settings, Store};
use crate::error::{Error, Result};
use crate::human::scoring::Scale;

/// Why a decision was not taken.
#[derive(Debug)]
pub enum Refused {
    NoSuchItem(i64),
    /// The item is not assigned to this annotator (never shown to them, or given to others).
    NotYours(i64),
    AlreadyDecided(i64),
    NothingToUndo,
    /// Undo names another item than the annotator's latest decision.
    NotLatest { asked: i64, latest: i64 },
    Invalid(String),
    Failed(Error),
}

impl From<Error> for Refused {
    fn from(e: Error) -> Self {
        Refused::Failed(e)
    }
}

/// One annotator's progress.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Progress {
    pub annotator: String,
    pub answered: usize,
    pub skipped: usize,
    /// Items still open to them, the one they hold included.
    pub left: usize,
    /// The item they hold now.
    pub current: Option<i64>,
}

/// What a decision did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Done {
    pub item: i64,
    /// `answered`, `skipped` or `undone`.
    pub action: &'static str,
}

#[derive(Clone, Debug, Default)]
struct ItemState {
    answered: Vec<String>,
    skipped: Vec<String>,
    leases: Vec<Assigned>,
}

impl ItemState {
    fn decided_by(&self, annotator: &str) -> bool {
        self.answered.iter().chain(&self.skipped).any(|a| a == annotator)
    }
}

pub struct Board {
    store: Store,
    pub settings: Settings,
    pub rules: Rules,
    /// Item `id` is `items[id - 1]`.
    items: Vec<Item>,
    state: Vec<ItemState>,
    /// Annotator → the item they hold.
    current: HashMap<String, i64>,
    /// Annotator → (answered, skipped).
    counts: HashMap<String, (usize, usize)>,
    /// Items nobody has answered, skipped or been shown.
    fresh: BTreeSet<i64>,
    /// Items seen by someone and not yet answered `overlap` times.
    in_progress: BTreeSet<i64>,
    lease_seconds: f64,
    seed: u64,
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl Board {
    /// The board of a prepared database, rebuilt from what it holds.
    pub fn open(store: Store, settings: Settings, lease_seconds: f64, seed: u64) -> Result<Self> {
        let items: Vec<Item> = store.items()?.into_iter().map(|(_, item)| item).collect();
        let scale: Scale = settings.scale.parse()?;
        let rules = Rules { task: settings.task, scale, labels: settings.labels.clone() };
        let mut board = Board {
            state: vec![ItemState::default(); items.len()],
            fresh: (1..=items.len() as i64).collect(),
            store,
            settings,
            rules,
            items,
            current: HashMap::new(),
            counts: HashMap::new(),
            in_progress: BTreeSet::new(),
            lease_seconds,
            seed,
        };
        for decided in board.store.decisions()? {
            board.record(decided.item, &decided.annotator, decided.answer.is_some());
        }
        for assigned in board.store.assignments()? {
            board.hold(assigned);
        }
        Ok(board)
    }

    /// File item `id` as fresh, in progress or complete after a change.
    fn refile(&mut self, id: i64) {
        let slot = self.slot(id);
        let complete = slot.answered.len() >= self.settings.overlap;
        let untouched = slot.answered.is_empty() && slot.skipped.is_empty() && slot.leases.is_empty();
        self.fresh.remove(&id);
        self.in_progress.remove(&id);
        if untouched {
            self.fresh.insert(id);
        } else if !complete {
            self.in_progress.insert(id);
        }
    }

    /// A decision on `id` by `annotator`: an answer, or a skip.
    fn record(&mut self, id: i64, annotator: &str, answered: bool) {
        let slot = self.slot_mut(id);
        if answered { slot.answered.push(annotator.to_string()) } else { slot.skipped.push(annotator.to_string()) }
        let counts = self.counts.entry(annotator.to_string()).or_default();
        if answered { counts.0 += 1 } else { counts.1 += 1 }
        self.refile(id);
    }

    /// Take back `annotator`'s decision on `id`.
    fn forget(&mut self, id: i64, annotator: &str) {
        let slot = self.slot_mut(id);
        let (answered, skipped) = (slot.answered.len(), slot.skipped.len());
        slot.answered.retain(|a| a != annotator);
        slot.skipped.retain(|a| a != annotator);
        let (answered, skipped) = (answered - slot.answered.len(), skipped - slot.skipped.len());
        let counts = self.counts.entry(annotator.to_string()).or_default();
        counts.0 -= answered;
        counts.1 -= skipped;
        self.refile(id);
    }

    /// `assigned.annotator` holds the item from now on.
    fn hold(&mut self, assigned: Assigned) {
        let id = assigned.item;
        self.current.insert(assigned.annotator.clone(), id);
        self.slot_mut(id).leases.push(assigned);
        self.refile(id);
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn item(&self, id: i64) -> Option<&Item> {
        usize::try_from(id).ok().and_then(|i| i.checked_sub(1)).and_then(|i| self.items.get(i))
    }

    fn slot(&self, id: i64) -> &ItemState {
        &self.state[(id - 1) as usize]
    }

    fn slot_mut(&mut self, id: i64) -> &mut ItemState {
        &mut self.state[(id - 1) as usize]
    }

    /// Answers given plus live leases held by others than `annotator`.
    fn taken(&self, id: i64, annotator: &str, now: f64) -> usize {
        let slot = self.slot(id);
        slot.answered.len() + slot.leases.iter().filter(|l| l.annotator != annotator && now - l.at < self.lease_seconds).count()
    }

    fn has_room(&self, id: i64, annotator: &str, now: f64) -> bool {
        self.taken(id, annotator, now) < self.settings.overlap
    }

    /// The letter order `annotator` sees item `id` in (rank; empty otherwise).
    pub fn shown(&self, id: i64, annotator: &str) -> Option<&[i32]> {
        self.slot(id).leases.iter().find(|l| l.annotator == annotator).map(|l| l.shown.as_slice())
    }

    /// The item `annotator` should judge now: the one they hold, else a new one; `None` when
    /// nothing is left for them.
    pub fn next(&mut self, annotator: &str, now: f64) -> Result<Option<i64>> {
        if let Some(&held) = self.current.get(annotator) {
            let live = self.slot(held).leases.iter().any(|l| l.annotator == annotator && now - l.at < self.lease_seconds);
            if live || self.has_room(held, annotator, now) {
                return Ok(Some(held));
            }
            self.store.unassign(held, annotator)?;
            self.release(held, annotator);
        }
        let best = self
            .in_progress
            .iter()
            .copied()
            .filter(|&id| self.open_to(id, annotator, now))
            .chain(self.fresh.first().copied())
            .max_by_key(|&id| (self.taken(id, annotator, now), std::cmp::Reverse(id)));
        let Some(id) = best else { return Ok(None) };
        let assigned = Assigned { item: id, annotator: annotator.to_string(), at: now, shown: self.letter_order(id, annotator) };
        self.store.assign(&assigned)?;
        self.hold(assigned);
        Ok(Some(id))
    }

    /// Whether `annotator` may be given item `id` now.
    fn open_to(&self, id: i64, annotator: &str, now: f64) -> bool {
        !self.slot(id).decided_by(annotator) && self.has_room(id, annotator, now)
    }

    fn release(&mut self, id: i64, annotator: &str) {
        self.slot_mut(id).leases.retain(|l| l.annotator != annotator);
        if self.current.get(annotator) == Some(&id) {
            self.current.remove(annotator);
        }
        self.refile(id);
    }

    /// A ranking's responses in an order of their own per annotator (recorded with the
    /// answer), so no position is favoured across annotators.
    fn letter_order(&self, id: i64, annotator: &str) -> Vec<i32> {
        let Some(Item { content: Content::Rank { responses }, key }) = self.item(id) else { return Vec::new() };
        let mut samples: Vec<i32> = responses.iter().map(|r| r.sample).collect();
        let digest = Sha256::new().chain_update(self.seed.to_le_bytes()).chain_update(annotator.as_bytes()).chain_update([0]).chain_update(key.as_bytes()).finalize();
        let seed = u64::from_le_bytes(digest[..8].try_into().unwrap_or_default());
        samples.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        samples
    }

    /// Answer, skip or undo, committed before this returns. `id` is the item the request
    /// names (`None`: undo whatever was decided last).
    pub fn decide(&mut self, annotator: &str, id: Option<i64>, body: AnswerBody, now: f64) -> std::result::Result<Done, Refused> {
        if let Some(id) = id {
            self.item(id).ok_or(Refused::NoSuchItem(id))?;
        }
        if body.undo {
            return self.undo(annotator, id, now);
        }
        let id = id.ok_or_else(|| Refused::Invalid("an answer names its item".into()))?;
        if self.current.get(annotator) != Some(&id) {
            return Err(if self.slot(id).decided_by(annotator) { Refused::AlreadyDecided(id) } else { Refused::NotYours(id) });
        }
        let shown = self.shown(id, annotator).unwrap_or_default().to_vec();
        let decision = body.decision(&self.rules, &shown).map_err(Refused::Invalid)?;
        let (answer, comment) = match decision {
            Decision::Answer { answer, comment } => (Some(answer), comment),
            Decision::Skip => (None, None),
            Decision::Undo => unreachable!("undo is handled above"),
        };
        self.store.decide(id, annotator, answer.as_ref(), comment.as_deref(), &shown)?;
        self.release(id, annotator);
        self.record(id, annotator, answer.is_some());
        Ok(Done { item: id, action: if answer.is_some() { "answered" } else { "skipped" } })
    }

    fn undo(&mut self, annotator: &str, asked: Option<i64>, now: f64) -> std::result::Result<Done, Refused> {
        let latest = self.store.latest(annotator)?.ok_or(Refused::NothingToUndo)?;
        if let Some(asked) = asked.filter(|&a| a != latest.item) {
            return Err(Refused::NotLatest { asked, latest: latest.item });
        }
        self.store.undo(&latest, now)?;
        if let Some(held) = self.current.get(annotator).copied() {
            self.release(held, annotator);
        }
        self.forget(latest.item, annotator);
        self.hold(Assigned { item: latest.item, annotator: annotator.to_string(), at: now, shown: latest.shown });
        Ok(Done { item: latest.item, action: "undone" })
    }

    pub fn progress(&self, annotator: &str, now: f64) -> Progress {
        let (answered, skipped) = self.counts.get(annotator).copied().unwrap_or_default();
        let current = self.current.get(annotator).copied();
        let open = self.in_progress.iter().filter(|&&id| current == Some(id) || self.open_to(id, annotator, now)).count();
        let held_complete = current.is_some_and(|id| !self.in_progress.contains(&id));
        Progress { annotator: annotator.to_string(), answered, skipped, left: open + self.fresh.len() + usize::from(held_complete), current }
    }

    /// Everyone who has decided or holds an item, by name.
    pub fn annotators(&self) -> Vec<String> {
        let mut names: Vec<String> = self.counts.keys().chain(self.current.keys()).cloned().collect();
        names.sort();
        names.dedup();
        names
    }

    /// Items answered by `overlap` annotators or more.
    pub fn complete(&self) -> usize {
        self.items.len() - self.fresh.len() - self.in_progress.len()
    }

    pub fn task(&self) -> Task {
        self.settings.task
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::records::ResponseRecord;

    fn response(prompt_id: &str, sample: i32) -> ResponseRecord {
        ResponseRecord::example(prompt_id, sample)
    }

    fn board(dir: &std::path::Path, task: Task, overlap: usize, lease_seconds: f64) -> Board {
        let items: Vec<Item> = match task {
            Task::Score => (0..3).map(|i| Item { key: format!("p/{i}"), content: Content::Score { response: response("p", i) } }).collect(),
            Task::Rank => vec![Item { key: "p".into(), content: Content::Rank { responses: (0..4).map(|i| response("p", i)).collect() } }],
            Task::Label => vec![Item { key: "t".into(), content: Content::Label { text: "t".into(), suggested: vec![] } }],
        };
        let mut store = Store::open(&dir.join("a.sqlite")).unwrap();
        let settings = Settings { task, scale: "1-7".into(), labels: vec!["hate".into()], overlap };
        let settings = store.prepare(&settings, Some(&items)).unwrap();
        Board::open(store, settings, lease_seconds, 1).unwrap()
    }

    fn answer(score: f64) -> AnswerBody {
        AnswerBody { score: Some(score), ..Default::default() }
    }

    #[test]
    fn overlap_never_twice_skip_and_undo() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = board(dir.path(), Task::Score, 2, 600.0);
        let now = 1000.0;
        // ana and bo get the same first item (overlap 2); cy, with it full, gets the next.
        assert_eq!(b.next("ana", now).unwrap(), Some(1));
        assert_eq!(b.next("ana", now).unwrap(), Some(1), "asking again shows the item held");
        assert_eq!(b.next("bo", now).unwrap(), Some(1));
        assert_eq!(b.next("cy", now).unwrap(), Some(2));
        assert!(matches!(b.decide("cy", Some(1), answer(3.0), now), Err(Refused::NotYours(1))), "another's item");
        assert!(matches!(b.decide("ana", Some(1), answer(9.0), now), Err(Refused::Invalid(_))));
        assert_eq!(b.decide("ana", Some(1), answer(5.0), now).unwrap(), Done { item: 1, action: "answered" });
        assert!(matches!(b.decide("ana", Some(1), answer(5.0), now), Err(Refused::AlreadyDecided(1))));
        // ana next gets item 2 (cy holds it, room for one more), never item 1 again.
        assert_eq!(b.next("ana", now).unwrap(), Some(2));
        let skip = AnswerBody { skip: true, ..Default::default() };
        assert_eq!(b.decide("bo", Some(1), skip, now).unwrap().action, "skipped");
        // bo skipped item 1: it has room again, for someone else; item 2 is held by two.
        assert_eq!(b.next("bo", now).unwrap(), Some(3));
        assert_eq!(b.next("dee", now).unwrap(), Some(1));
        // Undo: bo takes back the skip and holds item 1 again.
        let undo = || AnswerBody { undo: true, ..Default::default() };
        assert!(matches!(b.decide("bo", Some(3), undo(), now), Err(Refused::NotLatest { asked: 3, latest: 1 })));
        assert_eq!(b.decide("bo", None, undo(), now).unwrap(), Done { item: 1, action: "undone" });
        assert_eq!(b.next("bo", now).unwrap(), Some(1));
        assert!(matches!(b.decide("eve", None, undo(), now), Err(Refused::NothingToUndo)));
        let ana = b.progress("ana", now);
        assert_eq!((ana.answered, ana.skipped, ana.current), (1, 0, Some(2)));
        assert_eq!(b.complete(), 0);

        // A restarted board is the same board.
        let store = Store::open(&dir.path().join("a.sqlite")).unwrap();
        let settings = store.settings().unwrap().unwrap();
        let mut again = Board::open(store, settings, 600.0, 1).unwrap();
        assert_eq!(again.progress("ana", now), ana);
        assert_eq!(again.next("bo", now).unwrap(), Some(1));
        assert_eq!(again.annotators(), ["ana", "bo", "cy", "dee"]);
    }

    #[test]
    fn an_expired_lease_is_given_to_someone_else() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = board(dir.path(), Task::Label, 1, 10.0);
        assert_eq!(b.next("ana", 0.0).unwrap(), Some(1));
        assert_eq!(b.next("bo", 5.0).unwrap(), None, "ana's lease holds the only slot");
        assert_eq!(b.next("bo", 11.0).unwrap(), Some(1), "after it runs out");
        assert_eq!(b.next("ana", 12.0).unwrap(), None, "bo holds it now");
        assert!(matches!(b.decide("ana", Some(1), AnswerBody { labels: Some(vec![]), ..Default::default() }, 12.0), Err(Refused::NotYours(1))));
    }

    #[test]
    fn rankings_are_shown_in_an_order_of_their_own_per_annotator() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = board(dir.path(), Task::Rank, 3, 600.0);
        let orders: Vec<Vec<i32>> = ["ana", "bo", "cy"]
            .iter()
            .map(|a| {
                b.next(a, 0.0).unwrap();
                b.shown(1, a).unwrap().to_vec()
            })
            .collect();
        for order in &orders {
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2, 3]);
        }
        assert!(orders.iter().any(|o| o != &orders[0]), "shuffled per annotator: {orders:?}");
        let ranking = AnswerBody { ranking: Some("DC=BA".into()), ..Default::default() };
        b.decide("ana", Some(1), ranking, 0.0).unwrap();
        let stored = b.store().decisions().unwrap().remove(0);
        let shown = &orders[0];
        assert_eq!(stored.shown, *shown);
        let Some(crate::annotate::answer::Answer::Rank { order, .. }) = stored.answer else { panic!() };
        assert_eq!(order, vec![vec![shown[3]], vec![shown[2], shown[1]], vec![shown[0]]], "letters map to the samples shown");
    }
}
