//! How far annotators agree: Krippendorff's alpha (nominal, ordinal or interval; any number
//! of annotators, missing ratings allowed), the mean Spearman correlation over annotator
//! pairs, and for yes/no judgements such as labels Cohen's kappa (two raters) and Fleiss'
//! kappa (any number per item).

use std::collections::HashMap;
use std::hash::Hash;

use serde::Serialize;

use crate::reward::metrics::spearman;

/// Krippendorff's alpha, interval metric: `1 − D_o / D_e`, where `D_o` is the disagreement
/// within items and `D_e` the disagreement expected by chance (over all values pooled). Only
/// items with two or more ratings count. `None` when fewer than two such items' values vary
/// at all (`D_e = 0`) or no item has two ratings.
///
/// With `n` pairable values, item `u` holding `m_u` of them:
/// `D_o = 1/n · Σ_u Σ_{i≠j in u} (v_i − v_j)² / (m_u − 1)` and
/// `D_e = 1/(n(n−1)) · Σ_{i≠j} (v_i − v_j)²`, using `Σ_{i≠j} (v_i − v_j)² = 2(m·Σv² − (Σv)²)`.
pub fn krippendorff_alpha_interval(items: &[Vec<f64>]) -> Option<f64> {
    let pairable: Vec<&Vec<f64>> = items.iter().filter(|values| values.len() >= 2).collect();
    let n: usize = pairable.iter().map(|values| values.len()).sum();
    if n < 2 {
        return None;
    }
    let squared_differences = |values: &mut dyn Iterator<Item = f64>| {
        let (mut count, mut sum, mut sum_squares) = (0f64, 0f64, 0f64);
        for v in values {
            count += 1.0;
            sum += v;
            sum_squares += v * v;
        }
        2.0 * (count * sum_squares - sum * sum)
    };
    let within: f64 = pairable.iter().map(|values| squared_differences(&mut values.iter().copied()) / (values.len() - 1) as f64).sum();
    let all = squared_differences(&mut pairable.iter().flat_map(|values| values.iter().copied()));
    let n = n as f64;
    let (observed, expected) = (within / n, all / (n * (n - 1.0)));
    (expected > 0.0).then(|| 1.0 - observed / expected)
}

/// How far apart two values count for Krippendorff's alpha.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Equal or not (categories).
    Nominal,
    /// By how many values lie between them (ranks, Likert points read as an order).
    Ordinal,
    /// By their squared difference (scores).
    Interval,
}

/// Krippendorff's alpha with `metric`, from the coincidence matrix of the values: each item
/// `u` with `m_u ≥ 2` values adds `1/(m_u − 1)` to `o[c][k]` for every ordered pair of its
/// values (c, k); with `n_c = Σ_k o[c][k]` and `n = Σ n_c`,
/// `α = 1 − (n − 1) · Σ o[c][k] δ²(c, k) / Σ n_c n_k δ²(c, k)`.
/// The ordinal `δ²(c, k) = (Σ_{g from c to k} n_g − (n_c + n_k)/2)²`. `None` as for the
/// interval alpha.
pub fn krippendorff_alpha(items: &[Vec<f64>], metric: Metric) -> Option<f64> {
    if metric == Metric::Interval {
        return krippendorff_alpha_interval(items);
    }
    let pairable: Vec<&Vec<f64>> = items.iter().filter(|values| values.len() >= 2).collect();
    let mut values: Vec<f64> = pairable.iter().flat_map(|v| v.iter().copied()).collect();
    values.sort_by(f64::total_cmp);
    values.dedup();
    let index = |v: f64| values.binary_search_by(|x| x.total_cmp(&v)).unwrap_or(0);
    let k = values.len();
    let mut coincidences = vec![vec![0f64; k]; k];
    for unit in &pairable {
        let mut counts = vec![0f64; k];
        for &v in unit.iter() {
            counts[index(v)] += 1.0;
        }
        let weight = 1.0 / (unit.len() - 1) as f64;
        for c in (0..k).filter(|&c| counts[c] > 0.0) {
            for d in (0..k).filter(|&d| counts[d] > 0.0) {
                let pairs = counts[c] * (counts[d] - if c == d { 1.0 } else { 0.0 });
                coincidences[c][d] += pairs * weight;
            }
        }
    }
    let marginals: Vec<f64> = coincidences.iter().map(|row| row.iter().sum()).collect();
    let n: f64 = marginals.iter().sum();
    if n < 2.0 {
        return None;
    }
    let distance = |c: usize, d: usize| -> f64 {
        match metric {
            Metric::Nominal => f64::from(u8::from(c != d)),
            Metric::Ordinal => {
                let (low, high) = (c.min(d), c.max(d));
                let between: f64 = marginals[low..=high].iter().sum();
                (between - (marginals[c] + marginals[d]) / 2.0).powi(2)
            }
            Metric::Interval => (values[c] - values[d]).powi(2),
        }
    };
    let (mut observed, mut expected) = (0.0, 0.0);
    for c in 0..k {
        for d in 0..k {
            let delta = distance(c, d);
            observed += coincidences[c][d] * delta;
            expected += marginals[c] * marginals[d] * delta;
        }
    }
    (expected > 0.0).then(|| 1.0 - (n - 1.0) * observed / expected)
}

/// Cohen's kappa of two raters' categories for the same items: `(p_o − p_e) / (1 − p_e)`,
/// with `p_o` the share of items they agree on and `p_e` the agreement their own category
/// rates would give by chance. `None` without items or when chance agreement is certain.
pub fn cohen_kappa<T: Eq + Hash>(pairs: &[(T, T)]) -> Option<f64> {
    if pairs.is_empty() {
        return None;
    }
    let n = pairs.len() as f64;
    let mut first: HashMap<&T, f64> = HashMap::new();
    let mut second: HashMap<&T, f64> = HashMap::new();
    for (a, b) in pairs {
        *first.entry(a).or_default() += 1.0;
        *second.entry(b).or_default() += 1.0;
    }
    let observed = pairs.iter().filter(|(a, b)| a == b).count() as f64 / n;
    let chance: f64 = first.iter().map(|(c, count)| count / n * second.get(c).copied().unwrap_or(0.0) / n).sum();
    (chance < 1.0).then(|| (observed - chance) / (1.0 - chance))
}

/// Fleiss' kappa: `counts[item][category]` raters put the item in the category. Items rated
/// fewer than twice are left out. An item's agreement is
/// `P_i = Σ_j n_ij (n_ij − 1) / (n_i (n_i − 1))`, which allows items rated by different
/// numbers of raters (Fleiss' own formula when all are rated equally often); `p_j` is
/// category j's share of all ratings; `κ = (mean P_i − Σ p_j²) / (1 − Σ p_j²)`.
pub fn fleiss_kappa(counts: &[Vec<usize>]) -> Option<f64> {
    let rated: Vec<&Vec<usize>> = counts.iter().filter(|row| row.iter().sum::<usize>() >= 2).collect();
    if rated.is_empty() {
        return None;
    }
    let categories = rated.iter().map(|row| row.len()).max().unwrap_or(0);
    let mut totals = vec![0f64; categories];
    let mut agreement = 0.0;
    for row in &rated {
        let n: usize = row.iter().sum();
        agreement += row.iter().map(|&c| (c * c.saturating_sub(1)) as f64).sum::<f64>() / (n * (n - 1)) as f64;
        for (j, &c) in row.iter().enumerate() {
            totals[j] += c as f64;
        }
    }
    let all: f64 = totals.iter().sum();
    let chance: f64 = totals.iter().map(|t| (t / all).powi(2)).sum();
    let mean = agreement / rated.len() as f64;
    (chance < 1.0).then(|| (mean - chance) / (1.0 - chance))
}

/// How far annotators agree on one label: per item, who ticked it and who did not.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct LabelAgreement {
    pub label: String,
    /// Items two or more annotators judged.
    pub items_rated_twice: usize,
    /// Share of all judgements that ticked the label.
    pub positive_rate: Option<f64>,
    pub fleiss_kappa: Option<f64>,
    /// Mean over the annotator pairs who judged items in common (one pair: Cohen's own).
    pub cohen_kappa: Option<f64>,
    pub cohen_pairs: usize,
}

/// Per label: `ticked[item]` = (annotator, whether they ticked it) for everyone who judged the item.
pub fn label_agreement(label: &str, ticked: &[Vec<(usize, bool)>]) -> LabelAgreement {
    let counts: Vec<Vec<usize>> = ticked.iter().map(|row| vec![row.iter().filter(|(_, t)| !t).count(), row.iter().filter(|(_, t)| *t).count()]).collect();
    let judgements: usize = ticked.iter().map(Vec::len).sum();
    let positives: usize = counts.iter().map(|c| c[1]).sum();
    let mut by_pair: HashMap<(usize, usize), Vec<(bool, bool)>> = HashMap::new();
    for row in ticked {
        for (i, &(a, ta)) in row.iter().enumerate() {
            for &(b, tb) in &row[i + 1..] {
                let (key, pair) = if a < b { ((a, b), (ta, tb)) } else { ((b, a), (tb, ta)) };
                by_pair.entry(key).or_default().push(pair);
            }
        }
    }
    let kappas: Vec<f64> = by_pair.values().filter_map(|pairs| cohen_kappa(pairs)).collect();
    LabelAgreement {
        label: label.to_string(),
        items_rated_twice: ticked.iter().filter(|row| row.len() >= 2).count(),
        positive_rate: (judgements > 0).then(|| positives as f64 / judgements as f64),
        fleiss_kappa: fleiss_kappa(&counts),
        cohen_kappa: (!kappas.is_empty()).then(|| kappas.iter().sum::<f64>() / kappas.len() as f64),
        cohen_pairs: kappas.len(),
    }
}

/// Agreement over a table of ratings: `ratings[item][annotator]`, `None` where not rated.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Agreement {
    pub annotators: usize,
    /// Items rated by two or more annotators: the only ones agreement is measured on.
    pub items_rated_twice: usize,
    pub krippendorff_alpha: Option<f64>,
    /// Mean over the annotator pairs with a defined correlation on the items both rated.
    pub mean_pairwise_spearman: Option<f64>,
    pub spearman_pairs: usize,
}

pub fn agreement(ratings: &[Vec<Option<f64>>], annotators: usize) -> Agreement {
    let values: Vec<Vec<f64>> = ratings.iter().map(|row| row.iter().flatten().copied().collect()).collect();
    let mut correlations = Vec::new();
    for a in 0..annotators {
        for b in a + 1..annotators {
            let (x, y): (Vec<f64>, Vec<f64>) = ratings
                .iter()
                .filter_map(|row| Some((row.get(a).copied().flatten()?, row.get(b).copied().flatten()?)))
                .unzip();
            correlations.extend(spearman(&x, &y));
        }
    }
    Agreement {
        annotators,
        items_rated_twice: values.iter().filter(|v| v.len() >= 2).count(),
        krippendorff_alpha: krippendorff_alpha_interval(&values),
        mean_pairwise_spearman: (!correlations.is_empty()).then(|| correlations.iter().sum::<f64>() / correlations.len() as f64),
        spearman_pairs: correlations.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: four
    /// observers (columns) rate twelve units (rows), with missing values.
    fn krippendorff_example() -> Vec<Vec<Option<f64>>> {
        let n = None;
        let observers: [[Option<f64>; 12]; 4] = [
            [Some(1.), Some(2.), Some(3.), Some(3.), Some(2.), Some(1.), Some(4.), Some(1.), Some(2.), n, n, n],
            [Some(1.), Some(2.), Some(3.), Some(3.), Some(2.), Some(2.), Some(4.), Some(1.), Some(2.), Some(5.), n, Some(3.)],
            [n, Some(3.), Some(3.), Some(3.), Some(2.), Some(3.), Some(4.), Some(2.), Some(2.), Some(5.), Some(1.), n],
            [Some(1.), Some(2.), Some(3.), Some(3.), Some(2.), Some(4.), Some(4.), Some(1.), Some(2.), Some(5.), Some(1.), n],
        ];
        (0..12).map(|unit| observers.iter().map(|o| o[unit]).collect()).collect()
    }

    /// Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: four
    /// observers, twelve units, missing values; the interval alpha is 0.849. Unit 12 holds a
    /// single value and does not count.
    #[test]
    fn alpha_matches_krippendorffs_worked_example() {
        let table = krippendorff_example();
        let result = agreement(&table, 4);
        assert_eq!(result.items_rated_twice, 11);
        assert!((result.krippendorff_alpha.unwrap() - 0.849).abs() < 5e-4, "{result:?}");
        assert_eq!(result.spearman_pairs, 6);
    }

    /// The same example with the other metrics: Krippendorff (2011) gives nominal 0.743 and
    /// ordinal 0.815 (interval 0.849).
    #[test]
    fn nominal_and_ordinal_alpha_match_the_worked_example() {
        let units: Vec<Vec<f64>> = krippendorff_example().into_iter().map(|row| row.into_iter().flatten().collect()).collect();
        let alpha = |metric| krippendorff_alpha(&units, metric).unwrap();
        assert!((alpha(Metric::Nominal) - 0.743).abs() < 5e-4, "{}", alpha(Metric::Nominal));
        assert!((alpha(Metric::Ordinal) - 0.815).abs() < 5e-4, "{}", alpha(Metric::Ordinal));
        assert!((alpha(Metric::Interval) - 0.849).abs() < 5e-4);
        // Full agreement is 1 whatever the metric; values that never vary give none.
        assert_eq!(krippendorff_alpha(&[vec![1., 1.], vec![2., 2., 2.]], Metric::Ordinal), Some(1.0));
        assert_eq!(krippendorff_alpha(&[vec![1., 1.]], Metric::Nominal), None);
    }

    /// Wikipedia's "Cohen's kappa" example: 50 proposals, both readers say yes to 20 and no
    /// to 15, A yes and B no 5, A no and B yes 10: p_o = 0.7, p_e = 0.5, κ = 0.4.
    #[test]
    fn cohen_kappa_matches_the_worked_example() {
        let mut pairs = Vec::new();
        for (a, b, count) in [(true, true, 20), (true, false, 5), (false, true, 10), (false, false, 15)] {
            pairs.extend(std::iter::repeat_n((a, b), count));
        }
        assert!((cohen_kappa(&pairs).unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(cohen_kappa(&[(1, 1), (1, 1)]), None, "chance agreement is certain");
        assert_eq!(cohen_kappa::<u8>(&[]), None);
    }

    /// Wikipedia's "Fleiss' kappa" example: 10 subjects, 14 raters each, 5 categories:
    /// P̄ = 0.378, P̄_e = 0.213, κ = 0.210.
    #[test]
    fn fleiss_kappa_matches_the_worked_example() {
        let table = vec![
            vec![0, 0, 0, 0, 14],
            vec![0, 2, 6, 4, 2],
            vec![0, 0, 3, 5, 6],
            vec![0, 3, 9, 2, 0],
            vec![2, 2, 8, 1, 1],
            vec![7, 7, 0, 0, 0],
            vec![3, 2, 6, 3, 0],
            vec![2, 5, 3, 2, 2],
            vec![6, 5, 2, 1, 0],
            vec![0, 2, 2, 3, 7],
        ];
        assert!((fleiss_kappa(&table).unwrap() - 0.20993).abs() < 5e-5, "{:?}", fleiss_kappa(&table));
        assert_eq!(fleiss_kappa(&[vec![1, 0]]), None, "rated once");
    }

    /// Two annotators on four items, labels as yes/no: Fleiss over two raters and Cohen agree
    /// in sign; agreement on every item is 1.
    #[test]
    fn label_agreement_per_label() {
        let ticked = vec![vec![(0, true), (1, true)], vec![(0, false), (1, false)], vec![(0, true), (1, false)], vec![(0, false), (1, false)], vec![(2, true)]];
        let a = label_agreement("hate", &ticked);
        assert_eq!((a.items_rated_twice, a.cohen_pairs), (4, 1));
        // Cohen: p_o = 3/4; A says yes 2/4, B 1/4: p_e = 2/4·1/4 + 2/4·3/4 = 1/2; κ = 1/2.
        assert!((a.cohen_kappa.unwrap() - 0.5).abs() < 1e-12, "{a:?}");
        assert!(a.fleiss_kappa.unwrap() > 0.0 && a.fleiss_kappa.unwrap() < 0.5);
        assert!((a.positive_rate.unwrap() - 4.0 / 9.0).abs() < 1e-12);
        let same = vec![vec![(0, true), (1, true)], vec![(0, false), (1, false)]];
        assert_eq!(label_agreement("x", &same).cohen_kappa, Some(1.0));
        assert_eq!(label_agreement("x", &same).fleiss_kappa, Some(1.0));
    }

    /// By hand, two raters, items (1, 2), (3, 3), (5, 4): n = 6 values, Σv = 18, Σv² = 64.
    /// Within items: 2·(1² + 0² + 1²) / 1 = 4, so D_o = 4/6. Pooled: 2·(6·64 − 18²) = 120,
    /// so D_e = 120/30 = 4. Alpha = 1 − (2/3)/4 = 5/6.
    #[test]
    fn alpha_by_hand_and_its_edges() {
        let alpha = krippendorff_alpha_interval(&[vec![1., 2.], vec![3., 3.], vec![5., 4.]]).unwrap();
        assert!((alpha - 5.0 / 6.0).abs() < 1e-12, "{alpha}");
        assert_eq!(krippendorff_alpha_interval(&[vec![2., 2.], vec![5., 5.], vec![7.]]), Some(1.0));
        assert_eq!(krippendorff_alpha_interval(&[vec![3., 3.], vec![3., 3.]]), None, "no variation at all");
        assert_eq!(krippendorff_alpha_interval(&[vec![3.], vec![4.]]), None, "no item rated twice");
    }

    #[test]
    fn pairwise_spearman_uses_the_items_both_rated() {
        let s = |v: f64| Some(v);
        // Annotators 0 and 1 agree in order; 2 reverses 0 on the items they share.
        let table = vec![vec![s(1.), s(2.), s(3.)], vec![s(2.), s(3.), s(2.)], vec![s(3.), s(5.), None]];
        let result = agreement(&table, 3);
        // Pairs: (0,1) = 1; (0,2) = -1; (1,2) over two items = -1.
        assert_eq!(result.spearman_pairs, 3);
        assert!((result.mean_pairwise_spearman.unwrap() - (-1.0 / 3.0)).abs() < 1e-12, "{result:?}");
        assert_eq!(result.items_rated_twice, 3);
    }
}
