//! Consistent-hash lookups and table builds, and the affinity cookie codec.
//!
//! `cargo bench --bench hashing`; see benches/README.md.

mod common;

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tether::balance::cookie::CookieCodec;
use tether::balance::hash::{Algorithm, HashTable, hash_key};

const SECRET: &[u8] = b"bench-secret-0123456789abcdef-0123";

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("backend-{i}")).collect()
}

fn table(algorithm: Algorithm, names: &[String]) -> HashTable {
    let entries: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
    HashTable::build(algorithm, &entries)
}

/// A new, well-mixed key hash per call (splitmix64: an add and a mix), so
/// every lookup lands somewhere else in the table as real traffic would and
/// the branch predictor cannot learn the sequence (a bare golden-ratio
/// step is regular enough that it partly does).
struct FreshHashes(u64);

impl FreshHashes {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn lookup(c: &mut Criterion) {
    for (label, algorithm) in [("ring", Algorithm::Ring), ("maglev", Algorithm::Maglev)] {
        let mut group = c.benchmark_group(format!("{label}_owner"));
        for n in [3usize, 10, 100, 1000] {
            let table = table(algorithm, &names(n));
            let mut hashes = FreshHashes(1);
            group.bench_with_input(BenchmarkId::from_parameter(n), &table, |b, t| {
                b.iter(|| t.owner(black_box(hashes.next())));
            });
        }
        group.finish();

        // Latency rather than throughput: each key depends on the previous
        // answer, so lookups cannot overlap in the CPU (a request does one
        // lookup among much other work, so this is the closer figure).
        let mut group = c.benchmark_group(format!("{label}_owner_chained"));
        for n in [3usize, 10, 100, 1000] {
            let table = table(algorithm, &names(n));
            let mut hashes = FreshHashes(1);
            let mut last = 0usize;
            group.bench_with_input(BenchmarkId::from_parameter(n), &table, |b, t| {
                b.iter(|| {
                    let h = hashes.next() ^ last as u64;
                    last = t.owner(h).unwrap_or(0);
                    last
                });
            });
        }
        group.finish();

        // What a request does: hash a ~20-byte key (a user id header), then
        // look it up. The last 8 bytes change per call.
        let mut group = c.benchmark_group(format!("{label}_hash_key_and_owner"));
        for n in [3usize, 10, 100, 1000] {
            let table = table(algorithm, &names(n));
            let mut key = *b"user-id-000000000000";
            let mut i = 0u64;
            group.bench_with_input(BenchmarkId::from_parameter(n), &table, |b, t| {
                b.iter(|| {
                    i += 1;
                    key[12..].copy_from_slice(&i.to_le_bytes());
                    t.owner(hash_key(black_box(&key)))
                });
            });
        }
        group.finish();
    }
}

fn build(c: &mut Criterion) {
    for (label, algorithm) in [("ring", Algorithm::Ring), ("maglev", Algorithm::Maglev)] {
        let mut group = c.benchmark_group(format!("{label}_build"));
        for n in [10usize, 100, 1000] {
            let names = names(n);
            let entries: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
            group.bench_with_input(BenchmarkId::from_parameter(n), &entries, |b, e| {
                b.iter(|| HashTable::build(algorithm, black_box(e)));
            });
        }
        group.finish();
    }
}

fn cookie(c: &mut Criterion) {
    let signed = CookieCodec::new("app", "tether", Some(SECRET));
    let unsigned = CookieCodec::new("app", "tether", None);
    let mut group = c.benchmark_group("cookie");
    group.bench_function("encode_signed", |b| b.iter(|| signed.encode(black_box("app-backend-7"))));
    let value = signed.encode("app-backend-7");
    group.bench_function("decode_signed", |b| b.iter(|| signed.decode(black_box(&value))));
    let value = unsigned.encode("app-backend-7");
    group.bench_function("decode_unsigned", |b| b.iter(|| unsigned.decode(black_box(&value))));
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion(2, 20);
    targets = lookup, build, cookie
}
criterion_main!(benches);
