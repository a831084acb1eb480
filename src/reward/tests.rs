use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp};

use super::*;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/hf-tiny")
}

#[test]
fn scores_and_bradley_terry_loss_match_transformers() {
    let folder = ModelFolder::open(fixture().join("reward-model").to_str().unwrap()).unwrap();
    let (model, _) = folder.load_model(&Device::Cpu).unwrap();
    let tensors = candle_core::safetensors::load(fixture().join("expected_rewards.safetensors"), &Device::Cpu).unwrap();
    let ids: Vec<Vec<u32>> = tensors["input_ids"].to_dtype(DType::U32).unwrap().to_vec2().unwrap();
    let mask: Vec<Vec<u32>> = tensors["attention_mask"].to_dtype(DType::U32).unwrap().to_vec2().unwrap();
    // Rows as the fixture right-padded them; we pad again ourselves.
    let rows: Vec<Vec<u32>> = ids.iter().zip(&mask).map(|(r, m)| r.iter().zip(m).filter(|(_, m)| **m == 1).map(|(t, _)| *t).collect()).collect();
    let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let scores = score_rows(&model, &refs, folder.config.pad_token_id.unwrap()).unwrap();
    let ours: Vec<f32> = scores.squeeze(1).unwrap().to_vec1().unwrap();
    let expected: Vec<f32> = tensors["scores"].to_vec1().unwrap();
    for (row, (a, b)) in ours.iter().zip(&expected).enumerate() {
        assert!((a - b).abs() <= 1e-4, "row {row}: {a} vs {b}");
    }

    let reference: Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap()).unwrap();
    let k = reference["reward_model"]["k"].as_u64().unwrap() as usize;
    let expected_loss = reference["reward_model"]["bradley_terry_loss_first_k_vs_last_k"].as_f64().unwrap();
    let rewards = scores.squeeze(1).unwrap();
    let n = rewards.dim(0).unwrap();
    let loss = bradley_terry_loss(&rewards.i(0..k).unwrap(), &rewards.i(n - k..n).unwrap(), None).unwrap();
    let loss = loss.to_scalar::<f32>().unwrap() as f64;
    assert!((loss - expected_loss).abs() <= 1e-4, "Bradley–Terry loss {loss} vs {expected_loss}");
}

#[test]
fn packed_rows_score_as_each_row_alone() {
    let folder = ModelFolder::open(fixture().join("reward-model").to_str().unwrap()).unwrap();
    let (model, _) = folder.load_model(&Device::Cpu).unwrap();
    let pad = folder.config.pad_token_id.unwrap();
    // One long row and short ones that fit two or three to a row of its length.
    let rows: Vec<Vec<u32>> = [12usize, 3, 5, 4, 7, 2, 9]
        .iter()
        .enumerate()
        .map(|(i, &len)| (0..len as u32).map(|j| 5 + (i as u32 * 7 + j * 3) % 40).collect())
        .collect();
    let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
    assert!(pack(&lengths, 12).len() < rows.len(), "the rows pack");
    let together: Vec<f32> = score_rows(&model, &refs, pad).unwrap().squeeze(1).unwrap().to_vec1().unwrap();
    for (i, row) in refs.iter().enumerate() {
        let alone: Vec<f32> = score_rows(&model, std::slice::from_ref(row), pad).unwrap().squeeze(1).unwrap().to_vec1().unwrap();
        assert!((together[i] - alone[0]).abs() <= 1e-5, "row {i}: {} packed vs {} alone", together[i], alone[0]);
    }
}

#[test]
fn scoring_format_appends_eos_and_keeps_the_end() {
    let folder = ModelFolder::open(fixture().join("reward-model").to_str().unwrap()).unwrap();
    let tokenizer = folder.load_tokenizer().unwrap();
    let format = ScoringFormat { append_eos: true, max_length: 4, truncation: Truncation::Left };
    let full = tokenizer.encode_prompt("Human: hi\n\nAssistant: Hello there").unwrap();
    let (ids, truncated) = format.encode(&tokenizer, "Human: hi\n\nAssistant: Hello there", Some(0)).unwrap();
    let ids = ids.unwrap();
    assert!(truncated);
    assert_eq!(ids.len(), 4);
    assert_eq!(ids[3], 0);
    assert_eq!(ids[..3], full[full.len() - 3..]);
    let drop = ScoringFormat { truncation: Truncation::Drop, ..format };
    assert_eq!(drop.encode(&tokenizer, "Human: hi\n\nAssistant: Hello there", Some(0)).unwrap(), (None, true));
}

#[test]
fn softplus_is_stable_and_exact() {
    let x = Tensor::new(&[-100f32, -1.0, 0.0, 1.0, 100.0], &Device::Cpu).unwrap();
    let y: Vec<f32> = softplus(&x).unwrap().to_vec1().unwrap();
    let expected = [0.0, 0.31326169, std::f32::consts::LN_2, 1.31326169, 100.0];
    for (a, b) in y.iter().zip(expected) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
}
