//! What the bench files share: criterion's settings.

use std::time::Duration;

use criterion::Criterion;

/// Short runs (1 s warm-up, `measure` s measuring, `samples` samples, no
/// plots): enough to compare runs on this machine; raise them for
/// publishable numbers.
pub fn criterion(measure: u64, samples: usize) -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(measure))
        .sample_size(samples)
        .without_plots()
}
