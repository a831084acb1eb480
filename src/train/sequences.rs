//! Variable-length token sequences for the fine-tuning stages: the over-length policy, right
//! padding, packing several sequences into one row, and reading one position per row.

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::error::Result;
use crate::progress;

/// What to do with a sequence longer than `--max-length`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Keep the start, cut the end.
    Right,
    /// Keep the end (the answer and its EOS), cut the start.
    Left,
    /// Leave the example out.
    Drop,
}

/// Counts of what the length policy did, reported before training.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct LengthReport {
    pub examples: usize,
    pub truncated: usize,
    pub dropped: usize,
}

impl LengthReport {
    /// `unit`: what was counted (`examples`, `sequences`).
    pub fn log(&self, what: &str, unit: &str, max_length: usize, policy: Truncation) {
        if self.truncated + self.dropped == 0 {
            return;
        }
        let action = match policy {
            Truncation::Drop => format!("{} dropped", self.dropped),
            _ => format!("{} truncated ({}){}", self.truncated, format!("{policy:?}").to_lowercase(), match self.dropped {
                0 => String::new(),
                n => format!(", {n} dropped"),
            }),
        };
        progress::warn(format!(
            "{what}: {} of {} {unit} were longer than --max-length {max_length}: {action}",
            self.truncated + self.dropped,
            self.examples
        ));
    }
}

/// The part of `0..len` a policy keeps, `None` to drop.
pub fn kept_range(len: usize, max_length: usize, policy: Truncation) -> Option<std::ops::Range<usize>> {
    if len <= max_length {
        return Some(0..len);
    }
    match policy {
        Truncation::Right => Some(0..max_length),
        Truncation::Left => Some(len - max_length..len),
        Truncation::Drop => None,
    }
}

/// `[B, T]` ids right-padded with `pad` to the longest row. Under causal attention padding at
/// the end is never seen by a real token, so no attention mask is needed.
pub fn pad_right(rows: &[&[u32]], pad: u32, device: &Device) -> Result<Tensor> {
    let longest = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(rows.len() * longest);
    for row in rows {
        ids.extend_from_slice(row);
        ids.extend(std::iter::repeat_n(pad, longest - row.len()));
    }
    Ok(Tensor::from_vec(ids, (rows.len(), longest), device)?)
}

/// Rows of `hidden` `[B, T, H]` at one position each (`positions[b] < T`): `[B, H]`.
pub fn gather_positions(hidden: &Tensor, positions: &[usize]) -> Result<Tensor> {
    let places: Vec<(usize, usize)> = positions.iter().copied().enumerate().collect();
    gather_places(hidden, &places)
}

/// `hidden` `[B, T, H]` at each `(row, position)`: `[places, H]`.
pub fn gather_places(hidden: &Tensor, places: &[(usize, usize)]) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let index: Vec<u32> = places.iter().map(|&(row, p)| (row * t + p) as u32).collect();
    let index = Tensor::from_vec(index, places.len(), hidden.device())?;
    Ok(hidden.reshape((b * t, h))?.index_select(&index, 0)?)
}

/// A row of a batch: one sequence, or several packed one after another (by index).
pub type Row = Vec<usize>;

/// Best-fit decreasing: sequences (longest first) go into the fullest row they fit in.
pub fn pack(lengths: &[usize], capacity: usize) -> Vec<Row> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut rows: Vec<(usize, Row)> = Vec::new();
    for i in order {
        let best = rows
            .iter_mut()
            .filter(|(used, _)| used + lengths[i] <= capacity)
            .max_by_key(|(used, _)| *used);
        match best {
            Some((used, row)) => {
                *used += lengths[i];
                row.push(i);
            }
            None => rows.push((lengths[i], vec![i])),
        }
    }
    rows.into_iter().map(|(_, row)| row).collect()
}

/// Sequences laid out in rows, right-padded to the longest row. Where a row holds several,
/// each restarts its positions at 0 and attends only within its segment (`segment_ids`), so
/// every sequence sees what it would see alone.
pub struct PackedRows {
    pub input_ids: Tensor,
    /// Present when some row holds more than one sequence.
    pub position_ids: Option<Tensor>,
    pub segment_ids: Option<Tensor>,
    /// `(row, first position)` of each sequence, in the order given.
    pub places: Vec<(usize, usize)>,
    /// Tokens that are not padding.
    pub tokens: usize,
}

impl PackedRows {
    pub fn build(sequences: &[&[u32]], rows: &[Row], pad: u32, device: &Device) -> Result<Self> {
        let lengths: Vec<usize> = rows.iter().map(|r| r.iter().map(|&i| sequences[i].len()).sum()).collect();
        let longest = lengths.iter().copied().max().unwrap_or(1).max(1);
        let packed = rows.iter().any(|r| r.len() > 1);
        let (mut ids, mut positions, mut segments) = (Vec::new(), Vec::new(), Vec::new());
        let mut places = vec![(0, 0); sequences.len()];
        for (r, row) in rows.iter().enumerate() {
            let mut at = 0;
            for (segment, &i) in row.iter().enumerate() {
                places[i] = (r, at);
                ids.extend_from_slice(sequences[i]);
                positions.extend(0..sequences[i].len() as u32);
                segments.extend(std::iter::repeat_n(segment as u32, sequences[i].len()));
                at += sequences[i].len();
            }
            let padding = longest - lengths[r];
            ids.extend(std::iter::repeat_n(pad, padding));
            positions.extend(std::iter::repeat_n(0, padding));
            segments.extend(std::iter::repeat_n(u32::MAX, padding));
        }
        let shape = (rows.len(), longest);
        Ok(PackedRows {
            input_ids: Tensor::from_vec(ids, shape, device)?,
            position_ids: packed.then(|| Tensor::from_vec(positions, shape, device)).transpose()?,
            segment_ids: packed.then(|| Tensor::from_vec(segments, shape, device)).transpose()?,
            places,
            tokens: lengths.iter().sum(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_policies_keep_the_promised_part() {
        assert_eq!(kept_range(5, 8, Truncation::Drop), Some(0..5));
        assert_eq!(kept_range(10, 8, Truncation::Right), Some(0..8));
        assert_eq!(kept_range(10, 8, Truncation::Left), Some(2..10));
        assert_eq!(kept_range(10, 8, Truncation::Drop), None);
    }

    #[test]
    fn padding_and_gathering_line_up() {
        let ids = pad_right(&[&[5, 6, 7], &[8]], 1, &Device::Cpu).unwrap();
        assert_eq!(ids.to_vec2::<u32>().unwrap(), vec![vec![5, 6, 7], vec![8, 1, 1]]);
        let hidden = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((2, 3, 2)).unwrap();
        let picked = gather_positions(&hidden, &[2, 0]).unwrap();
        assert_eq!(picked.to_vec2::<f32>().unwrap(), vec![vec![4.0, 5.0], vec![6.0, 7.0]]);
    }
}
