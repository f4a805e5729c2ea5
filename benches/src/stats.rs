//! Summary statistics over repeated runs: median and nearest-rank percentiles.

use serde::Serialize;

/// Samples of one measured quantity, in the unit its name gives.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub samples: Vec<f64>,
    pub median: f64,
    pub p90: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// Summarises `samples`; None when there are none.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let sorted = sorted(samples);
        Some(Self {
            samples: samples.to_vec(),
            median: median(&sorted)?,
            p90: percentile(&sorted, 90.0)?,
            min: *sorted.first()?,
            max: *sorted.last()?,
        })
    }
}

impl Summary {
    /// The same figures in another unit: every sample times `factor` (positive).
    pub fn scaled(&self, factor: f64) -> Self {
        Self {
            samples: self.samples.iter().map(|v| v * factor).collect(),
            median: self.median * factor,
            p90: self.p90 * factor,
            min: self.min * factor,
            max: self.max * factor,
        }
    }
}

/// The samples in ascending order, for [`median`] and [`percentile`].
pub fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
}

/// Median of sorted values (mean of the middle two for an even count).
pub fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_changes_the_unit_only() {
        let s = Summary::of(&[0.5, 0.25, 0.75]).unwrap().scaled(100.0);
        assert_eq!(s.samples, [50.0, 25.0, 75.0]);
        assert_eq!((s.median, s.min, s.max), (50.0, 25.0, 75.0));
        assert_eq!(s.p90, 75.0);
    }

    #[test]
    fn median_and_p90() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(median(&v), Some(5.5));
        assert_eq!(percentile(&v, 90.0), Some(9.0));
        assert_eq!(percentile(&v, 99.0), Some(10.0));
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[]), None);
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
    }
}
