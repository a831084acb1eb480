//! Episodes: one sampled response to one prompt, with everything PPO reads from it (old
//! log-probabilities, reference log-probabilities, values, advantages, returns), and the padded
//! layout in which a batch of episodes goes through a model.

use candle_core::{D, DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::model::{ForwardOptions, Decoder};
use crate::model::ops::token_logprobs;

/// One sampled response. Per-token vectors have one entry per response token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Episode {
    /// Index of the prompt in the training prompts.
    pub prompt: usize,
    pub sample: u32,
    pub query: Vec<u32>,
    /// The sampled tokens, the EOS that ended them included (it is an action too).
    pub response: Vec<u32>,
    pub stopped: bool,
    /// The response decoded, without the EOS.
    pub text: String,
    /// The reward: the scorer's score, minus the missing-EOS penalty where it applies.
    #[serde(with = "bits")]
    pub score: f32,
    #[serde(with = "bits_vec")]
    pub logprobs: Vec<f32>,
    #[serde(with = "bits_vec")]
    pub ref_logprobs: Vec<f32>,
    #[serde(with = "bits_vec")]
    pub values: Vec<f32>,
    #[serde(with = "bits_vec")]
    pub kl: Vec<f32>,
    #[serde(with = "bits_vec")]
    pub advantages: Vec<f32>,
    #[serde(with = "bits_vec")]
    pub returns: Vec<f32>,
}

/// Floats saved as their bit patterns: a resumed run must continue from exactly these values.
mod bits {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(x.to_bits())
    }

    pub fn deserialize<'de, De: Deserializer<'de>>(d: De) -> Result<f32, De::Error> {
        Ok(f32::from_bits(u32::deserialize(d)?))
    }
}

mod bits_vec {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(x: &[f32], s: S) -> Result<S::Ok, S::Error> {
        x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>().serialize(s)
    }

    pub fn deserialize<'de, De: Deserializer<'de>>(d: De) -> Result<Vec<f32>, De::Error> {
        Ok(Vec::<u32>::deserialize(d)?.into_iter().map(f32::from_bits).collect())
    }
}

/// Episodes side by side: queries left-padded to a common start, responses right after them,
/// right-padded. Position `start − 1 + t` predicts response token `t`.
pub struct Layout {
    ids: Tensor,
    attention: Tensor,
    positions: Tensor,
    start: usize,
    pub width: usize,
    /// `[B, width]`: the response tokens (padding where a response is shorter).
    pub tokens: Tensor,
    /// `[B, width]` f32: 1 on response tokens.
    pub mask: Tensor,
}

impl Layout {
    pub fn new(episodes: &[&Episode], pad: u32, device: &Device) -> Result<Self> {
        let start = episodes.iter().map(|e| e.query.len()).max().unwrap_or(1);
        let width = episodes.iter().map(|e| e.response.len()).max().unwrap_or(1).max(1);
        let total = start + width;
        let b = episodes.len();
        let (mut ids, mut attention, mut positions) = (Vec::with_capacity(b * total), Vec::with_capacity(b * total), Vec::with_capacity(b * total));
        let (mut tokens, mut mask) = (Vec::with_capacity(b * width), Vec::with_capacity(b * width));
        for e in episodes {
            let left = start - e.query.len();
            ids.extend(std::iter::repeat_n(pad, left).chain(e.query.iter().copied()).chain(e.response.iter().copied()));
            ids.extend(std::iter::repeat_n(pad, width - e.response.len()));
            attention.extend(std::iter::repeat_n(0u32, left).chain(std::iter::repeat_n(1, total - left)));
            positions.extend((0..total).map(|j| j.saturating_sub(left) as u32));
            tokens.extend(e.response.iter().copied().chain(std::iter::repeat_n(pad, width - e.response.len())));
            mask.extend((0..width).map(|t| if t < e.response.len() { 1f32 } else { 0.0 }));
        }
        Ok(Layout {
            ids: Tensor::from_vec(ids, (b, total), device)?,
            attention: Tensor::from_vec(attention, (b, total), device)?,
            positions: Tensor::from_vec(positions, (b, total), device)?,
            start,
            width,
            tokens: Tensor::from_vec(tokens, (b, width), device)?,
            mask: Tensor::from_vec(mask, (b, width), device)?,
        })
    }

    /// Hidden states `[B, width, hidden]` at the positions that predict response tokens.
    pub fn response_hidden(&self, model: &Decoder) -> Result<Tensor> {
        let options = ForwardOptions { attention_mask: Some(&self.attention), position_ids: Some(&self.positions), segment_ids: None };
        let hidden = model.forward(&self.ids, options, None)?;
        Ok(hidden.narrow(1, self.start - 1, self.width)?)
    }

    /// Log-probabilities `[B, width]` of the response tokens at sampling temperature, and the
    /// entropies `[B, width]` (detached) of the distributions they were drawn from.
    pub fn logprobs(&self, model: &Decoder, temperature: f64) -> Result<(Tensor, Tensor)> {
        let logits = model.lm_logits(&self.response_hidden(model)?)?;
        let (b, width, vocab) = logits.dims3()?;
        let (logp, entropy) = token_logprobs(&logits.reshape((b * width, vocab))?, &self.tokens.flatten_all()?, temperature)?;
        Ok((logp.reshape((b, width))?, entropy.reshape((b, width))?))
    }

    /// Values `[B, width]` from a one-label `score` head.
    pub fn values(&self, model: &Decoder) -> Result<Tensor> {
        Ok(model.class_scores(&self.response_hidden(model)?)?.squeeze(D::Minus1)?)
    }

    /// `[B, width]` tensor of per-episode vectors, zero-padded.
    pub fn pack(&self, rows: &[&[f32]]) -> Result<Tensor> {
        let mut out = Vec::with_capacity(rows.len() * self.width);
        for row in rows {
            out.extend_from_slice(row);
            out.extend(std::iter::repeat_n(0f32, self.width - row.len()));
        }
        Ok(Tensor::from_vec(out, (rows.len(), self.width), self.mask.device())?)
    }
}

/// Per-episode vectors back from a `[B, width]` tensor, cut to each response's length.
pub fn unpack(values: &Tensor, episodes: &[&Episode]) -> Result<Vec<Vec<f32>>> {
    let rows: Vec<Vec<f32>> = values.detach().to_dtype(DType::F32)?.to_vec2()?;
    Ok(rows.into_iter().zip(episodes).map(|(mut row, e)| {
        row.truncate(e.response.len());
        row
    }).collect())
}

/// Mean entropy (nats) over the masked positions of per-token entropies `[B, T]`.
pub fn mean_entropy(entropy: &Tensor, mask: &Tensor) -> Result<f64> {
    Ok(super::loss::masked_mean(entropy, mask)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An episode with only its tokens set (and placeholder score and log-probabilities).
    pub(crate) fn episode(query: &[u32], response: &[u32]) -> Episode {
        Episode {
            prompt: 0,
            sample: 0,
            query: query.to_vec(),
            response: response.to_vec(),
            stopped: false,
            text: String::new(),
            score: 0.25,
            logprobs: vec![-0.1; response.len()],
            ref_logprobs: vec![],
            values: vec![],
            kl: vec![],
            advantages: vec![],
            returns: vec![],
        }
    }

    #[test]
    fn layout_left_pads_queries_and_right_pads_responses() {
        let (a, b) = (episode(&[5, 6, 7], &[8]), episode(&[9], &[10, 11, 12]));
        let layout = Layout::new(&[&a, &b], 0, &Device::Cpu).unwrap();
        let ids: Vec<Vec<u32>> = layout.ids.to_vec2().unwrap();
        assert_eq!(ids, vec![vec![5, 6, 7, 8, 0, 0], vec![0, 0, 9, 10, 11, 12]]);
        let positions: Vec<Vec<u32>> = layout.positions.to_vec2().unwrap();
        assert_eq!(positions[1], vec![0, 0, 0, 1, 2, 3]);
        let mask: Vec<Vec<f32>> = layout.mask.to_vec2().unwrap();
        assert_eq!(mask, vec![vec![1.0, 0.0, 0.0], vec![1.0, 1.0, 1.0]]);
        let packed = layout.pack(&[&a.logprobs, &[1.0, 2.0, 3.0]]).unwrap();
        assert_eq!(unpack(&packed, &[&a, &b]).unwrap(), vec![vec![-0.1], vec![1.0, 2.0, 3.0]]);
    }

    #[test]
    fn episodes_round_trip_bit_exactly() {
        let mut e = episode(&[1], &[2, 3]);
        e.values = vec![0.1 + 0.2, f32::MIN_POSITIVE, -1.0 / 3.0];
        let back: Episode = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
        assert!(back.values.iter().zip(&e.values).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
