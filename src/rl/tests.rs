use candle_core::Device;

use super::rollout::tests::episode;
use super::rollout::{Episode, Layout, unpack};
use crate::generate::{Generator, Sampling, sample_rng};
use crate::model::{Decoder, ModelFolder};

fn fixture_model() -> Decoder {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/hf-tiny/causal-lm");
    let folder = ModelFolder::open(dir.to_str().unwrap()).unwrap();
    let params = folder.load_params(&Device::Cpu).unwrap();
    Decoder::new(&folder.config, &params).unwrap()
}

/// The log-probabilities PPO trains on (one padded forward over prompt + response) are those
/// the sampler drew from (the KV cache, token by token), alone or padded among others.
#[test]
fn training_logprobs_match_sampling_and_ignore_padding() {
    let model = fixture_model();
    let prompts = vec![vec![5u32, 17, 33, 2, 9, 41], vec![7u32, 8]];
    let generator = Generator { model: &model, eos: vec![0], pad: 3, max_new_tokens: 12, sampling: Sampling { temperature: 1.0, top_k: 0, top_p: 1.0 }, ignore_eos: true };
    let mut rngs: Vec<_> = (0..2).map(|i| sample_rng(7, i, 0)).collect();
    let completions = generator.run(&prompts, &mut rngs, |_| {}).unwrap();
    let episodes: Vec<Episode> = prompts.iter().zip(&completions).map(|(p, c)| episode(p, &c.tokens)).collect();
    let refs: Vec<&Episode> = episodes.iter().collect();
    let batched = unpack(&Layout::new(&refs, 3, &Device::Cpu).unwrap().logprobs(&model, 1.0).unwrap().0, &refs).unwrap();
    for (i, (e, c)) in episodes.iter().zip(&completions).enumerate() {
        let alone = unpack(&Layout::new(&[e], 3, &Device::Cpu).unwrap().logprobs(&model, 1.0).unwrap().0, &[e]).unwrap().remove(0);
        assert!(alone.iter().zip(&batched[i]).all(|(a, b)| (a - b).abs() < 1e-4), "episode {i}: {alone:?} vs {:?}", batched[i]);
        let sum: f64 = alone.iter().map(|&l| l as f64).sum();
        assert!((sum - c.logprob).abs() < 1e-3, "episode {i}: forward {sum} vs sampler {}", c.logprob);
    }
}
