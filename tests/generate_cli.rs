//! The `generate` binary: the fixture's greedy continuations, reproducible sampling (refusals: bad_input_catalogue.rs).

mod common;

use std::path::Path;

use lathe::data::records::{RecordReader, RecordWriter, ResponseRecord};
use lathe::data::{Message, PromptRecord};
use lathe::data::records::Prompt;
use lathe::tokenizer::LoadedTokenizer;

use common::{ok, s, testdata};

fn fixture() -> std::path::PathBuf {
    testdata("hf-tiny/causal-lm")
}

fn write_prompts(path: &Path, prompts: Vec<PromptRecord>) {
    let mut writer = RecordWriter::<PromptRecord>::create(path, "test", vec![], vec![]).unwrap();
    writer.write(&prompts, vec![]).unwrap();
    writer.finish().unwrap();
}

fn text(prompt: &str) -> PromptRecord {
    PromptRecord { prompt_id: None, prompt: Prompt::Text(prompt.into()) }
}

fn responses(path: &Path) -> Vec<ResponseRecord> {
    RecordReader::<ResponseRecord>::open(path).unwrap().read_all().unwrap()
}

#[test]
fn greedy_reproduces_the_fixture_token_for_token() {
    let dir = tempfile::tempdir().unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(testdata("hf-tiny/expected.json")).unwrap()).unwrap();
    let probes: Vec<String> =
        expected["causal_lm"]["probes"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
    let prompts = dir.path().join("prompts.parquet");
    write_prompts(&prompts, probes.iter().map(|p| text(p)).collect());
    let out = dir.path().join("out.parquet");
    ok("generate", &[s(&prompts), "--model", s(&fixture()), "--temperature", "0", "--max-new-tokens", "16", "-o", s(&out), "-q"]);

    let tokens = candle_core::safetensors::load(testdata("hf-tiny/expected_logits.safetensors"), &candle_core::Device::Cpu).unwrap();
    let tokenizer = LoadedTokenizer::load(&fixture()).unwrap();
    let rows = responses(&out);
    assert_eq!(rows.len(), 2);
    for (i, row) in rows.iter().enumerate() {
        let want: Vec<u32> = tokens[&format!("greedy.{i}")].to_dtype(candle_core::DType::U32).unwrap().to_vec1().unwrap();
        assert_eq!(tokenizer.encode_prompt(&row.prompt).unwrap(),
                   tokens[&format!("input_ids.{i}")].to_dtype(candle_core::DType::U32).unwrap().to_vec1::<u32>().unwrap());
        assert_eq!(row.response, tokenizer.decode(&want).unwrap(), "probe {i}");
        assert_eq!((row.num_tokens, row.finish_reason.as_str(), row.prompt_id.as_str()), (16, "length", i.to_string().as_str()));
        let want_logprob = tokens[&format!("greedy_logprob.{i}")].to_vec1::<f32>().unwrap()[0] as f64;
        assert!((row.logprob - want_logprob).abs() < 1e-3);
    }
}

#[test]
fn the_same_seed_gives_the_same_samples() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.parquet");
    let chat = PromptRecord { prompt_id: Some("chat".into()), prompt: Prompt::Messages(vec![Message::new("user", "Say hi.")]) };
    write_prompts(&prompts, vec![text("ROMEO:"), text("First Citizen:"), chat]);
    let sample = |seed: &str, batch: &str, name: &str| {
        let out = dir.path().join(name);
        ok("generate", &[s(&prompts), "--model", s(&fixture()), "-n", "3", "--max-new-tokens", "12", "--temperature", "1.0",
                         "--top-k", "50", "--top-p", "0.9", "--seed", seed, "--batch-size", batch, "-o", s(&out), "-q"]);
        responses(&out)
    };
    let first = sample("7", "4", "a.parquet");
    assert_eq!(first.len(), 9);
    assert_eq!(first, sample("7", "4", "again.parquet"), "the same command gave other samples");
    // Another batch size rounds differently in the last bits of the log-probabilities only.
    let unbatched = sample("7", "1", "b.parquet");
    for (a, b) in first.iter().zip(&unbatched) {
        assert_eq!((&a.response, a.num_tokens), (&b.response, b.num_tokens), "batching changed a sample");
        assert!((a.logprob - b.logprob).abs() < 1e-4);
    }
    assert_ne!(first, sample("8", "4", "c.parquet"), "another seed gave the same samples");
    assert!(first[6].prompt.starts_with("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"));
    assert_eq!(first[6].prompt_id, "chat");
    assert_eq!((first[7].sample, first[8].sample), (1, 2));
}

