//! Consistent hashing: a ketama-style ring and a Maglev table, both built
//! once per snapshot, plus the bounded-load walk.
//!
//! Placement depends only on the key and the backends' names and weights:
//! never on config order, process or restart (xxh3 with fixed seeds), so
//! every tether instance with one config agrees on every key.
//!
//! - **Ring**: each backend owns `weight × POINTS_PER_WEIGHT` points, the
//!   first points of its own hash sequence. Removing a backend removes only
//!   its points, so only its keys move; changing a weight adds or removes
//!   only that backend's points.
//! - **Maglev** (Eisenbud et al., NSDI 2016): a lookup table of fixed prime
//!   size filled by per-backend permutations. Near-perfect balance and an
//!   O(1) lookup; a change moves slightly more than the minimum.
//!
//! Both offer [`HashTable::candidates`]: the owner, then the next distinct
//! backends along the key's probe sequence. Failover and bounded loads walk
//! it, so they are deterministic per key too.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Ring points per unit of weight. 1024 keeps the most loaded of 50 equal
/// backends within about 1.08× the average share (measured in the tests).
pub const POINTS_PER_WEIGHT: u64 = 1024;
/// Most ring points in one pool (32 MiB). Beyond it every backend's points
/// are scaled down alike, which keeps proportions but is the one case where a
/// weight change also moves keys between other backends.
pub const MAX_RING_POINTS: u64 = 1 << 22;
/// Low bits of a ring entry that hold the backend index.
const INDEX_BITS: u32 = 16;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;
/// Most backends a pool can hash over (the ring packs indices in 16 bits).
pub const MAX_BACKENDS: usize = 1 << INDEX_BITS;

const SEED_OFFSET: u64 = 0x7465_7468_6572_6f66; // "tetherof"
const SEED_SKIP: u64 = 0x7465_7468_6572_736b; // "tethersk"

/// The hash of a request key. Fixed and well known: xxh3-64, seed 0.
pub fn hash_key(key: &[u8]) -> u64 {
    xxh3_64(key)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Ring,
    Maglev,
}

/// A consistent-hash table over one pool's backends (by index).
#[derive(Debug)]
pub struct HashTable {
    kind: Kind,
    /// Backends with weight > 0: the most distinct candidates a walk yields.
    members: usize,
    backends: usize,
}

#[derive(Debug)]
enum Kind {
    Ring(Ring),
    /// `slot → backend index`.
    Maglev(Box<[u32]>),
}

impl HashTable {
    /// Builds the table for `(name, weight)` per backend index. Weight-0
    /// backends own no keys.
    pub fn build(algorithm: Algorithm, backends: &[(&str, u32)]) -> HashTable {
        let backends = &backends[..backends.len().min(MAX_BACKENDS)];
        let members = backends.iter().filter(|(_, w)| *w > 0).count();
        let kind = match algorithm {
            Algorithm::Ring => Kind::Ring(build_ring(backends)),
            Algorithm::Maglev => Kind::Maglev(build_maglev(backends)),
        };
        HashTable { kind, members, backends: backends.len() }
    }

    /// The backend that owns `hash`, if any backend has weight.
    pub fn owner(&self, hash: u64) -> Option<usize> {
        match &self.kind {
            Kind::Ring(ring) => {
                let start = ring.start(hash)?;
                Some((ring.points[start] & INDEX_MASK) as usize)
            }
            Kind::Maglev(table) => {
                let len = table.len() as u64;
                (len > 0).then(|| table[(hash % len) as usize] as usize)
            }
        }
    }

    /// The owner of `hash`, then every other backend with weight, each once,
    /// in the key's deterministic probe order.
    pub fn candidates(&self, hash: u64) -> Candidates<'_> {
        let (entries, start): (Entries<'_>, usize) = match &self.kind {
            Kind::Ring(ring) => (Entries::Ring(&ring.points), ring.start(hash).unwrap_or(0)),
            Kind::Maglev(table) => {
                let len = table.len().max(1) as u64;
                (Entries::Maglev(table), (hash % len) as usize)
            }
        };
        Candidates { entries, start, step: 0, yielded: 0, members: self.members, seen: Seen::new(self.backends) }
    }

    /// Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam):
    /// the first usable candidate whose in-flight load stays within
    /// `c × (total + 1) × weight / total_weight`, rounded up. `total` and
    /// `total_weight` are over usable backends. Falls back to the first
    /// usable candidate if every one is full (only possible while loads
    /// change under the walk).
    #[allow(clippy::too_many_arguments)] // each input is a distinct, cheap view of pool state
    pub fn pick_bounded(
        &self,
        hash: u64,
        c: f64,
        total: u64,
        total_weight: u64,
        weight: impl Fn(usize) -> u32,
        load: impl Fn(usize) -> u64,
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let mut first = None;
        for i in self.candidates(hash).filter(|&i| usable(i)) {
            first.get_or_insert(i);
            if load(i) < capacity(c, total, weight(i), total_weight) {
                return Some(i);
            }
        }
        first
    }

    /// How many table entries or ring points each backend owns (for tests
    /// and status).
    pub fn shares(&self) -> Vec<u64> {
        let mut out = vec![0u64; self.backends];
        match &self.kind {
            Kind::Ring(Ring { points, .. }) => {
                // A point owns the arc from its predecessor up to itself.
                let mut prev = points.last().map_or(0, |p| p & !INDEX_MASK);
                for (k, p) in points.iter().enumerate() {
                    let pos = p & !INDEX_MASK;
                    let arc = if k == 0 { pos.wrapping_sub(prev) } else { pos - prev };
                    out[(p & INDEX_MASK) as usize] += arc >> INDEX_BITS;
                    prev = pos;
                }
            }
            Kind::Maglev(table) => {
                for &b in table.iter() {
                    out[b as usize] += 1;
                }
            }
        }
        out
    }
}

/// The exact share of the key space whose owner (by name) differs between
/// two tables: computed from ring arcs or Maglev slots, not sampled. Tables
/// of different kinds or Maglev sizes are compared on 100k sample keys.
pub fn moved_fraction(old: &HashTable, old_names: &[&str], new: &HashTable, new_names: &[&str]) -> f64 {
    fn name<'a>(names: &[&'a str], i: usize) -> Option<&'a str> {
        names.get(i).copied()
    }
    match (&old.kind, &new.kind) {
        (Kind::Ring(Ring { points: a, .. }), Kind::Ring(Ring { points: b, .. })) if !a.is_empty() && !b.is_empty() => {
            // Walk every breakpoint of both rings: between two consecutive
            // ones, both owners are constant.
            let pos = |p: &u64| p & !INDEX_MASK;
            let mut all: Vec<u64> = a.iter().chain(b.iter()).map(pos).collect();
            all.sort_unstable();
            all.dedup();
            let (mut ia, mut ib) = (0usize, 0usize);
            let mut moved: u128 = 0;
            let mut prev = all.last().map_or(0, |&x| x);
            for (k, &x) in all.iter().enumerate() {
                while ia < a.len() && pos(&a[ia]) < x {
                    ia += 1;
                }
                while ib < b.len() && pos(&b[ib]) < x {
                    ib += 1;
                }
                let oa = (a[ia % a.len()] & INDEX_MASK) as usize;
                let ob = (b[ib % b.len()] & INDEX_MASK) as usize;
                let len = if k == 0 { x.wrapping_sub(prev) } else { x - prev };
                // A single breakpoint owns the whole circle.
                let len = if all.len() == 1 { u128::from(u64::MAX) + 1 } else { u128::from(len) };
                if name(old_names, oa) != name(new_names, ob) {
                    moved += len;
                }
                prev = x;
            }
            moved as f64 / 2f64.powi(64)
        }
        (Kind::Maglev(a), Kind::Maglev(b)) if a.len() == b.len() && !a.is_empty() => {
            let moved = a
                .iter()
                .zip(b.iter())
                .filter(|(x, y)| name(old_names, **x as usize) != name(new_names, **y as usize))
                .count();
            moved as f64 / a.len() as f64
        }
        _ => {
            const SAMPLES: u64 = 100_000;
            let moved = (0..SAMPLES)
                .filter(|i| {
                    let h = hash_key(&i.to_le_bytes());
                    let o = old.owner(h).and_then(|i| name(old_names, i));
                    let n = new.owner(h).and_then(|i| name(new_names, i));
                    o != n
                })
                .count();
            moved as f64 / SAMPLES as f64
        }
    }
}

/// Bounded-load factors are applied in millionths: a configured `c` has a
/// few decimals, and integer arithmetic keeps ⌈c × share⌉ exact where f64
/// would not (1.1 × 50 is 55.000000000000007 in f64, which rounds up to 56).
const LOAD_FACTOR_SCALE: u128 = 1_000_000;

/// Most in-flight requests a backend may hold under bounded loads, counting
/// the request being placed: ⌈c × (total + 1) × weight / total_weight⌉, with
/// `c` taken to six decimals.
pub fn capacity(c: f64, total: u64, weight: u32, total_weight: u64) -> u64 {
    if total_weight == 0 {
        return u64::MAX;
    }
    // Saturating cast: a huge c is no bound at all, NaN is 0 (every
    // backend full, so the walk falls back to its first candidate).
    let c = (c * LOAD_FACTOR_SCALE as f64).round() as u128;
    let Some(demand) = c.checked_mul(u128::from(total) + 1).and_then(|x| x.checked_mul(u128::from(weight))) else {
        return u64::MAX;
    };
    u64::try_from(demand.div_ceil(LOAD_FACTOR_SCALE * u128::from(total_weight))).unwrap_or(u64::MAX)
}

// === ring ===

/// Average ring points per bucket of the lookup index, at most: the index
/// has a power-of-two number of buckets, at least `points / POINTS_PER_BUCKET`.
const POINTS_PER_BUCKET: usize = 4;

/// The ring's sorted points and an index over them.
///
/// A lookup takes the top bits of the hash as a bucket number, reads where
/// that bucket's points begin and end, and scans those few points: two
/// memory reads and no binary search, so at 1000 backends (a million
/// points) it costs about one cache miss instead of a dozen. The index only
/// speeds the search up; which point owns a hash is unchanged.
#[derive(Debug)]
struct Ring {
    /// Sorted `point & !INDEX_MASK | index`.
    points: Box<[u64]>,
    /// `first[j]`: index of the first point whose top bits are `j` or more;
    /// `first[buckets] = points.len()`.
    first: Box<[u32]>,
    /// `64 - log2(buckets)`.
    shift: u32,
}

impl Ring {
    fn new(points: Box<[u64]>) -> Ring {
        // At least 2 buckets so the shift stays below 64; far fewer than
        // 2^48, so the shift stays at or above INDEX_BITS and a bucket
        // number never depends on the backend-index bits.
        let buckets = (points.len() / POINTS_PER_BUCKET).next_power_of_two().max(2);
        let shift = 64 - buckets.trailing_zeros();
        let mut first = Vec::with_capacity(buckets + 1);
        let mut i = 0;
        for j in 0..buckets as u64 {
            while i < points.len() && points[i] >> shift < j {
                i += 1;
            }
            first.push(i as u32);
        }
        first.push(points.len() as u32);
        Ring { points, first: first.into_boxed_slice(), shift }
    }

    /// Index of the first point at or after `hash`, wrapping to 0.
    fn start(&self, hash: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let pos = hash & !INDEX_MASK;
        let bucket = (hash >> self.shift) as usize;
        let (lo, hi) = (self.first[bucket] as usize, self.first[bucket + 1] as usize);
        // Points of earlier buckets are below `pos`, of later ones above it.
        let i = lo + self.points[lo..hi].iter().take_while(|&&p| p & !INDEX_MASK < pos).count();
        Some(if i == self.points.len() { 0 } else { i })
    }
}

fn build_ring(backends: &[(&str, u32)]) -> Ring {
    let total_weight: u64 = backends.iter().map(|(_, w)| u64::from(*w)).sum();
    if total_weight == 0 {
        return Ring::new(Box::new([]));
    }
    let per_weight = POINTS_PER_WEIGHT.min((MAX_RING_POINTS / total_weight).max(1));
    let mut points = Vec::with_capacity((total_weight * per_weight) as usize);
    for (index, (name, weight)) in backends.iter().enumerate() {
        let base = xxh3_64(name.as_bytes());
        for k in 0..u64::from(*weight) * per_weight {
            let point = xxh3_64_with_seed(&k.to_le_bytes(), base);
            points.push((point & !INDEX_MASK) | index as u64);
        }
    }
    points.sort_unstable();
    Ring::new(points.into_boxed_slice())
}

// === maglev ===

/// Table sizes: primes, the smallest with at least 100 slots per backend
/// is used. The size depends only on the number of backends in coarse
/// steps, so adding one backend rarely changes it.
const MAGLEV_SIZES: [u64; 3] = [65_537, 131_071, 524_287];

fn maglev_size(members: usize) -> u64 {
    let want = members as u64 * 100;
    MAGLEV_SIZES.iter().copied().find(|&m| m >= want).unwrap_or(MAGLEV_SIZES[MAGLEV_SIZES.len() - 1])
}

fn build_maglev(backends: &[(&str, u32)]) -> Box<[u32]> {
    // Fill in name order so the table does not depend on config order.
    let mut order: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].1 > 0).collect();
    if order.is_empty() {
        return Box::new([]);
    }
    order.sort_by(|&a, &b| backends[a].0.cmp(backends[b].0));
    let m = maglev_size(order.len());
    let max_weight = order.iter().map(|&i| backends[i].1).max().unwrap_or(1);
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let name = backends[i].0.as_bytes();
            let offset = xxh3_64_with_seed(name, SEED_OFFSET) % m;
            let skip = xxh3_64_with_seed(name, SEED_SKIP) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; order.len()];
    let mut table = vec![u32::MAX; m as usize];
    // Takes backend `k`'s next preferred free slot.
    let mut take_turn = |k: usize, table: &mut [u32]| {
        let (offset, skip) = perms[k];
        loop {
            let slot = ((offset + next[k] * skip) % m) as usize;
            next[k] += 1;
            if table[slot] == u32::MAX {
                table[slot] = order[k] as u32;
                return;
            }
        }
    };
    // Weighted Maglev: each round a backend earns weight / max_weight of a
    // turn, so slots are filled in proportion to weight.
    let mut credit = vec![0u64; order.len()];
    let mut served = vec![false; order.len()];
    let mut unserved = order.len() as u64;
    let mut free = m;
    'fill: loop {
        for (k, &index) in order.iter().enumerate() {
            // A backend whose weight share is below one slot would earn its
            // first turn only after the table is full: keep one free slot
            // for each backend still without one (m ≥ members, so there is
            // room). In every other pool this never triggers before the
            // table is full, so the table is the plain weighted Maglev one.
            if free == unserved {
                break 'fill;
            }
            credit[k] += u64::from(backends[index].1);
            if credit[k] < u64::from(max_weight) {
                continue;
            }
            credit[k] -= u64::from(max_weight);
            take_turn(k, &mut table);
            free -= 1;
            if !served[k] {
                served[k] = true;
                unserved -= 1;
            }
        }
    }
    for k in (0..order.len()).filter(|&k| !served[k]) {
        take_turn(k, &mut table);
    }
    table.into_boxed_slice()
}

// === candidates ===

#[derive(Debug)]
enum Entries<'a> {
    Ring(&'a [u64]),
    Maglev(&'a [u32]),
}

impl Entries<'_> {
    fn len(&self) -> usize {
        match self {
            Entries::Ring(p) => p.len(),
            Entries::Maglev(t) => t.len(),
        }
    }

    fn backend(&self, i: usize) -> usize {
        match self {
            Entries::Ring(p) => (p[i] & INDEX_MASK) as usize,
            Entries::Maglev(t) => t[i] as usize,
        }
    }
}

/// Distinct backends along a key's probe sequence; see [`HashTable::candidates`].
#[derive(Debug)]
pub struct Candidates<'a> {
    entries: Entries<'a>,
    start: usize,
    step: usize,
    yielded: usize,
    members: usize,
    seen: Seen,
}

impl Iterator for Candidates<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let len = self.entries.len();
        while self.yielded < self.members && self.step < len {
            let b = self.entries.backend((self.start + self.step) % len);
            self.step += 1;
            if self.seen.insert(b) {
                self.yielded += 1;
                return Some(b);
            }
        }
        None
    }
}

/// A set of backend indices; inline (no allocation) for up to 256 backends.
#[derive(Debug)]
enum Seen {
    Inline([u64; 4]),
    Heap(Vec<u64>),
}

impl Seen {
    fn new(n: usize) -> Seen {
        if n <= 256 { Seen::Inline([0; 4]) } else { Seen::Heap(vec![0; n.div_ceil(64)]) }
    }

    /// Adds `i`; false if it was there already.
    fn insert(&mut self, i: usize) -> bool {
        let words: &mut [u64] = match self {
            Seen::Inline(w) => w,
            Seen::Heap(w) => w,
        };
        let Some(word) = words.get_mut(i / 64) else { return false };
        let bit = 1u64 << (i % 64);
        let fresh = *word & bit == 0;
        *word |= bit;
        fresh
    }
}

#[cfg(test)]
#[path = "hash_tests.rs"]
mod tests;
