//! Pure selection algorithms: no I/O, no clock, no locks, no allocation per
//! pick. Each is built once per config snapshot and asked per request.
//!
//! - [`cookie`]: the affinity cookie codec.
//! - [`hash`]: consistent hashing (ring, Maglev, bounded loads).
//! - [`RoundRobin`], [`least_conn`], [`power_of_two`]: how clients without
//!   affinity are spread. They skip backends the caller says are not
//!   eligible (down, draining, weight 0), and the survivors share in
//!   proportion to their weights. All three use the pool's smooth weighted
//!   round-robin sequence ([`RoundRobin::sequence`]): round robin walks it,
//!   least-conn breaks ties (and samples big pools) with it, power of two
//!   draws from it.

pub mod cookie;
pub mod hash;

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Longest precomputed round-robin sequence; beyond it weights are scaled down.
const MAX_SEQUENCE: usize = 1 << 16;

/// Pools of up to this many backends are scanned whole by [`least_conn`];
/// larger ones compare this many consecutive turns of the weighted
/// round-robin sequence.
pub const LEAST_CONN_WINDOW: usize = 16;

/// Smooth weighted round robin (as in nginx): weights 5,1,1 give
/// `a a b a c a a`, not `a a a a a b c`.
///
/// The smooth sequence is computed once at config load; a pick is an atomic
/// compare-and-swap and an index, so it is lock-free.
#[derive(Debug)]
pub struct RoundRobin {
    sequence: Box<[u32]>,
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new(weights: &[u32]) -> Self {
        RoundRobin { sequence: smooth_sequence(weights).into_boxed_slice(), next: AtomicUsize::new(0) }
    }

    /// One period of the smooth weighted sequence (backend indices, each
    /// appearing in proportion to its weight); empty if no backend has weight.
    pub fn sequence(&self) -> &[u32] {
        &self.sequence
    }

    /// The next eligible backend in the sequence. The turns of backends that
    /// are not eligible are skipped, not handed to their successor: the
    /// position moves past them in the same atomic step, so the survivors
    /// keep the order of the sequence with the others left out, and share in
    /// proportion to their weights (5,1,1 with the 5 down: 1:1, not 6:1).
    pub fn pick(&self, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.sequence.len();
        if len == 0 {
            return None;
        }
        let mut at = self.next.load(Ordering::Relaxed);
        loop {
            let (skipped, backend) =
                (0..len).map(|k| (k, self.sequence[at.wrapping_add(k) % len] as usize)).find(|&(_, b)| eligible(b))?;
            match self.next.compare_exchange_weak(
                at,
                at.wrapping_add(skipped + 1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(backend),
                // Another pick moved the position: redo from there.
                Err(now) => at = now,
            }
        }
    }
}

/// One period of smooth weighted round robin, weights divided by their
/// greatest common divisor (and scaled down if the period would be huge).
pub fn smooth_sequence(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().copied().filter(|&w| w > 0).fold(0, gcd);
    if g == 0 {
        return Vec::new();
    }
    let mut w: Vec<i64> = weights.iter().map(|&x| i64::from(x / g)).collect();
    let mut total: i64 = w.iter().sum();
    if total as usize > MAX_SEQUENCE {
        let scale = total as f64 / MAX_SEQUENCE as f64;
        for x in w.iter_mut().filter(|x| **x > 0) {
            *x = ((*x as f64 / scale).round() as i64).max(1);
        }
        total = w.iter().sum();
    }
    let mut current = vec![0i64; w.len()];
    let mut seq = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        seq.push(best as u32);
    }
    seq
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Is `load_a / weight_a` strictly lower than `load_b / weight_b`? (Weights
/// are positive.) Idle backends tie whatever their weights, so the
/// tie-break decides how idle traffic spreads.
fn lighter(load_a: u64, weight_a: u32, load_b: u64, weight_b: u32) -> bool {
    u128::from(load_a) * u128::from(weight_b) < u128::from(load_b) * u128::from(weight_a)
}

/// Weighted least connections (as nginx): the eligible backend with the
/// fewest in-flight requests per unit of weight.
///
/// `order` is the pool's smooth weighted sequence and `turn` a counter the
/// caller advances per pick. Ties go to the backend whose turn it is in that
/// sequence, so an idle pool (every load 0) is served in exact weighted
/// round-robin order rather than always by the heaviest backend.
///
/// Pools of up to [`LEAST_CONN_WINDOW`] backends are scanned whole: the
/// answer is the exact weighted least-loaded backend. Larger pools compare
/// only the backends of the next [`LEAST_CONN_WINDOW`] turns: a bounded,
/// weight-proportional sample that slides by one turn per pick, so every
/// backend is compared in proportion to its weight. If none of those is
/// eligible, every backend is scanned.
pub fn least_conn(
    weights: &[u32],
    order: &[u32],
    turn: usize,
    load: impl Fn(usize) -> u64,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    if order.is_empty() || weights.is_empty() {
        return None;
    }
    // (backend, its load, its weight) of the lightest so far.
    let mut best: Option<(usize, u64, u32)> = None;
    // Eligibility (several atomics on the request path) is asked only of a
    // backend that would beat the best so far.
    let consider = |best: &mut Option<(usize, u64, u32)>, i: usize| {
        let w = weights.get(i).copied().unwrap_or(0);
        if w == 0 {
            return;
        }
        let l = load(i);
        if best.is_none_or(|(_, bl, bw)| lighter(l, w, bl, bw)) && eligible(i) {
            *best = Some((i, l, w));
        }
    };
    let at = turn % order.len();
    let n = weights.len();
    if n <= LEAST_CONN_WINDOW {
        // Whose turn it is goes first and so wins ties; other ties go to
        // the first after it in index order.
        consider(&mut best, order[at] as usize);
        // (`at` is already below n when weights are equal: no division.)
        let from = if at < n { at } else { turn % n };
        (from..n).chain(0..from).for_each(|i| consider(&mut best, i));
    } else {
        let window = order[at..].iter().chain(order.iter()).take(LEAST_CONN_WINDOW);
        window.for_each(|&i| consider(&mut best, i as usize));
        if best.is_none() {
            (0..n).for_each(|i| consider(&mut best, i));
        }
    }
    best.map(|(i, _, _)| i)
}

/// Power of two choices: two distinct eligible backends, each drawn in
/// proportion to its weight (a random turn of `order`, the pool's smooth
/// weighted sequence); the one with fewer in-flight requests per unit of
/// weight wins, the first drawn on a tie. Idle pools are thus served in
/// proportion to weight, and a two-backend pool always compares both.
/// Near least-conn quality without scanning every backend.
pub fn power_of_two(
    weights: &[u32],
    order: &[u32],
    load: impl Fn(usize) -> u64,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let (len, n) = (order.len(), weights.len());
    if len == 0 {
        return None;
    }
    let usable = |i: usize| weights.get(i).is_some_and(|&w| w > 0) && eligible(i);
    let draw = || order[random_below(len)] as usize;
    // Usually the first two draws (one random number) are distinct and
    // eligible. Otherwise a few more draws find an eligible backend quickly
    // unless most are out; then the exact scan does.
    let (x, y) = random_pair_below(len);
    let (first, second) = (order[x] as usize, order[y] as usize);
    let a = if usable(first) {
        first
    } else {
        match (0..8).map(|_| draw()).find(|&i| usable(i)) {
            Some(a) => a,
            None => return least_conn(weights, order, random_below(len), load, eligible),
        }
    };
    // The second must differ from the first. If `a` holds most of the
    // weight, weighted draws rarely miss it: then any other backend, uniformly.
    let second = Some(second).filter(|&b| b != a && usable(b));
    let b = second.or_else(|| (0..4).map(|_| draw()).find(|&i| i != a && usable(i))).or_else(|| {
        let r = random_below(n.saturating_sub(1).max(1));
        let b = if r >= a { r + 1 } else { r };
        (b < n && b != a && usable(b)).then_some(b)
    });
    match b {
        Some(b) if lighter(load(b), weights[b], load(a), weights[a]) => Some(b),
        _ => Some(a),
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::thread::current().id()) | 1
}

/// xorshift64*: fast, per thread, good enough to pick between backends.
fn next_random() -> u64 {
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// A random number in `0..n` (0 if `n` is 0).
pub fn random_below(n: usize) -> usize {
    ((u128::from(next_random()) * n as u128) >> 64) as usize
}

/// Two random numbers in `0..n` from one step of the generator (its high
/// and low halves): plenty of resolution for the short sequences drawn from.
fn random_pair_below(n: usize) -> (usize, usize) {
    let r = next_random();
    let below = |half: u64| ((u128::from(half) * n as u128) >> 32) as usize;
    (below(r >> 32), below(r & 0xffff_ffff))
}

#[cfg(test)]
mod tests;
