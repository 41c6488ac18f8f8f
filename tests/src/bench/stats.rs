//! Percentiles with bootstrap intervals, and medians of repeated runs with their range: a single figure from a
//! shared two-core machine says little without its spread.

use rand::{Rng, SeedableRng, rngs::SmallRng};
use serde::Serialize;

/// The `p`-th percentile (0-100) of `sorted`, interpolated between the closest ranks.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0).clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// A percentile and its 95 % bootstrap interval.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Estimate {
    /// The value on the sample.
    pub value: f64,
    /// 2.5th percentile of the bootstrap distribution.
    pub low: f64,
    /// 97.5th percentile of the bootstrap distribution.
    pub high: f64,
}

impl std::fmt::Display for Estimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} [{}-{}]",
            fmt(self.value),
            fmt(self.low),
            fmt(self.high)
        )
    }
}

/// A latency sample: its percentiles with intervals, in the sample's unit.
#[derive(Debug, Clone, Serialize)]
pub struct Distribution {
    /// Observations.
    pub n: usize,
    /// Mean.
    pub mean: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Median.
    pub p50: Estimate,
    /// 95th percentile.
    pub p95: Estimate,
    /// 99th percentile.
    pub p99: Estimate,
}

impl Distribution {
    /// Summarises `values`: 1,000 bootstrap resamples (seeded, so a rerun on the same sample agrees).
    pub fn of(values: &[f64]) -> Self {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let mut rng = SmallRng::seed_from_u64(0x5eed);
        const RESAMPLES: usize = 1000;
        let mut boot: [Vec<f64>; 3] = Default::default();
        let mut resample = vec![0.0; n];
        for _ in 0..if n > 1 { RESAMPLES } else { 0 } {
            for slot in resample.iter_mut() {
                *slot = sorted[rng.random_range(0..n)];
            }
            resample.sort_by(f64::total_cmp);
            for (b, p) in boot.iter_mut().zip([50.0, 95.0, 99.0]) {
                b.push(percentile(&resample, p));
            }
        }
        let mut estimate = |i: usize, p: f64| {
            let value = percentile(&sorted, p);
            let b = &mut boot[i];
            b.sort_by(f64::total_cmp);
            if b.is_empty() {
                Estimate {
                    value,
                    low: value,
                    high: value,
                }
            } else {
                Estimate {
                    value,
                    low: percentile(b, 2.5),
                    high: percentile(b, 97.5),
                }
            }
        };
        Self {
            n,
            mean: if n == 0 {
                f64::NAN
            } else {
                sorted.iter().sum::<f64>() / n as f64
            },
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            p50: estimate(0, 50.0),
            p95: estimate(1, 95.0),
            p99: estimate(2, 99.0),
        }
    }
}

/// The median of repeated runs and their range.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    /// Median over the runs.
    pub median: f64,
    /// Lowest run.
    pub min: f64,
    /// Highest run.
    pub max: f64,
    /// Runs.
    pub runs: usize,
}

impl Spread {
    /// Of the runs' `values`.
    pub fn of(values: &[f64]) -> Self {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Self {
            median: percentile(&sorted, 50.0),
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            runs: sorted.len(),
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.runs > 1 {
            write!(
                f,
                "{} [{}-{}]",
                fmt(self.median),
                fmt(self.min),
                fmt(self.max)
            )
        } else {
            write!(f, "{}", fmt(self.median))
        }
    }
}

/// A figure with three significant digits (thousands separated), for the Markdown tables.
pub fn fmt(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let a = x.abs();
    let s = if a >= 1000.0 {
        let int = format!("{:.0}", a);
        let mut out = String::new();
        for (i, c) in int.chars().enumerate() {
            if i > 0 && (int.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if a >= 100.0 {
        format!("{a:.0}")
    } else if a >= 10.0 {
        format!("{a:.1}")
    } else if a >= 1.0 {
        format!("{a:.2}")
    } else if a == 0.0 {
        "0".into()
    } else {
        format!("{a:.3}")
    };
    if x < 0.0 { format!("-{s}") } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v: Vec<f64> = (1..=101).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 51.0);
        assert_eq!(percentile(&v, 95.0), 96.0);
        assert_eq!(percentile(&[1.0, 2.0], 50.0), 1.5);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn bootstrap_intervals_hold_the_estimate_and_narrow_with_more_data() {
        let small: Vec<f64> = (0..50).map(|i| f64::from(i % 10)).collect();
        let large: Vec<f64> = (0..5000).map(|i| f64::from(i % 10)).collect();
        let (s, l) = (Distribution::of(&small), Distribution::of(&large));
        for e in [s.p50, s.p95, l.p50, l.p95] {
            assert!(e.low <= e.value && e.value <= e.high, "{e:?}");
        }
        assert!(l.p50.high - l.p50.low <= s.p50.high - s.p50.low);
        assert_eq!((s.min, s.max, s.n), (0.0, 9.0, 50));
    }

    #[test]
    fn spreads_and_figures_read_as_the_tables_print_them() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(s.to_string(), "2.00 [1.00-3.00]");
        assert_eq!(fmt(12345.6), "12,346");
        assert_eq!(fmt(0.01234), "0.012");
        assert_eq!(fmt(-42.0), "-42.0");
    }
}
