//! Approximate distinct counting in fixed memory, lock-free.
//!
//! [`Distinct`] is a HyperLogLog with 256 registers (about 6.5 % standard
//! error, 512 bytes for two windows). It answers "how many distinct
//! affinity holders reached this backend recently": two windows rotate, so
//! the estimate covers the last one to two windows.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

const REGISTERS: usize = 256;
const INDEX_BITS: u32 = 8;

#[derive(Debug)]
pub struct Distinct {
    windows: [[AtomicU8; REGISTERS]; 2],
    current: AtomicUsize,
}

impl Default for Distinct {
    fn default() -> Self {
        Distinct {
            windows: [std::array::from_fn(|_| AtomicU8::new(0)), std::array::from_fn(|_| AtomicU8::new(0))],
            current: AtomicUsize::new(0),
        }
    }
}

impl Distinct {
    /// Records one holder, given a well-mixed 64-bit hash of its identity.
    pub fn insert(&self, hash: u64) {
        let index = (hash >> (64 - INDEX_BITS)) as usize;
        // Rank of the first set bit in the remaining bits (1-based).
        let rest = hash << INDEX_BITS | (1 << (INDEX_BITS - 1));
        let rank = (rest.leading_zeros() + 1) as u8;
        let window = &self.windows[self.current.load(Ordering::Relaxed) & 1];
        if window[index].load(Ordering::Relaxed) < rank {
            window[index].fetch_max(rank, Ordering::Relaxed);
        }
    }

    /// Starts a new window, forgetting the one before the current.
    pub fn rotate(&self) {
        let next = (self.current.load(Ordering::Relaxed) + 1) & 1;
        for r in &self.windows[next] {
            r.store(0, Ordering::Relaxed);
        }
        self.current.store(next, Ordering::Relaxed);
    }

    /// Estimated distinct holders over the current and previous window.
    pub fn estimate(&self) -> u64 {
        let m = REGISTERS as f64;
        let mut sum = 0.0;
        let mut zeros = 0usize;
        for i in 0..REGISTERS {
            let r = self.windows[0][i].load(Ordering::Relaxed).max(self.windows[1][i].load(Ordering::Relaxed));
            sum += 2f64.powi(-i32::from(r));
            if r == 0 {
                zeros += 1;
            }
        }
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / sum;
        // Small-range correction (linear counting).
        let estimate = if raw <= 2.5 * m && zeros > 0 { m * (m / zeros as f64).ln() } else { raw };
        estimate.round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u64) -> u64 {
        xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes())
    }

    #[test]
    fn empty_estimates_zero() {
        assert_eq!(Distinct::default().estimate(), 0);
    }

    #[test]
    fn estimates_distinct_counts_within_twenty_percent() {
        for n in [10u64, 100, 1_000, 10_000, 100_000] {
            let d = Distinct::default();
            for i in 0..n {
                d.insert(h(i));
                d.insert(h(i)); // repeats do not count
            }
            let e = d.estimate() as f64;
            let err = (e - n as f64).abs() / n as f64;
            assert!(err < 0.2, "n={n} estimate={e}");
        }
    }

    #[test]
    fn rotating_twice_forgets_old_holders() {
        let d = Distinct::default();
        for i in 0..1000 {
            d.insert(h(i));
        }
        d.rotate();
        assert!(d.estimate() > 500, "previous window still counts");
        d.rotate();
        assert_eq!(d.estimate(), 0);
    }
}
