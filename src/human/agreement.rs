//! How far annotators agree: Krippendorff's alpha with the interval metric (any number of
//! annotators, missing ratings allowed) and the mean Spearman correlation over annotator pairs.

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
    /// observers, twelve units, missing values; the interval alpha is 0.849. Unit 12 holds a
    /// single value and does not count.
    #[test]
    fn alpha_matches_krippendorffs_worked_example() {
        let n = None;
        let observers: [[Option<f64>; 12]; 4] = [
            [Some(1.), Some(2.), Some(3.), Some(3.), Some(2.), Some(1.), Some(4.), Some(1.), Some(2.), n, n, n],
            [Some(1.), Some(2.), Some(3.), Some(3.), Some(2.), Some(2.), Some(4.), Some(1.), Some(2.), Some(5.), n, Some(3.)],
            [n, Some(3.), Some(3.), Some(3.), Some(2.), Some(3.), Some(4.), Some(2.), Some(2.), Some(5.), Some(1.), n],
            [Some(1.), Some(2.), Some(3.), Some(3.), Some(2.), Some(4.), Some(4.), Some(1.), Some(2.), Some(5.), Some(1.), n],
        ];
        let table: Vec<Vec<Option<f64>>> = (0..12).map(|unit| observers.iter().map(|o| o[unit]).collect()).collect();
        let result = agreement(&table, 4);
        assert_eq!(result.items_rated_twice, 11);
        assert!((result.krippendorff_alpha.unwrap() - 0.849).abs() < 5e-4, "{result:?}");
        assert_eq!(result.spearman_pairs, 6);
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
