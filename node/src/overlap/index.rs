//! The counts the overlap memory remembers and the indexes that search them. Besides the
//! released record sets it keeps *derived* counts: when a released set is nested in a
//! remembered one (or holds it), their difference is a count anyone can compute by
//! subtraction, so it is remembered too and compared like a released one — the defence against
//! differencing chains (A, then B inside A, then C within one record of A minus B). A release
//! is *explored* before it is allowed: its differences with the nested remembered counts, their
//! differences with the counts nested with them, and so on (fewest subtractions first), each
//! checked against every known count; the same exploration is then remembered.
//!
//! Derived differences are kept as references to the two remembered sets (those of at most
//! [`POSTED`] records as bitmaps), so remembering them costs a few bytes however large they
//! are. Sets a few records apart are found by size. Nested sets are found through a fixed
//! sample of record numbers (one in [`SAMPLE_ONE_IN`]): a set holding a new one holds its
//! sampled records, so per-sample lists of the sets holding each ("columns") narrow the search;
//! a set inside a new one has its key (its lowest-ranked probe record) in it, and its other
//! probes too. A new set with no sampled record is looked up in postings of the small sets,
//! record by record. An exact count settles every candidate.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use roaring::RoaringBitmap;

/// One record number in this many is sampled.
const SAMPLE_ONE_IN: u32 = 64;
/// Probe records kept per set, to reject candidates before counting: one missing from a new
/// set shows the two differ (or are not nested), so a set missing more than k-1 of them is not
/// within k-1 records.
const HEAD: usize = 32;
/// Columns intersected to find the sets holding a new one.
const MOST_COLUMNS: usize = 8;
/// Nested remembered sets a released set is differenced with (released ones first, then
/// closest first): enough for the cells and total of an ordinary table inside it.
const MOST_PARTNERS: usize = 32;
/// The same for a derived count.
const MOST_DERIVED_PARTNERS: usize = 16;
/// Subtractions a derived count may stack (each level doubles the cost of counting it).
const MOST_DEPTH: u8 = 4;
/// New counts a release's derivations are followed through (and remembered), fewest
/// subtractions first; it bounds the work one release can cause. (The release's own
/// differences beyond these are remembered too, not followed.)
const MOST_STEPS: usize = 16;
/// Record numbers per roaring container, the unit the sample grows in.
const CHUNK: u64 = 1 << 16;
/// Bitmap members of at most this many records are also listed record by record, so that the
/// sets holding a set too small to be sampled can be found.
const POSTED: u64 = 1024;
/// A set holding at least one record in this many is intersected rather than walked.
const DENSE: u64 = 16;
/// Sets this small are compared record by record (stopping at the first miss).
const FEW: u64 = 256;

/// A fixed reordering of record numbers, independent of the sample's: a set's probe records
/// are its lowest-ranked ones, so they are spread over all record numbers rather than
/// gathered at the smallest (where every large set would share them).
fn rank(record: u32) -> u32 {
    let mixed = record.wrapping_mul(0x85EB_CA6B);
    (mixed ^ (mixed >> 13)).wrapping_mul(0xC2B2_AE35)
}

/// The [`HEAD`] lowest-ranked records of `records`, lowest first.
fn head_of(records: &RoaringBitmap) -> Vec<u32> {
    let mut ranked: Vec<(u32, u32)> = records
        .iter()
        .map(|record| (rank(record), record))
        .collect();
    let most = ranked.len().min(HEAD);
    if most < ranked.len() {
        ranked.select_nth_unstable(most);
    }
    ranked.truncate(most);
    ranked.sort_unstable();
    ranked.into_iter().map(|(_, record)| record).collect()
}

/// Records two bitmaps share; a set much smaller than the other is looked up record by
/// record, since roaring's own count walks both.
fn shared_records(one: &RoaringBitmap, other: &RoaringBitmap) -> u64 {
    let (small, large) = if one.len() <= other.len() {
        (one, other)
    } else {
        (other, one)
    };
    if small.len() * 32 < large.len() {
        small
            .iter()
            .filter(|&record| large.contains(record))
            .count() as u64
    } else {
        small.intersection_len(large)
    }
}

/// Distinct records spread over `set`'s range, in order: for each of `count` evenly spaced
/// points, the first at or after it that is not taken yet (one pass over the set).
pub fn spread(set: &RoaringBitmap, count: u64) -> impl Iterator<Item = u32> + '_ {
    let first = set.min().unwrap_or(0);
    let span = u64::from(set.max().unwrap_or(0) - first);
    let mut records = set.iter();
    (0..count).map_while(move |point| {
        records.advance_to(first + (span * point / count) as u32);
        records.next()
    })
}

/// Whether two counts of `one` and `other` records sharing `shared` are 1 to `reach` records
/// apart (a `shared` worked out under a supposition that does not hold may exceed what the
/// two can share: then they are not).
pub fn apart_by_at_most(one: u64, other: u64, shared: u64, reach: u64) -> bool {
    (one + other)
        .checked_sub(2 * shared)
        .is_some_and(|distance| (1..=reach).contains(&distance))
}

/// Whether `record` is in the sample: a fixed multiplicative mix spreads consecutive numbers
/// evenly, so every set of more than a few times [`SAMPLE_ONE_IN`] records has sampled ones.
fn sampled(record: u32) -> bool {
    record.wrapping_mul(0x9E37_79B1) < u32::MAX / SAMPLE_ONE_IN
}

#[derive(Debug)]
enum Shape {
    Records(RoaringBitmap),
    /// `plus` minus `minus`, where `minus` lies inside `plus`.
    Difference {
        plus: usize,
        minus: usize,
    },
}

#[derive(Debug)]
struct Member {
    shape: Shape,
    len: u64,
    /// Probe records it holds (at most [`HEAD`]): its sampled ones, lowest [`rank`] first,
    /// then, when it has fewer, its other records in the same order. The first is its key.
    head: Vec<u32>,
    depth: u8,
}

/// Probes besides the key kept beside each member's size, so that most candidates are
/// rejected without reaching the member itself.
const BRIEF_PROBES: usize = 3;

/// A member's size and first probes, packed together for the candidate scan.
#[derive(Debug)]
struct Brief {
    len: u64,
    probes: [u32; BRIEF_PROBES],
    /// The previous member with the same key, plus one (0: none).
    next_with_key: u32,
}

/// Where one side of a derived count comes from.
#[derive(Debug, Clone, Copy)]
enum Source {
    Member(usize),
    /// An earlier step of the same exploration.
    Step(usize),
}

impl Source {
    /// The member this is once the steps are remembered (`numbers`: each step's member).
    fn number(self, numbers: &[usize]) -> usize {
        match self {
            Source::Member(member) => member,
            Source::Step(step) => numbers[step],
        }
    }
}

/// A count a release makes derivable (the first step: the released set itself).
#[derive(Debug, Clone)]
struct Step {
    records: RoaringBitmap,
    depth: u8,
    /// `plus` minus `minus`; none for the released set.
    from: Option<(Source, Source)>,
    /// The member with the same records, remembered deeper, whose depth this step lowers.
    known: Option<usize>,
}

/// What releasing a set makes derivable, found by [`SetIndex::explore`].
#[derive(Debug, Default, Clone)]
pub struct Exploration {
    steps: Vec<Step>,
    /// The members it was found among (those numbered below this).
    basis: usize,
    /// The steps followed so far, in the order they were.
    order: Vec<usize>,
    /// Whether a derivable count comes 1 to k-1 records from a known one.
    pub hazard: bool,
    /// Whether more counts were derivable than are followed (and remembered).
    cut: bool,
    /// The counts checked but not followed (beyond [`MOST_STEPS`]), not materialised.
    unfollowed: Vec<Derivation>,
    /// The index's depth lowerings when it was made.
    lowered: u64,
}

/// A difference an exploration found, before it is materialised: `plus` minus `minus`.
#[derive(Debug, Clone)]
struct Derivation {
    plus: Source,
    minus: Source,
    len: u64,
    depth: u8,
}

impl Exploration {
    /// The counts found derivable and followed (besides the released set).
    pub fn derived(&self) -> impl Iterator<Item = &RoaringBitmap> {
        self.steps.iter().skip(1).map(|step| &step.records)
    }

    /// The sizes of the counts found derivable but not followed, numbered.
    pub fn unfollowed_sizes(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.unfollowed
            .iter()
            .map(|derivation| derivation.len)
            .enumerate()
    }

    /// The shallowest step not followed yet.
    fn next_step(&self) -> Option<usize> {
        (0..self.steps.len())
            .filter(|step| !self.order.contains(step))
            .min_by_key(|&step| (self.steps[step].depth, step))
    }
}

/// A remembered set nested with a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partner {
    pub member: usize,
    /// Whether the remembered set holds the new one (otherwise it lies inside it).
    pub holds: bool,
    /// Records in one and not the other.
    pub difference: u64,
}

/// Remembered counts (released and derived) with their indexes.
#[derive(Debug, Default)]
pub struct SetIndex {
    members: Vec<Member>,
    /// Members whose depth a release lowered, counted (an exploration made before one may
    /// miss what the shallower member now makes derivable).
    lowered: u64,
    /// Parallel to `members`.
    briefs: Vec<Brief>,
    /// Cardinality → members.
    by_size: BTreeMap<u64, Vec<usize>>,
    /// Sampled record numbers below `sample_end`.
    sample: RoaringBitmap,
    sample_end: u64,
    /// One past the largest record number of any bitmap member.
    universe: u64,
    /// Sampled record → bitmap members holding it.
    columns: HashMap<u32, RoaringBitmap>,
    /// Key record (the first of its head) → its last member with that key, plus one (0:
    /// none); earlier ones are chained through [`Brief::next_with_key`]. `keys` and
    /// `key_bits` hold the keys.
    last_with_key: Vec<u32>,
    keys: RoaringBitmap,
    key_bits: Vec<u64>,
    /// Record → its last posting, plus one (0: none): the bitmap members of at most
    /// [`POSTED`] records, each record listed, earlier postings chained in `postings` as
    /// (member, earlier posting plus one).
    last_posting: Vec<u32>,
    postings: Vec<(u32, u32)>,
    /// Member → the differences taken from it (it is their `plus`).
    children: HashMap<usize, Vec<usize>>,
}

impl SetIndex {
    /// Members remembered (released and derived).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Records `member` shares with `set`.
    fn shared(&self, member: usize, set: &RoaringBitmap) -> u64 {
        match &self.members[member].shape {
            Shape::Records(records) => shared_records(records, set),
            Shape::Difference { plus, minus } => self.shared(*plus, set) - self.shared(*minus, set),
        }
    }

    /// Whether `member` holds every record of `set`.
    fn holds_all(&self, member: usize, set: &RoaringBitmap) -> bool {
        if set.len() <= FEW {
            set.iter().all(|record| self.holds_record(member, record))
        } else {
            self.shared(member, set) == set.len()
        }
    }

    /// Whether every record of `member` is in `set`.
    fn lies_in(&self, member: usize, set: &RoaringBitmap) -> bool {
        match &self.members[member].shape {
            Shape::Records(records) if records.len() <= FEW => {
                records.iter().all(|record| set.contains(record))
            }
            // Container by container, stopping at the first that is not inside.
            Shape::Records(records) => records.is_subset(set),
            _ => self.shared(member, set) == self.members[member].len,
        }
    }

    fn holds_record(&self, member: usize, record: u32) -> bool {
        match &self.members[member].shape {
            Shape::Records(records) => records.contains(record),
            Shape::Difference { plus, minus } => {
                self.holds_record(*plus, record) && !self.holds_record(*minus, record)
            }
        }
    }

    fn records(&self, member: usize) -> Cow<'_, RoaringBitmap> {
        match &self.members[member].shape {
            Shape::Records(records) => Cow::Borrowed(records),
            Shape::Difference { plus, minus } => {
                Cow::Owned(self.records(*plus).into_owned() - self.records(*minus).as_ref())
            }
        }
    }

    /// Records in `member` or `set` but not both.
    fn distance(&self, member: usize, set: &RoaringBitmap) -> u64 {
        let shared = self.shared(member, set);
        self.members[member].len + set.len() - 2 * shared
    }

    /// Whether `set` differs from a remembered count by 1 to `reach` records.
    pub fn close(&self, set: &RoaringBitmap, reach: u64) -> bool {
        self.close_by(
            set.len(),
            |record| set.contains(record),
            || spread(set, HEAD as u64).collect(),
            |member| self.shared(member, set),
            reach,
        )
    }

    /// Whether `outer` minus `inner` differs from a remembered count by 1 to `reach`
    /// records, supposing `inner` lies inside `outer` (the difference is not made).
    pub fn close_to_difference(
        &self,
        outer: &RoaringBitmap,
        inner: &RoaringBitmap,
        reach: u64,
    ) -> bool {
        self.close_by(
            outer.len().saturating_sub(inner.len()),
            |record| outer.contains(record) && !inner.contains(record),
            || {
                spread(outer, HEAD as u64)
                    .filter(|&record| !inner.contains(record))
                    .collect()
            },
            |member| {
                self.shared(member, outer)
                    .saturating_sub(self.shared(member, inner))
            },
            reach,
        )
    }

    /// Whether a count of `len` records differs from a remembered one by 1 to `reach`
    /// records: members about its size, most rejected by probes — a few of its own records
    /// (`own_records`, made when first needed) they must hold, then theirs it must hold
    /// (`holds`) — the others counted (`shared`: the records a member shares with it). Probes
    /// work both ways because a count holding most records lets most members' probes through.
    fn close_by(
        &self,
        len: u64,
        holds: impl Fn(u32) -> bool,
        own_records: impl Fn() -> Vec<u32>,
        shared: impl Fn(usize) -> u64,
        reach: u64,
    ) -> bool {
        let own = std::cell::OnceCell::new();
        let own = || own.get_or_init(&own_records);
        self.by_size
            .range(len.saturating_sub(reach)..=len.saturating_add(reach))
            .flat_map(|(_, members)| members)
            .filter(|&&member| {
                own()
                    .iter()
                    .filter(|&&record| !self.holds_record(member, record))
                    .nth(reach as usize)
                    .is_none()
            })
            .filter(|&&member| self.probes_missing_at_most(member, &holds, reach))
            .any(|&member| apart_by_at_most(self.members[member].len, len, shared(member), reach))
    }

    /// Whether a member has `size` records give or take `reach`.
    pub fn has_size_near(&self, size: u64, reach: u64) -> bool {
        self.by_size
            .range(size.saturating_sub(reach)..=size.saturating_add(reach))
            .next()
            .is_some()
    }

    /// Whether exactly this set's count is remembered (released or derived).
    pub fn holds(&self, set: &RoaringBitmap) -> bool {
        self.find(set).is_some()
    }

    /// Whether exactly this set was released (not only derived).
    pub fn released(&self, set: &RoaringBitmap) -> bool {
        self.find(set)
            .is_some_and(|member| self.members[member].depth == 0)
    }

    /// The member with exactly this set's records, the shallowest if several.
    fn find(&self, set: &RoaringBitmap) -> Option<usize> {
        self.by_size
            .get(&set.len())?
            .iter()
            .copied()
            .filter(|&member| {
                self.misses_at_most(member, set, 0) && self.distance(member, set) == 0
            })
            .min_by_key(|&member| self.members[member].depth)
    }

    /// `set`'s sampled records (the sample reaches past every member's records).
    fn sampled_part(&self, set: &RoaringBitmap) -> RoaringBitmap {
        set & &self.sample
    }

    /// Whether `member` may be differenced with a set of an answer whose sets are numbered from
    /// `before`: it was remembered before the answer, or derived (from an earlier answer's
    /// sets, or from another value of this answer, which a reader can subtract too). Two
    /// values of one answer are left to the answer's own rules.
    fn usable(&self, member: usize, before: usize) -> bool {
        member < before || self.members[member].depth > 0
    }

    /// Remembered sets (usable from `before`) holding `set` with more records.
    fn holding(&self, set: &RoaringBitmap, before: usize) -> Vec<usize> {
        let size = set.len();
        let Some(largest) = set.max() else {
            return Vec::new();
        };
        if u64::from(largest) >= self.universe {
            return Vec::new();
        }
        let is_holder = |member: usize| {
            self.usable(member, before)
                && self.members[member].len > size
                && self.holds_all(member, set)
        };
        // A few of its sampled records, found by walking it (cheaper than intersecting it with
        // the whole sample when only the first few are needed).
        let probes: Vec<u32> = set
            .iter()
            .filter(|&record| sampled(record))
            .take(MOST_COLUMNS)
            .collect();
        let mut candidates = if probes.is_empty() {
            set.min()
                .map(|first| self.posted(first))
                .unwrap_or_default()
        } else {
            self.candidates_by_probes(&probes)
        };
        if probes.is_empty() {
            // The postings hold only small sets: test the large ones one by one too (for a
            // small set each stops at the first record it lacks).
            candidates.extend(
                self.by_size
                    .range(POSTED + 1..)
                    .flat_map(|(_, members)| members)
                    .copied()
                    .filter(|&member| matches!(self.members[member].shape, Shape::Records(_))),
            );
        }
        let mut found: Vec<usize> = candidates
            .into_iter()
            .filter(|&member| is_holder(member))
            .collect();
        self.add_holding_children(&mut found, before, size, |minus| {
            self.shared(minus, set) == 0
        });
        found
    }

    /// Candidate holders of a set from some of its records: the intersection of the columns
    /// of `probes` when they are sampled; else the small sets posted under the first one.
    fn candidates_by_probes(&self, probes: &[u32]) -> Vec<usize> {
        match probes.first() {
            None => Vec::new(),
            Some(&first) if !sampled(first) => self.posted(first),
            Some(_) => {
                let mut records = probes.iter();
                let mut candidates = records
                    .next()
                    .and_then(|record| self.columns.get(record))
                    .cloned()
                    .unwrap_or_default();
                for record in records {
                    if candidates.is_empty() {
                        break;
                    }
                    match self.columns.get(record) {
                        Some(column) => candidates &= column,
                        None => candidates.clear(),
                    }
                }
                candidates.iter().map(|member| member as usize).collect()
            }
        }
    }

    /// The small sets (at most [`POSTED`] records) holding `record`. A chain through a set too
    /// small to be sampled needs an outer set below [`POSTED`] (two such sets and fewer than k
    /// records more), where the postings find it.
    fn posted(&self, record: u32) -> Vec<usize> {
        let mut found = Vec::new();
        let mut next = self.last_posting.get(record as usize).copied().unwrap_or(0);
        while next > 0 {
            let (member, earlier) = self.postings[next as usize - 1];
            found.push(member as usize);
            next = earlier;
        }
        found
    }

    /// Adds to the holders in `found` the differences taken from them (usable from
    /// `before`, larger than `size`) that hold the set too: those whose subtracted member
    /// shares none of its records (`disjoint`).
    fn add_holding_children(
        &self,
        found: &mut Vec<usize>,
        before: usize,
        size: u64,
        disjoint: impl Fn(usize) -> bool,
    ) {
        let mut next = 0;
        while next < found.len() {
            let parent = found[next];
            next += 1;
            for &child in self.children.get(&parent).into_iter().flatten() {
                let Shape::Difference { minus, .. } = self.members[child].shape else {
                    continue;
                };
                if self.usable(child, before)
                    && self.members[child].len > size
                    && !found.contains(&child)
                    && disjoint(minus)
                {
                    found.push(child);
                }
            }
        }
    }

    /// Whether at most `most` of `member`'s probe records are missing from `set` (stopping at
    /// the first one more).
    fn misses_at_most(&self, member: usize, set: &RoaringBitmap, most: u64) -> bool {
        self.probes_missing_at_most(member, |record| set.contains(record), most)
    }

    /// Whether at most `most` of `member`'s probe records fail `holds` (stopping at the first
    /// one more).
    fn probes_missing_at_most(
        &self,
        member: usize,
        holds: impl Fn(u32) -> bool,
        most: u64,
    ) -> bool {
        self.members[member]
            .head
            .iter()
            .filter(|&&record| !holds(record))
            .nth(most as usize)
            .is_none()
    }

    fn is_key(&self, record: u32) -> bool {
        self.key_bits
            .get(record as usize / 64)
            .is_some_and(|word| word & (1 << (record % 64)) != 0)
    }

    /// The members' keys among `set`'s records (those of a set made of disjoint parts are
    /// their parts' keys together): a dense set is intersected with the keys (roaring tests
    /// each key against its bitmap containers); a sparse one is walked, testing each record
    /// against the keys' bits.
    pub fn keys_in(&self, set: &RoaringBitmap) -> Vec<u32> {
        if set.len().saturating_mul(DENSE) >= self.universe {
            (&self.keys & set).iter().collect()
        } else {
            set.iter().filter(|&record| self.is_key(record)).collect()
        }
    }

    /// Remembered sets (usable from `before`) that may lie inside `set` with fewer records
    /// (their key and first probes are in it), closest in size first; not yet verified.
    /// `keys`: the keys among its records, when known.
    fn maybe_inside<'a>(
        &'a self,
        set: &'a RoaringBitmap,
        before: usize,
        keys: Option<&[u32]>,
    ) -> Box<dyn Iterator<Item = usize> + 'a> {
        let size = set.len();
        let may_lie_inside = move |member: usize| {
            let brief = &self.briefs[member];
            self.usable(member, before)
                && brief.len < size
                && brief.probes.iter().all(|&record| set.contains(record))
        };
        if size.saturating_mul(2) >= self.universe {
            // A set of most records holds the keys of most members: walk them by size,
            // largest first, so that the search stops at the closest.
            return Box::new(
                self.by_size
                    .range(..size)
                    .rev()
                    .flat_map(|(_, members)| members.iter().copied())
                    .filter(move |&member| {
                        self.members[member]
                            .head
                            .first()
                            .is_some_and(|&key| set.contains(key))
                            && may_lie_inside(member)
                    }),
            );
        }
        // Otherwise through the keys it holds (given, or found now).
        let keys = match keys {
            Some(keys) => Cow::Borrowed(keys),
            None => Cow::Owned(self.keys_in(set)),
        };
        let mut found: Vec<usize> = Vec::new();
        for &record in keys.iter() {
            let mut next = self.last_with_key[record as usize];
            while next > 0 {
                let member = next as usize - 1;
                next = self.briefs[member].next_with_key;
                if may_lie_inside(member) {
                    found.push(member);
                }
            }
        }
        found.sort_unstable_by_key(|&member| (size - self.members[member].len, member));
        found.dedup();
        Box::new(found.into_iter())
    }

    /// Remembered sets (usable from `before`) nested with `set` whose difference with it
    /// may be remembered: at most `most`, released ones first, then smallest
    /// difference first. `keys`: the keys among its records, when known ([`Self::keys_in`]).
    pub fn partners(
        &self,
        set: &RoaringBitmap,
        before: usize,
        most: usize,
        keys: Option<&[u32]>,
    ) -> Vec<Partner> {
        if set.is_empty() || self.members.is_empty() {
            return Vec::new();
        }
        let size = set.len();
        let shallow = |member: &usize| self.members[*member].depth < MOST_DEPTH;
        // Released counts before derived ones (derived counts come in families of similar
        // size that would crowd out the released set completing a chain), then closest first.
        let rank = |partner: &Partner| {
            (
                self.members[partner.member].depth > 0,
                partner.difference,
                partner.member,
            )
        };
        let mut partners: Vec<Partner> = self
            .holding(set, before)
            .into_iter()
            .filter(shallow)
            .map(|member| Partner {
                member,
                holds: true,
                difference: self.members[member].len - size,
            })
            .collect();
        partners.sort_by_key(rank);
        partners.truncate(most);
        // Sets inside it are verified closest first, only until no better ones could be kept:
        // as many released sets at most as far.
        let inside = self
            .maybe_inside(set, before, keys)
            .filter(shallow)
            .map(|member| (size - self.members[member].len, member));
        let mut kept: Vec<Partner> = Vec::new();
        for (difference, member) in inside {
            let better = partners
                .iter()
                .chain(&kept)
                .filter(|partner| {
                    self.members[partner.member].depth == 0 && partner.difference <= difference
                })
                .count();
            if better >= most {
                break;
            }
            if self.misses_at_most(member, set, 0) && self.lies_in(member, set) {
                kept.push(Partner {
                    member,
                    holds: false,
                    difference,
                });
            }
        }
        partners.extend(kept);
        partners.sort_by_key(rank);
        partners.truncate(most);
        partners
    }

    /// What releasing `set` makes derivable from the members usable from `before`: the
    /// counts a reader gets by subtracting it from the nested remembered counts (or them from
    /// it), then by subtracting those from the counts nested with them, and so on, up to
    /// [`MOST_DEPTH`] stacked subtractions, fewest first. At most [`MOST_STEPS`] new counts
    /// are followed (and remembered); the counts derivable from those are still checked. A
    /// count remembered already is not derived again, unless this way takes fewer
    /// subtractions (then its depth is lowered and it is followed further).
    ///
    /// With `reach`, the exploration stops at a *hazard*: `set`, or a count it makes
    /// derivable, comes 1 to `reach` records from a remembered count or from another count of
    /// the exploration, or is itself that small. `keys`: the keys among `set`'s records, when
    /// known ([`Self::keys_in`]).
    pub fn explore(
        &self,
        set: &RoaringBitmap,
        before: usize,
        reach: Option<u64>,
        keys: Option<&[u32]>,
    ) -> Exploration {
        let known = self.find(set);
        if set.is_empty() || known.is_some_and(|member| self.members[member].depth == 0) {
            return Exploration {
                basis: before,
                lowered: self.lowered,
                ..Exploration::default()
            };
        }
        let mut exploration = Exploration {
            steps: vec![Step {
                records: set.clone(),
                depth: 0,
                from: None,
                known,
            }],
            basis: before,
            lowered: self.lowered,
            ..Exploration::default()
        };
        if let Some(reach) = reach
            && known.is_none()
            && self.close(set, reach)
        {
            exploration.hazard = true;
            return exploration;
        }
        // Fewest subtractions first: a count reached again is reached no shallower, unless it
        // is still waiting, so every count is followed at its least depth.
        while let Some(step) = exploration.next_step() {
            exploration.order.push(step);
            let keys = if step == 0 { keys } else { None };
            for derivation in self.derivations(&exploration, step, before, keys) {
                let (len, depth) = (derivation.len, derivation.depth);
                if len == 0 {
                    continue;
                }
                // Most differences have no remembered count or step near their size: those are
                // checked without being materialised.
                let reach_or_0 = reach.unwrap_or(0);
                let members = self.near_derivation(&exploration, &derivation, reach_or_0);
                let steps: Vec<usize> = (0..exploration.steps.len())
                    .filter(|&step| {
                        exploration.steps[step].records.len().abs_diff(len) <= reach_or_0
                    })
                    .collect();
                let records = (!members.is_empty() || !steps.is_empty())
                    .then(|| self.materialise(&exploration, &derivation));
                let distances_to_steps: Vec<(usize, u64)> = records
                    .iter()
                    .flat_map(|records| {
                        steps.iter().map(|&step| {
                            let distance = exploration.steps[step]
                                .records
                                .symmetric_difference_len(records);
                            (step, distance)
                        })
                    })
                    .collect();
                let from = Some((derivation.plus, derivation.minus));
                if let Some(&(reached, _)) = distances_to_steps.iter().find(|&&(_, d)| d == 0) {
                    let reached = &mut exploration.steps[reached];
                    if depth < reached.depth {
                        reached.depth = depth;
                        reached.from = from;
                    }
                    continue;
                }
                let distances: Vec<(usize, u64)> = records
                    .iter()
                    .flat_map(|records| {
                        members
                            .iter()
                            .map(|&member| (member, self.distance(member, records)))
                    })
                    .collect();
                let known = distances
                    .iter()
                    .filter(|&&(_, distance)| distance == 0)
                    .map(|&(member, _)| member)
                    .min_by_key(|&member| self.members[member].depth);
                if known.is_some_and(|member| self.members[member].depth <= depth) {
                    continue;
                }
                let close = |distance: u64| (1..=reach_or_0).contains(&distance);
                if reach.is_some()
                    && known.is_none()
                    && (close(len)
                        || distances.iter().any(|&(_, distance)| close(distance))
                        || distances_to_steps
                            .iter()
                            .any(|&(_, distance)| close(distance)))
                {
                    exploration.hazard = true;
                    return exploration;
                }
                if exploration.steps.len() > MOST_STEPS {
                    // Checked, but not followed further nor remembered.
                    exploration.cut = true;
                    exploration.unfollowed.push(derivation);
                    continue;
                }
                let records =
                    records.unwrap_or_else(|| self.materialise(&exploration, &derivation));
                exploration.steps.push(Step {
                    records,
                    depth,
                    from,
                    known,
                });
            }
        }
        exploration
    }

    /// The differences of step number `step` with the members (usable from `before`)
    /// nested with it and with the earlier steps nested with it, not yet materialised (`keys`:
    /// the keys among its records, when known).
    fn derivations(
        &self,
        exploration: &Exploration,
        step: usize,
        before: usize,
        keys: Option<&[u32]>,
    ) -> Vec<Derivation> {
        let this = &exploration.steps[step];
        if this.depth >= MOST_DEPTH {
            return Vec::new();
        }
        // A derived count may be differenced with every remembered count, this answer's
        // values included; a value only with what was remembered before its answer.
        let (usable_from, most) = if this.depth == 0 {
            (before, MOST_PARTNERS)
        } else {
            (usize::MAX, MOST_DERIVED_PARTNERS)
        };
        let partners = self.partners(&this.records, usable_from, most, keys);
        let mut found: Vec<Derivation> = partners
            .iter()
            .map(|partner| {
                let (member, step) = (Source::Member(partner.member), Source::Step(step));
                let (plus, minus) = if partner.holds {
                    (member, step)
                } else {
                    (step, member)
                };
                Derivation {
                    plus,
                    minus,
                    len: partner.difference,
                    depth: this.depth.max(self.members[partner.member].depth) + 1,
                }
            })
            .collect();
        for &earlier in &exploration.order {
            let other = &exploration.steps[earlier];
            let (outer, inner) = match other.records.len().cmp(&this.records.len()) {
                std::cmp::Ordering::Greater => ((other, earlier), (this, step)),
                std::cmp::Ordering::Less => ((this, step), (other, earlier)),
                std::cmp::Ordering::Equal => continue,
            };
            if other.depth < MOST_DEPTH && inner.0.records.is_subset(&outer.0.records) {
                found.push(Derivation {
                    plus: Source::Step(outer.1),
                    minus: Source::Step(inner.1),
                    len: outer.0.records.len() - inner.0.records.len(),
                    depth: this.depth.max(other.depth) + 1,
                });
            }
        }
        found
    }

    fn source_holds(&self, exploration: &Exploration, source: Source, record: u32) -> bool {
        match source {
            Source::Member(member) => self.holds_record(member, record),
            Source::Step(step) => exploration.steps[step].records.contains(record),
        }
    }

    /// The members of `derivation`'s size give or take `reach` that pass a probe filter for
    /// it (at most `reach` of their probes missing from it).
    fn near_derivation(
        &self,
        exploration: &Exploration,
        derivation: &Derivation,
        reach: u64,
    ) -> Vec<usize> {
        let holds = |record: u32| {
            self.source_holds(exploration, derivation.plus, record)
                && !self.source_holds(exploration, derivation.minus, record)
        };
        let len = derivation.len;
        self.by_size
            .range(len.saturating_sub(reach)..=len.saturating_add(reach))
            .flat_map(|(_, members)| members.iter().copied())
            .filter(|&member| self.probes_missing_at_most(member, holds, reach))
            .collect()
    }

    /// The records of unfollowed count number `number` of `exploration`.
    pub fn unfollowed(&self, exploration: &Exploration, number: usize) -> RoaringBitmap {
        self.materialise(exploration, &exploration.unfollowed[number])
    }

    fn materialise(&self, exploration: &Exploration, derivation: &Derivation) -> RoaringBitmap {
        let records = |source| match source {
            Source::Member(member) => self.records(member),
            Source::Step(step) => Cow::Borrowed(&exploration.steps[step].records),
        };
        records(derivation.plus).as_ref() - records(derivation.minus).as_ref()
    }

    /// Remembers a released set and what it makes derivable from the members usable from
    /// `batch_start` (where its answer's sets begin: they are not differenced with each
    /// other, but what they derived is). The
    /// exploration made when the release was checked is used when it was made among the same
    /// members; otherwise the set is explored again. Whether it made more counts derivable
    /// than are followed.
    pub fn insert(
        &mut self,
        set: RoaringBitmap,
        batch_start: usize,
        explored: Option<Exploration>,
    ) -> bool {
        // The check's exploration saw none of this answer's sets: it still holds if they
        // cannot be differenced with it — none was remembered yet, or they derived nothing and
        // it derives nothing (a value is differenced with the counts derived from the others,
        // a derived count with the others themselves).
        let answer = batch_start..self.members.len();
        let derived_in_answer = answer.clone().any(|member| self.members[member].depth > 0);
        let exploration = explored
            .filter(|exploration| {
                exploration.basis == batch_start
                    && exploration.lowered == self.lowered
                    && (answer.is_empty()
                        || (!derived_in_answer && exploration.derived().next().is_none()))
                    && !exploration.hazard
                    && exploration
                        .steps
                        .first()
                        .is_some_and(|first| first.records == set)
            })
            .unwrap_or_else(|| self.explore(&set, batch_start, None, None));
        let cut = exploration.cut;
        self.commit(exploration);
        cut
    }

    /// Remembers the counts of an exploration (its first step is the released set), each
    /// after the steps it is derived from.
    fn commit(&mut self, exploration: Exploration) {
        let Exploration {
            steps,
            mut order,
            unfollowed,
            ..
        } = exploration;
        let waiting: Vec<usize> = (0..steps.len())
            .filter(|step| !order.contains(step))
            .collect();
        order.extend(waiting);
        let mut steps: Vec<Option<Step>> = steps.into_iter().map(Some).collect();
        let mut numbers: Vec<usize> = vec![usize::MAX; steps.len()];
        for index in order {
            let Some(step) = steps[index].take() else {
                continue;
            };
            let number = match (step.known, step.from) {
                (Some(member), _) => {
                    self.members[member].depth = step.depth;
                    self.lowered += 1;
                    member
                }
                (None, None) => self.push_records(step.records, step.depth),
                (None, Some((plus, minus))) => {
                    let (plus, minus) = (plus.number(&numbers), minus.number(&numbers));
                    self.push_derived(plus, minus, step.records, step.depth)
                }
            };
            numbers[index] = number;
        }
        // The release's own differences with remembered sets that were checked but not
        // followed are remembered too (not followed further), so that a later value close to
        // one of them is seen.
        for derivation in unfollowed.into_iter().filter(|found| found.depth == 1) {
            let (plus, minus) = (
                derivation.plus.number(&numbers),
                derivation.minus.number(&numbers),
            );
            let records = self.records(plus).into_owned() - self.records(minus).as_ref();
            match self.find(&records) {
                None => {
                    self.push_derived(plus, minus, records, 1);
                }
                // Known deeper: it is now one subtraction away, so later releases subtract it.
                Some(member) if self.members[member].depth > 1 => {
                    self.members[member].depth = 1;
                    self.lowered += 1;
                }
                Some(_) => {}
            }
        }
    }

    /// Remembers `records`, `plus` minus `minus`: by reference, probed by the records of its
    /// larger set's probes that it keeps; when it keeps none, or is small (to be posted), as
    /// a bitmap.
    fn push_derived(
        &mut self,
        plus: usize,
        minus: usize,
        records: RoaringBitmap,
        depth: u8,
    ) -> usize {
        let head: Vec<u32> = self.members[plus]
            .head
            .iter()
            .copied()
            .filter(|&record| !self.holds_record(minus, record))
            .collect();
        let len = records.len();
        if head.is_empty() || len <= POSTED {
            return self.push_records(records, depth);
        }
        let member = self.push(Shape::Difference { plus, minus }, len, head, depth);
        self.children.entry(plus).or_default().push(member);
        member
    }

    fn grow_sample(&mut self, upto: u64) {
        while self.sample_end < upto {
            let start = self.sample_end;
            let end = (start + CHUNK).min(u64::from(u32::MAX) + 1);
            self.sample.extend(
                (start..end)
                    .map(|record| record as u32)
                    .filter(|&record| sampled(record)),
            );
            self.sample_end = end;
        }
    }

    fn push(&mut self, shape: Shape, len: u64, head: Vec<u32>, depth: u8) -> usize {
        let member = self.members.len();
        self.by_size.entry(len).or_default().push(member);
        if let Some(&key) = head.first() {
            self.keys.insert(key);
            let word = key as usize / 64;
            if self.key_bits.len() <= word {
                self.key_bits.resize(word + 1, 0);
            }
            self.key_bits[word] |= 1 << (key % 64);
        }
        // Its next probes, padded with its key (every candidate holds that).
        let mut probes = [head.first().copied().unwrap_or(0); BRIEF_PROBES];
        for (probe, &record) in probes.iter_mut().zip(head.iter().skip(1)) {
            *probe = record;
        }
        let next_with_key = match head.first() {
            Some(&key) => {
                let key = key as usize;
                if self.last_with_key.len() <= key {
                    self.last_with_key.resize(key + 1, 0);
                }
                std::mem::replace(&mut self.last_with_key[key], member as u32 + 1)
            }
            None => 0,
        };
        self.briefs.push(Brief {
            len,
            probes,
            next_with_key,
        });
        self.members.push(Member {
            shape,
            len,
            head,
            depth,
        });
        member
    }

    fn push_records(&mut self, records: RoaringBitmap, depth: u8) -> usize {
        if let Some(largest) = records.max() {
            self.universe = self.universe.max(u64::from(largest) + 1);
            self.grow_sample(self.universe);
        }
        let sampled = self.sampled_part(&records);
        let member = self.members.len();
        if records.len() <= POSTED {
            for record in &records {
                let slot = record as usize;
                if self.last_posting.len() <= slot {
                    self.last_posting.resize(slot + 1, 0);
                }
                let earlier = self.last_posting[slot];
                self.postings.push((member as u32, earlier));
                self.last_posting[slot] = self.postings.len() as u32;
            }
        }
        for record in &sampled {
            self.columns
                .entry(record)
                .or_default()
                .insert(member as u32);
        }
        // Its sampled records first (the key is one when it has any), then, when there are too
        // few of them to reject most candidates, its other records.
        let mut head = head_of(&sampled);
        if head.len() < HEAD {
            head.extend(
                head_of(&(&records - &sampled))
                    .into_iter()
                    .take(HEAD - head.len()),
            );
        }
        let len = records.len();
        self.push(Shape::Records(records), len, head, depth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(range: std::ops::Range<u32>) -> RoaringBitmap {
        range.collect()
    }

    fn scattered(count: u32, stride: u32, offset: u32) -> RoaringBitmap {
        (0..count).map(|step| offset + step * stride).collect()
    }

    fn index_of(sets: Vec<RoaringBitmap>) -> SetIndex {
        let mut index = SetIndex::default();
        for set in sets {
            let start = index.len();
            index.insert(set, start, None);
        }
        index
    }

    #[test]
    fn the_sample_takes_about_one_record_in_sample_one_in() {
        let taken = (0..1_000_000u32).filter(|&record| sampled(record)).count();
        let expected = 1_000_000 / SAMPLE_ONE_IN as usize;
        assert!(taken.abs_diff(expected) < expected / 20, "{taken}");
    }

    #[test]
    fn nested_sets_are_found_in_both_directions() {
        let (outer, inner) = (scattered(50_000, 7, 3), scattered(20_000, 7, 3));
        let index = index_of(vec![outer.clone()]);
        let found = index.partners(&inner, index.len(), MOST_PARTNERS, None);
        assert_eq!(found.len(), 1, "the outer set holds the inner one");
        assert!(found[0].holds);
        assert_eq!(found[0].difference, outer.len() - inner.len());

        let index = index_of(vec![inner.clone()]);
        let found = index.partners(&outer, index.len(), MOST_PARTNERS, None);
        assert_eq!(found.len(), 1, "the inner set lies inside the outer one");
        assert!(!found[0].holds);
        assert_eq!(found[0].difference, outer.len() - inner.len());
    }

    #[test]
    fn sets_too_small_to_be_sampled_are_found_in_both_directions() {
        let (outer, inner) = (set(100..140), set(110..125));
        assert!(outer.iter().all(|record| !sampled(record)));
        let index = index_of(vec![inner.clone()]);
        let found = index.partners(&outer, index.len(), MOST_PARTNERS, None);
        assert_eq!(
            found.len(),
            1,
            "a remembered small set inside a new one is found"
        );
        assert!(!found[0].holds);
        let index = index_of(vec![outer]);
        let found = index.partners(&inner, index.len(), MOST_PARTNERS, None);
        assert_eq!(
            found.len(),
            1,
            "a remembered small set holding a new one is found"
        );
        assert!(found[0].holds);
    }

    #[test]
    fn an_unsampled_set_is_found_inside_a_large_one() {
        let outer = scattered(50_000, 7, 3);
        let unsampled = |count: usize| -> RoaringBitmap {
            outer
                .iter()
                .filter(|&record| !sampled(record))
                .take(count)
                .collect()
        };
        let index = index_of(vec![outer.clone()]);
        for count in [3, 20, 300] {
            let found = index.partners(&unsampled(count), index.len(), MOST_PARTNERS, None);
            assert_eq!(found.len(), 1, "{count} records");
            assert!(found[0].holds);
        }
    }

    #[test]
    fn sets_that_overlap_without_nesting_are_not_partners() {
        let index = index_of(vec![scattered(50_000, 3, 0), set(100..140)]);
        let mut overlapping = scattered(20_000, 3, 0);
        overlapping.insert(1);
        assert!(
            index
                .partners(&overlapping, index.len(), MOST_PARTNERS, None)
                .is_empty()
        );
        assert!(
            index
                .partners(&set(130..150), index.len(), MOST_PARTNERS, None)
                .is_empty()
        );
    }

    #[test]
    fn the_difference_of_a_nested_pair_is_remembered_and_compared() {
        // A (1,000 records), then B inside A (600): A minus B (400) is now known.
        let a = set(0..1000);
        let b = set(0..600);
        let index = index_of(vec![a, b]);
        assert_eq!(index.len(), 3, "A, B and A minus B");
        assert!(index.holds(&set(600..1000)));
        // C, 399 of A minus B's 400 records, would reveal one record by a third subtraction.
        assert!(index.close(&set(600..999), 9));
        assert!(!index.close(&set(600..990), 9), "ten records apart is fine");
    }

    #[test]
    fn a_release_completing_a_chain_is_a_hazard_before_it_is_remembered() {
        // A, and C within one record of A's upper part: B = A's lower part completes A - B - C.
        let index = index_of(vec![set(0..1000), set(600..999)]);
        let hazard =
            |released: RoaringBitmap| index.explore(&released, index.len(), Some(9), None).hazard;
        assert!(hazard(set(0..600)));
        assert!(!hazard(set(0..500)), "A minus this is far from C");
    }

    #[test]
    fn large_differences_are_kept_by_reference_and_chains_go_on_through_them() {
        let a = scattered(200_000, 3, 0);
        let b = scattered(100_000, 3, 0);
        let mut index = index_of(vec![a.clone(), b.clone()]);
        let derived = index.len() - 1;
        assert!(matches!(
            index.members[derived].shape,
            Shape::Difference { .. }
        ));
        let a_minus_b = a.clone() - &b;
        assert!(index.holds(&a_minus_b));
        // C inside A minus B, far from it: (A - B) - C is remembered too, then D within one
        // record of it is a hazard.
        let c = scattered(50_000, 3, 300_000);
        assert!(
            index
                .partners(&c, index.len(), MOST_PARTNERS, None)
                .iter()
                .any(|p| p.member == derived)
        );
        let start = index.len();
        index.insert(c.clone(), start, None);
        let rest = a_minus_b - &c;
        assert!(index.holds(&rest));
        let mut almost = rest.clone();
        almost.remove(rest.max().unwrap());
        assert!(index.close(&almost, 9));
    }

    #[test]
    fn sets_of_one_answer_do_not_derive_from_each_other() {
        let mut index = SetIndex::default();
        index.insert(set(0..1000), 0, None);
        index.insert(set(0..600), 0, None);
        assert_eq!(index.len(), 2);
    }
}
