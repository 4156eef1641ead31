//! Claims about the balancing policies. `power_of_two` draws from a
//! thread-local PRNG; every test that calls it seeds that PRNG first (each
//! test runs on its own thread), so the results are reproducible.

use super::*;

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// Seeds this thread's `random_below` generator.
fn seed_rng(seed: u64) {
    RNG.with(|s| s.set(seed | 1));
}

fn picks(rr: &RoundRobin, n: usize, eligible: impl Fn(usize) -> bool) -> Vec<usize> {
    (0..n).map(|_| rr.pick(&eligible).expect("an eligible backend")).collect()
}

fn is_rotation(seq: &[usize], of: &[usize]) -> bool {
    seq.len() == of.len() && (0..of.len()).any(|r| seq.iter().enumerate().all(|(i, &x)| x == of[(i + r) % of.len()]))
}

fn count(seq: &[usize], n: usize) -> Vec<usize> {
    let mut c = vec![0; n];
    for &b in seq {
        c[b] += 1;
    }
    c
}

/// The largest gap, over every cyclic window of `period` and every backend,
/// between how often the backend appears in the window and its exact share
/// `len × w / Σw`. A perfectly smooth order keeps this below 1.
fn window_discrepancy(period: &[usize], weights: &[u32]) -> f64 {
    let total: u32 = weights.iter().sum();
    let mut worst = 0.0f64;
    for start in 0..period.len() {
        let mut counts = vec![0u32; weights.len()];
        for len in 1..=period.len() {
            counts[period[(start + len - 1) % period.len()]] += 1;
            for (c, &w) in counts.iter().zip(weights) {
                let exact = len as f64 * f64::from(w) / f64::from(total);
                worst = worst.max((f64::from(*c) - exact).abs());
            }
        }
    }
    worst
}

// === smooth weighted round robin ===

#[test]
fn round_robin_5_1_1_interleaves_one_period_a_a_b_a_c_a_a() {
    let rr = RoundRobin::new(&[5, 1, 1]);
    let first = picks(&rr, 7, |_| true);
    // nginx's order, up to where in the period we start.
    assert!(is_rotation(&first, &[A, A, B, A, C, A, A]), "{first:?}");
    // It is periodic: the next period is the same.
    assert_eq!(picks(&rr, 7, |_| true), first);
    // Not the bursty a a a a a b c: b and c are separated by an a, and
    // any window is close to its exact share (a a a a a b c is 1.43 off:
    // five a in a window of five where 3.57 are due).
    let cyclic = |i: usize| first[i % first.len()];
    for i in 0..first.len() {
        assert!(!matches!((cyclic(i), cyclic(i + 1)), (B, C) | (C, B)), "{first:?}");
    }
    assert!(window_discrepancy(&first, &[5, 1, 1]) < 1.25, "{first:?}");
    assert!(window_discrepancy(&[A, A, A, A, A, B, C], &[5, 1, 1]) > 1.25);
}

#[test]
fn round_robin_respects_weights_over_many_picks() {
    for weights in [&[5u32, 1, 1][..], &[3, 2, 1, 0, 4], &[1, 1, 1], &[7, 3], &[10, 9, 1], &[256, 1]] {
        let rr = RoundRobin::new(weights);
        let total: u32 = weights.iter().sum();
        let periods = 50;
        let seq = picks(&rr, total as usize * periods, |_| true);
        // Whole periods: exactly proportional.
        let counts = count(&seq, weights.len());
        for (i, &w) in weights.iter().enumerate() {
            assert_eq!(counts[i], w as usize * periods, "weights {weights:?}: backend {i}");
        }
        // And smooth within the period (measured at most 1.2 for these).
        let d = window_discrepancy(&seq[..total as usize], weights);
        assert!(d < 1.25, "weights {weights:?}: window discrepancy {d}");
    }
}

#[test]
fn round_robin_sequence_divides_weights_by_their_gcd() {
    assert_eq!(smooth_sequence(&[2, 4, 6]), smooth_sequence(&[1, 2, 3]));
    assert_eq!(smooth_sequence(&[10, 0, 5]), vec![0, 2, 0]);
}

#[test]
fn round_robin_skips_ineligible_backends() {
    let rr = RoundRobin::new(&[5, 1, 1]);
    // With a out, every pick is b or c, and both get picked.
    let seq = picks(&rr, 70, |i| i != A);
    let counts = count(&seq, 3);
    assert_eq!(counts[A], 0);
    assert!(counts[B] > 0 && counts[C] > 0, "{counts:?}");
    // Only one eligible: always that one.
    assert!(picks(&rr, 20, |i| i == C).iter().all(|&b| b == C));
    // Eligibility can change between picks; the rotation carries on.
    let rr = RoundRobin::new(&[1, 1, 1]);
    for k in 0..30 {
        let b = rr.pick(|i| i != k % 3);
        assert!(b.is_some_and(|b| b != k % 3), "pick {k}: {b:?}");
    }
}

#[test]
fn round_robin_returns_none_when_nothing_is_eligible() {
    let rr = RoundRobin::new(&[5, 1, 1]);
    for _ in 0..10 {
        assert_eq!(rr.pick(|_| false), None);
    }
    assert_eq!(RoundRobin::new(&[]).pick(|_| true), None);
    assert_eq!(RoundRobin::new(&[0, 0, 0]).pick(|_| true), None);
    assert!(smooth_sequence(&[0, 0]).is_empty());
}

#[test]
fn round_robin_never_picks_weight_zero() {
    let weights = [0, 3, 0, 2, 0];
    let rr = RoundRobin::new(&weights);
    let counts = count(&picks(&rr, 500, |_| true), weights.len());
    assert_eq!(counts, vec![0, 300, 0, 200, 0]);
    assert!(smooth_sequence(&weights).iter().all(|&b| weights[b as usize] > 0));
}

#[test]
fn smooth_sequence_scales_huge_weight_sets_down_keeping_every_positive_weight() {
    // 1000 backends with weights up to ~37k: a period of ~18M, scaled to
    // about MAX_SEQUENCE.
    let weights: Vec<u32> = (0..1000u32).map(|i| if i % 10 == 3 { 0 } else { i * 37 + 1 }).collect();
    let positive = weights.iter().filter(|&&w| w > 0).count();
    let seq = smooth_sequence(&weights);
    // Rounding each weight (and keeping at least 1) adds at most one each.
    assert!(seq.len() <= MAX_SEQUENCE + positive, "len {}", seq.len());
    assert!(seq.len() >= MAX_SEQUENCE - positive, "len {}", seq.len());
    let counts = count(&seq.iter().map(|&b| b as usize).collect::<Vec<_>>(), weights.len());
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    for (i, &w) in weights.iter().enumerate() {
        if w == 0 {
            assert_eq!(counts[i], 0, "backend {i} has weight 0");
            continue;
        }
        assert!(counts[i] >= 1, "backend {i} (weight {w}) vanished");
        // Proportions survive: within one pick of the scaled weight.
        let exact = f64::from(w) * seq.len() as f64 / total as f64;
        assert!((counts[i] as f64 - exact).abs() <= 1.0 + exact * 0.01, "backend {i}: {} vs {exact:.1}", counts[i]);
    }
    // A weight of 1 next to the largest weight possible still gets its turn.
    let seq = smooth_sequence(&[1, u32::MAX, 0]);
    assert!(seq.len() <= MAX_SEQUENCE + 2);
    assert!(seq.contains(&0) && seq.contains(&1) && !seq.contains(&2));
}

// === least connections ===

#[test]
fn least_conn_picks_the_lowest_load_per_weight() {
    // (load + 1) / weight: 2/1, 4/2, 6/4: the third is lightest.
    let weights = [1, 2, 4];
    let loads = [1, 3, 5];
    for start in 0..6 {
        assert_eq!(least_conn(&weights, start, |i| loads[i], |_| true), Some(2), "start {start}");
    }
    // Unweighted: plain fewest in flight.
    let loads = [4, 2, 3, 9];
    assert_eq!(least_conn(&[1; 4], 0, |i| loads[i], |_| true), Some(1));
    // Counting the request being placed, an idle heavy backend beats an idle
    // light one.
    for start in 0..4 {
        assert_eq!(least_conn(&[1, 3], start, |_| 0, |_| true), Some(1));
    }
}

#[test]
fn least_conn_rotates_ties_with_start() {
    let weights = [1, 1, 1, 1];
    let picked: Vec<_> = (0..8).map(|s| least_conn(&weights, s, |_| 2, |_| true)).collect();
    assert_eq!(picked, [0, 1, 2, 3, 0, 1, 2, 3].map(Some));
    // A weighted tie: (1+1)/2 = (0+1)/1.
    assert_eq!(least_conn(&[2, 1], 0, |i| [1, 0][i], |_| true), Some(0));
    assert_eq!(least_conn(&[2, 1], 1, |i| [1, 0][i], |_| true), Some(1));
    // Ties among some backends only rotate among those.
    let loads = [5, 1, 5, 1];
    let picked: Vec<_> = (0..4).map(|s| least_conn(&weights, s, |i| loads[i], |_| true)).collect();
    assert_eq!(picked, [1, 1, 3, 3].map(Some));
}

#[test]
fn least_conn_skips_weight_zero_and_ineligible_and_may_find_none() {
    let weights = [0, 1, 1, 1];
    // The idle weight-0 backend and the idle ineligible one lose to a busy one.
    let loads = [0, 0, 7, 9];
    assert_eq!(least_conn(&weights, 0, |i| loads[i], |i| i != 1), Some(2));
    assert_eq!(least_conn(&weights, 0, |i| loads[i], |_| false), None);
    assert_eq!(least_conn(&[0, 0], 0, |_| 0, |_| true), None);
    assert_eq!(least_conn(&[], 0, |_| 0, |_| true), None);
}

#[test]
fn least_conn_keeps_loads_level_as_requests_arrive() {
    // Placing one request at a time (rotating start), equal backends never
    // differ by more than one in flight; weighted ones stay proportional.
    let mut loads = [0u64; 5];
    for k in 0..1000 {
        let b = least_conn(&[1; 5], k, |i| loads[i], |_| true).expect("eligible");
        loads[b] += 1;
        let (min, max) = (loads.iter().min(), loads.iter().max());
        assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{loads:?}");
    }
    let weights = [1, 2, 5];
    let mut loads = [0u64; 3];
    for k in 0..800 {
        let b = least_conn(&weights, k, |i| loads[i], |_| true).expect("eligible");
        loads[b] += 1;
    }
    assert_eq!(loads, [100, 200, 500]);
}

// === power of two choices ===

#[test]
fn power_of_two_never_picks_weight_zero_or_ineligible() {
    seed_rng(0x5eed);
    let weights = [0, 1, 1, 0, 2, 1];
    let mut counts = [0usize; 6];
    for k in 0..10_000u64 {
        let b = power_of_two(&weights, |i| (k + i as u64 * 3) % 7, |i| i != 5).expect("eligible");
        counts[b] += 1;
    }
    assert_eq!((counts[0], counts[3], counts[5]), (0, 0, 0), "{counts:?}");
    assert!(counts[1] > 0 && counts[2] > 0 && counts[4] > 0, "{counts:?}");
}

#[test]
fn power_of_two_finds_a_lone_eligible_backend_or_none() {
    seed_rng(7);
    // 1 eligible of 100: random draws mostly miss, the scan finds it.
    let weights = [1u32; 100];
    for _ in 0..1000 {
        assert_eq!(power_of_two(&weights, |_| 0, |i| i == 63), Some(63));
    }
    assert_eq!(power_of_two(&weights, |_| 0, |_| false), None);
    assert_eq!(power_of_two(&[0, 0, 0], |_| 0, |_| true), None);
    assert_eq!(power_of_two(&[], |_| 0, |_| true), None);
}

#[test]
fn power_of_two_prefers_the_lighter_backend() {
    seed_rng(1);
    // Two backends, one busy: the idle one wins unless both draws land on
    // the busy one (1 in 4, the draws are independent). Measured 0.748.
    let loads = [10, 0];
    let idle = (0..20_000).filter(|_| power_of_two(&[1, 1], |i| loads[i], |_| true) == Some(1)).count();
    assert!(idle as f64 / 20_000.0 >= 0.70, "idle picked {idle} of 20000");
    // Weighted: equal loads, the heavier backend is the lighter per weight.
    let heavy = (0..20_000).filter(|_| power_of_two(&[1, 4], |_| 3, |_| true) == Some(1)).count();
    assert!(heavy as f64 / 20_000.0 >= 0.70, "heavy picked {heavy} of 20000");
}

#[test]
fn power_of_two_on_average_sends_work_to_less_loaded_backends() {
    seed_rng(2);
    // Static loads 0..9: uniform picks would average 4.5; two choices
    // average the lighter of two draws (measured 2.85).
    let weights = [1u32; 10];
    let picks = 20_000;
    let sum: u64 = (0..picks).map(|_| power_of_two(&weights, |i| i as u64, |_| true).expect("eligible") as u64).sum();
    let mean = sum as f64 / f64::from(picks);
    assert!(mean <= 3.2, "mean load of picked backend {mean:.3}");
    // Arrivals only: loads stay level (measured 998..1001 for 10k requests;
    // uniform random placement spreads about ±90).
    let mut loads = [0u64; 10];
    for _ in 0..10_000 {
        let b = power_of_two(&weights, |i| loads[i], |_| true).expect("eligible");
        loads[b] += 1;
    }
    let spread = loads.iter().max().zip(loads.iter().min()).map(|(a, b)| a - b);
    assert!(spread.is_some_and(|s| s <= 10), "{loads:?}");
}

#[test]
fn random_below_stays_in_range_and_covers_it() {
    seed_rng(3);
    let mut seen = [false; 7];
    for _ in 0..1000 {
        let r = random_below(7);
        assert!(r < 7);
        seen[r] = true;
    }
    assert!(seen.iter().all(|&s| s));
    assert_eq!(random_below(1), 0);
}
