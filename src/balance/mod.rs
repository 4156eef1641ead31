//! Pure selection algorithms: no I/O, no clock, no locks, no allocation per
//! pick. Each is built once per config snapshot and asked per request.
//!
//! - [`cookie`]: the affinity cookie codec.
//! - [`hash`]: consistent hashing (ring, Maglev, bounded loads).
//! - [`RoundRobin`], [`least_conn`], [`power_of_two`]: how clients without
//!   affinity are spread. They skip backends the caller says are not
//!   eligible (down, draining, weight 0).

pub mod cookie;
pub mod hash;

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Longest precomputed round-robin sequence; beyond it weights are scaled down.
const MAX_SEQUENCE: usize = 1 << 16;

/// Smooth weighted round robin (as in nginx): weights 5,1,1 give
/// `a a b a c a a`, not `a a a a a b c`.
///
/// The smooth sequence is computed once at config load; a pick is one
/// atomic increment and an index, so it is lock-free.
#[derive(Debug)]
pub struct RoundRobin {
    sequence: Box<[u32]>,
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new(weights: &[u32]) -> Self {
        RoundRobin { sequence: smooth_sequence(weights).into_boxed_slice(), next: AtomicUsize::new(0) }
    }

    /// The next eligible backend in the sequence. A backend that is not
    /// eligible passes its turn to the next one.
    pub fn pick(&self, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.sequence.len();
        if len == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..len).map(|i| self.sequence[(start.wrapping_add(i)) % len] as usize).find(|&b| eligible(b))
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

/// Is `load_a / weight_a` lower than `load_b / weight_b`? Counts the
/// request being placed (+1), so an idle heavy backend beats an idle light one.
fn lighter(load_a: u64, weight_a: u32, load_b: u64, weight_b: u32) -> bool {
    u128::from(load_a + 1) * u128::from(weight_b) < u128::from(load_b + 1) * u128::from(weight_a)
}

/// Least connections, weighted: the eligible backend with the fewest
/// in-flight requests per unit of weight. Ties go to the first one after
/// `start`, so callers rotate `start` to spread ties.
pub fn least_conn(
    weights: &[u32],
    start: usize,
    load: impl Fn(usize) -> u64,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let n = weights.len();
    let mut best: Option<(usize, u64)> = None;
    for k in 0..n {
        let i = (start.wrapping_add(k)) % n;
        if weights[i] == 0 || !eligible(i) {
            continue;
        }
        let l = load(i);
        match best {
            Some((b, bl)) if !lighter(l, weights[i], bl, weights[b]) => {}
            _ => best = Some((i, l)),
        }
    }
    best.map(|(i, _)| i)
}

/// Power of two choices: two random eligible backends, the lighter wins.
/// Near least-conn quality without scanning every backend.
pub fn power_of_two(weights: &[u32], load: impl Fn(usize) -> u64, eligible: impl Fn(usize) -> bool) -> Option<usize> {
    let n = weights.len();
    if n == 0 {
        return None;
    }
    let usable = |i: usize| weights[i] > 0 && eligible(i);
    // A few random draws find eligible backends quickly unless most are out;
    // then fall back to a scan.
    let draw = || (0..8).map(|_| random_below(n)).find(|&i| usable(i));
    match (draw(), draw()) {
        (Some(a), Some(b)) => Some(if lighter(load(b), weights[b], load(a), weights[a]) { b } else { a }),
        (Some(a), None) | (None, Some(a)) => Some(a),
        (None, None) => least_conn(weights, random_below(n), load, eligible),
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
pub fn random_below(n: usize) -> usize {
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((u128::from(r) * n as u128) >> 64) as usize
    })
}

#[cfg(test)]
mod tests;
