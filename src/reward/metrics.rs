//! Evaluation figures of reward models and classifiers, as plain functions over scores.

/// Ranks from 1, ties sharing their average rank.
pub fn average_ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        let rank = (start + end + 1) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

/// Area under the ROC curve (the probability that a random positive outscores a random
/// negative, ties counting half); `None` without both classes.
pub fn auroc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let positives = positive.iter().filter(|&&p| p).count();
    let negatives = positive.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let ranks = average_ranks(scores);
    let rank_sum: f64 = ranks.iter().zip(positive).filter(|(_, p)| **p).map(|(r, _)| r).sum();
    let u = rank_sum - (positives * (positives + 1)) as f64 / 2.0;
    Some(u / (positives * negatives) as f64)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Confusion {
    pub true_positives: usize,
    pub false_positives: usize,
    pub false_negatives: usize,
}

impl Confusion {
    /// Predictions `score >= threshold` against the truth.
    pub fn at(scores: &[f64], positive: &[bool], threshold: f64) -> Self {
        let mut c = Confusion { true_positives: 0, false_positives: 0, false_negatives: 0 };
        for (&s, &p) in scores.iter().zip(positive) {
            match (s >= threshold, p) {
                (true, true) => c.true_positives += 1,
                (true, false) => c.false_positives += 1,
                (false, true) => c.false_negatives += 1,
                (false, false) => {}
            }
        }
        c
    }

    /// 1 when nothing is predicted positive (no false alarms were raised).
    pub fn precision(&self) -> f64 {
        match self.true_positives + self.false_positives {
            0 => 1.0,
            n => self.true_positives as f64 / n as f64,
        }
    }

    pub fn recall(&self) -> f64 {
        match self.true_positives + self.false_negatives {
            0 => 0.0,
            n => self.true_positives as f64 / n as f64,
        }
    }

    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 { 0.0 } else { 2.0 * p * r / (p + r) }
    }
}

/// A decision threshold on probabilities: the one with the best F1, or, given a target
/// precision, the lowest threshold (most recall) reaching it. `None` without positives, or
/// when no threshold reaches the target.
pub fn choose_threshold(probabilities: &[f64], positive: &[bool], target_precision: Option<f64>) -> Option<f64> {
    if !positive.iter().any(|&p| p) {
        return None;
    }
    let mut candidates: Vec<f64> = probabilities.to_vec();
    candidates.sort_by(f64::total_cmp);
    candidates.dedup();
    let scored = candidates.iter().map(|&t| (t, Confusion::at(probabilities, positive, t)));
    match target_precision {
        Some(target) => scored.filter(|(_, c)| c.true_positives > 0 && c.precision() >= target).map(|(t, _)| t).next(),
        // Ties go to the higher threshold (fewer alarms for the same F1).
        None => scored.fold(None, |best: Option<(f64, f64)>, (t, c)| match best {
            Some((_, f1)) if f1 > c.f1() => best,
            _ => Some((t, c.f1())),
        })
        .map(|(t, _)| t),
    }
}

pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len() as f64;
    if x.len() < 2 {
        return None;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    (vx > 0.0 && vy > 0.0).then(|| cov / (vx * vy).sqrt())
}

pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    pearson(&average_ranks(x), &average_ranks(y))
}

/// Mean and population standard deviation.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Buckets of `len(chosen) - len(rejected)` in tokens: a reward model that mostly prefers the
/// longer answer shows it here.
pub const LENGTH_DIFF_BUCKETS: [(&str, i64, i64); 5] = [
    ("<-64", i64::MIN, -65),
    ("-64..-16", -64, -17),
    ("-16..16", -16, 16),
    ("16..64", 17, 64),
    (">64", 65, i64::MAX),
];

/// (bucket name, pairs, accuracy) of the non-empty buckets.
pub fn accuracy_by_length_diff(length_diffs: &[i64], correct: &[bool]) -> Vec<(&'static str, usize, f64)> {
    LENGTH_DIFF_BUCKETS
        .iter()
        .filter_map(|&(name, low, high)| {
            let in_bucket: Vec<bool> =
                length_diffs.iter().zip(correct).filter(|(d, _)| (low..=high).contains(*d)).map(|(_, c)| *c).collect();
            (!in_bucket.is_empty())
                .then(|| (name, in_bucket.len(), in_bucket.iter().filter(|&&c| c).count() as f64 / in_bucket.len() as f64))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_counts_ordered_pairs_and_half_ties() {
        assert_eq!(auroc(&[0.9, 0.8, 0.1, 0.2], &[true, true, false, false]), Some(1.0));
        assert_eq!(auroc(&[0.1, 0.2, 0.9, 0.8], &[true, true, false, false]), Some(0.0));
        // positive 0.5 vs negatives {0.5, 0.1}: one tie (0.5) and one win -> 0.75.
        assert_eq!(auroc(&[0.5, 0.5, 0.1], &[true, false, false]), Some(0.75));
        assert_eq!(auroc(&[0.5, 0.4], &[true, true]), None);
    }

    #[test]
    fn confusion_figures() {
        let c = Confusion::at(&[0.9, 0.6, 0.4, 0.2], &[true, false, true, false], 0.5);
        assert_eq!(c, Confusion { true_positives: 1, false_positives: 1, false_negatives: 1 });
        assert_eq!((c.precision(), c.recall(), c.f1()), (0.5, 0.5, 0.5));
    }

    #[test]
    fn thresholds_maximise_f1_or_meet_the_precision_target() {
        let p = [0.95, 0.9, 0.7, 0.6, 0.3, 0.1];
        let y = [true, true, false, true, false, false];
        // t=0.6: tp 3, fp 1 -> F1 0.857, the best.
        assert_eq!(choose_threshold(&p, &y, None), Some(0.6));
        // precision 1 first holds at t=0.9 (tp 2, fp 0).
        assert_eq!(choose_threshold(&p, &y, Some(1.0)), Some(0.9));
        assert_eq!(choose_threshold(&p, &[false; 6], None), None);
    }

    #[test]
    fn correlations() {
        let x = [1.0, 2.0, 3.0, 4.0];
        assert!((pearson(&x, &[2.0, 4.0, 6.0, 8.0]).unwrap() - 1.0).abs() < 1e-12);
        assert!((spearman(&x, &[1.0, 10.0, 100.0, 1000.0]).unwrap() - 1.0).abs() < 1e-12);
        assert!((pearson(&x, &[4.0, 3.0, 2.0, 1.0]).unwrap() + 1.0).abs() < 1e-12);
        assert_eq!(pearson(&x, &[1.0; 4]), None);
        assert_eq!(average_ranks(&[3.0, 1.0, 3.0]), vec![2.5, 1.0, 2.5]);
    }

    #[test]
    fn length_buckets() {
        let buckets = accuracy_by_length_diff(&[-100, 0, 5, 30, 30], &[true, false, true, true, false]);
        assert_eq!(buckets, vec![("<-64", 1, 1.0), ("-16..16", 2, 0.5), ("16..64", 2, 0.5)]);
    }
}
