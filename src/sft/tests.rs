use std::path::PathBuf;

use candle_core::Device;

use super::*;

fn fixture_model() -> (ModelFolder, LoadedTokenizer, Decoder, Params) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/hf-tiny/causal-lm");
    let folder = ModelFolder::open(dir.to_str().unwrap()).unwrap();
    let tokenizer = folder.load_tokenizer().unwrap();
    let (model, params) = folder.load_model(&Device::Cpu).unwrap();
    (folder, tokenizer, model, params)
}

fn renderer(folder: &ModelFolder, train_on_prompt: bool) -> Renderer {
    Renderer { template: folder.chat().unwrap(), train_on_prompt, prompt_completion_as_chat: false, eos_id: Some(0) }
}

fn conversation() -> Vec<Message> {
    vec![
        Message::new("system", "Be brief."),
        Message::new("user", "Say hi."),
        Message::new("assistant", "Hi!"),
        Message::new("user", "Again, louder."),
        Message::new("assistant", "HELLO!"),
    ]
}

fn loss(model: &Decoder, example: &Example) -> f32 {
    let out = sequence_loss(model, std::slice::from_ref(example), &[vec![0]], 1).unwrap();
    (out.sum / out.count as f64).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn every_assistant_turn_and_nothing_else_is_trained() {
    let (folder, tokenizer, _, _) = fixture_model();
    let marked = renderer(&folder, false).chat(&tokenizer, &conversation()).unwrap().unwrap();
    let example = Example::shifted(&marked);
    let trained: Vec<u32> = (0..example.ids.len()).filter(|&p| example.counted[p]).map(|p| example.targets[p]).collect();
    assert_eq!(tokenizer.decode(&trained).unwrap(), "Hi!<|im_end|>\nHELLO!<|im_end|>\n");

    let everything = renderer(&folder, true).chat(&tokenizer, &conversation()).unwrap().unwrap();
    assert!(everything.trained.iter().all(|&t| t));
    let no_answer = renderer(&folder, false).chat(&tokenizer, &conversation()[..2]).unwrap();
    assert_eq!(no_answer, None);
}

#[test]
fn the_loss_reads_answer_targets_only() {
    let (folder, tokenizer, model, _) = fixture_model();
    let example = Example::shifted(&renderer(&folder, false).chat(&tokenizer, &conversation()).unwrap().unwrap());
    let base = loss(&model, &example);
    let (mut prompt_checked, mut answer_checked) = (0, 0);
    for p in 0..example.ids.len() {
        let mut changed = example.clone();
        changed.targets[p] = (example.targets[p] + 7) % 64;
        let after = loss(&model, &changed);
        if example.counted[p] {
            assert_ne!(after, base, "changing the answer target at {p} must change the loss");
            answer_checked += 1;
        } else {
            assert_eq!(after, base, "changing the prompt target at {p} must not change the loss");
            prompt_checked += 1;
        }
    }
    assert!(prompt_checked > 10 && answer_checked >= 6, "{prompt_checked} prompt, {answer_checked} answer positions");
}

#[test]
fn prompt_completion_trains_the_completion_and_eos() {
    let (folder, tokenizer, _, _) = fixture_model();
    let marked = renderer(&folder, false).prompt_completion(&tokenizer, "Question: two plus two?", " Four.").unwrap().unwrap();
    assert_eq!(marked.ids.last(), Some(&0));
    let answer: Vec<u32> = marked.ids.iter().zip(&marked.trained).filter(|(_, t)| **t).map(|(id, _)| *id).collect();
    assert_eq!(tokenizer.decode(&answer).unwrap(), " Four.<|endoftext|>");
}

#[test]
fn a_packed_row_scores_each_sample_as_if_alone() {
    let (folder, tokenizer, model, _) = fixture_model();
    let r = renderer(&folder, false);
    let a = Example::shifted(&r.chat(&tokenizer, &conversation()).unwrap().unwrap());
    let b = Example::shifted(&r.prompt_completion(&tokenizer, "To be or not", " to be.").unwrap().unwrap());
    let examples = vec![a, b];
    let alone: Vec<RowsLoss> = (0..2).map(|i| sequence_loss(&model, &examples, &[vec![i]], 1).unwrap()).collect();
    let packed = sequence_loss(&model, &examples, &[vec![0, 1]], 1).unwrap();
    let padded = sequence_loss(&model, &examples, &[vec![0], vec![1]], 1).unwrap();
    let sum = |l: &RowsLoss| l.sum.to_scalar::<f32>().unwrap();
    let separate = sum(&alone[0]) + sum(&alone[1]);
    assert_eq!(packed.count, alone[0].count + alone[1].count);
    assert!((sum(&packed) - separate).abs() < 1e-4, "packed {} vs separate {separate}", sum(&packed));
    assert!((sum(&padded) - separate).abs() < 1e-4, "padded {} vs separate {separate}", sum(&padded));
}

#[test]
fn packing_fills_rows_without_overflow() {
    let lengths = [7, 3, 5, 2, 6, 1, 4];
    let rows = pack(&lengths, 8);
    let mut seen: Vec<usize> = rows.iter().flatten().copied().collect();
    seen.sort();
    assert_eq!(seen, (0..7).collect::<Vec<_>>());
    assert!(rows.iter().all(|r| r.iter().map(|&i| lengths[i]).sum::<usize>() <= 8));
    assert_eq!(rows.len(), 4);
}

#[test]
fn length_grouped_batches_cover_the_epoch_once() {
    let lengths: Vec<usize> = (0..100).map(|i| (i * 37) % 91).collect();
    let batches = length_grouped_batches(&lengths, 4, 3, 0);
    let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
    seen.sort();
    assert_eq!(seen, (0..100).collect::<Vec<_>>());
    assert_eq!(batches.len(), 25);
    assert_eq!(batches, length_grouped_batches(&lengths, 4, 3, 0));
}
