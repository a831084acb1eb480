//! Pretraining: token Parquet concatenated (every document ends with EOS), cut into fixed-length
//! blocks, shuffled by seed each epoch, and trained on next-token cross-entropy by the engine.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde_json::{Map, Value, json};

use crate::data::{ColumnType, Kind, ParquetSource, meta};
use crate::error::{Result, bad_input, usage};
use crate::limits::{Footprint, Tuning};
use crate::model::folder::{self, FolderParts, ModelFolder};
use crate::model::{Architecture, Decoder, Family, ForwardOptions, ModelConfig, Params};
use crate::progress;
use crate::tokenizer::{LoadedTokenizer, PAD_TOKEN, check_tokens_match};
use crate::train::cursor::{EpochCursor, shuffled};
use crate::train::{Evaluation, StepLoss, Task};

/// The shape of a new model (`[model]` in a recipe); the vocabulary comes from the tokenizer.
#[derive(Clone, Debug)]
pub struct ModelShape {
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// Defaults to `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// Defaults to the sequence length.
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: bool,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
}

pub struct PretrainOptions {
    pub inputs: Vec<PathBuf>,
    /// The tokenizer the tokens were encoded with (file or model folder); defaults to `--init`'s.
    pub tokenizer: Option<PathBuf>,
    /// Continue from this model folder instead of a fresh model.
    pub init: Option<String>,
    pub shape: ModelShape,
    pub seq_len: usize,
    pub batch_size: usize,
    pub init_std: f64,
    pub seed: u64,
    pub val: Option<PathBuf>,
    pub val_fraction: Option<f64>,
    pub eval_batches: usize,
    pub device: Device,
    pub gradient_checkpointing: bool,
}

/// Fixed-length windows over a token stream: block `i` is `tokens[start..start + len + 1]`
/// (inputs and their next-token targets).
#[derive(Clone)]
struct Blocks {
    tokens: Arc<Vec<u32>>,
    starts: Vec<usize>,
}

impl Blocks {
    fn cut(tokens: Arc<Vec<u32>>, seq_len: usize) -> Self {
        let starts = (0..).map(|i| i * seq_len).take_while(|s| s + seq_len < tokens.len()).collect();
        Blocks { tokens, starts }
    }

    fn split_tail(mut self, fraction: f64) -> (Blocks, Blocks) {
        let held = crate::train::held_out_count(self.starts.len(), fraction);
        let tail = self.starts.split_off(self.starts.len() - held);
        let val = Blocks { tokens: self.tokens.clone(), starts: tail };
        (self, val)
    }
}

pub struct PretrainTask {
    config: ModelConfig,
    params: Params,
    model: Decoder,
    parts: FolderParts,
    train: Blocks,
    val: Option<Blocks>,
    seq_len: usize,
    batch_size: usize,
    eval_batches: usize,
    cursor: EpochCursor<usize>,
    device: Device,
    unigram_entropy: f64,
}

impl PretrainTask {
    /// Check every input and build the model; nothing is trained yet.
    pub fn new(options: PretrainOptions) -> Result<Self> {
        if options.seq_len == 0 {
            return Err(usage("--seq-len must be at least 1"));
        }
        let init = options.init.as_deref().map(ModelFolder::open).transpose()?;
        let tokenizer = match (&options.tokenizer, &init) {
            (Some(path), _) => LoadedTokenizer::load(path)?,
            (None, Some(folder)) => folder.load_tokenizer()?,
            (None, None) => {
                return Err(usage("give --tokenizer (the tokenizer.json the tokens were encoded with) or --init MODEL"));
            }
        };
        let (tokens, eos_id) = read_tokens(&options.inputs, &tokenizer)?;
        let config = match &init {
            Some(folder) => {
                if tokenizer.vocab_size > folder.config.vocab_size {
                    return Err(bad_input(
                        &tokenizer.path,
                        format!(
                            "vocabulary of {} tokens, but --init model {} has {} embedding rows",
                            tokenizer.vocab_size,
                            folder.dir.display(),
                            folder.config.vocab_size
                        ),
                    ));
                }
                folder.config.clone()
            }
            None => new_config(&options.shape, &tokenizer, eos_id, options.seq_len)?,
        };
        if options.seq_len > config.max_position_embeddings {
            return Err(usage(format!(
                "--seq-len {} is longer than the model's max_position_embeddings {}",
                options.seq_len, config.max_position_embeddings
            )));
        }
        let tokens = Arc::new(tokens);
        let blocks = Blocks::cut(tokens.clone(), options.seq_len);
        if blocks.starts.is_empty() {
            return Err(bad_input(
                &options.inputs[0],
                format!("the inputs hold {} tokens, fewer than one block of --seq-len {} + 1", tokens.len(), options.seq_len),
            ));
        }
        Footprint::new(format!("--batch-size {} × --seq-len {} with this model shape", options.batch_size, options.seq_len))
            .training(&config, options.batch_size, options.seq_len, &Tuning { trainable: None, checkpointing: options.gradient_checkpointing })
            .check(&options.device)?;
        let params = match &init {
            Some(folder) => folder.load_params(&options.device)?,
            None => Params::init(&config, options.init_std, options.seed, &options.device)?,
        };
        let mut model = Decoder::new(&config, &params)?;
        model.set_gradient_checkpointing(options.gradient_checkpointing);
        let parts = folder_parts(&tokenizer, init.as_ref(), options.tokenizer.as_deref(), eos_id)?;
        let unigram_entropy = unigram_entropy(&tokens, config.vocab_size);
        let (train, val) = match (&options.val, options.val_fraction) {
            (Some(path), _) => {
                let (val_tokens, _) = read_tokens(std::slice::from_ref(path), &tokenizer)?;
                let val = Blocks::cut(Arc::new(val_tokens), options.seq_len);
                if val.starts.is_empty() {
                    return Err(bad_input(path, format!("fewer tokens than one block of --seq-len {} + 1", options.seq_len)));
                }
                (blocks, Some(val))
            }
            (None, Some(fraction)) => {
                if blocks.starts.len() < 2 {
                    return Err(bad_input(&options.inputs[0], "too few blocks to hold some out for --val-fraction"));
                }
                let (train, val) = blocks.split_tail(fraction);
                (train, Some(val))
            }
            (None, None) => (blocks, None),
        };
        progress::log(format!(
            "pretrain: {} parameters; {} training blocks of {} tokens{}; unigram entropy {:.3} nats",
            params.num_elements(),
            train.starts.len(),
            options.seq_len,
            val.as_ref().map_or(String::new(), |v| format!(", {} held out", v.starts.len())),
            unigram_entropy
        ));
        let (blocks_count, seed) = (train.starts.len(), options.seed);
        Ok(PretrainTask {
            config,
            params,
            model,
            parts,
            train,
            val,
            seq_len: options.seq_len,
            batch_size: options.batch_size,
            eval_batches: options.eval_batches,
            cursor: EpochCursor::new(move |epoch| shuffled(blocks_count, seed, epoch)),
            device: options.device,
            unigram_entropy,
        })
    }

    /// Mean next-token loss over the given blocks of `blocks`.
    fn loss(&self, blocks: &Blocks, which: &[usize]) -> Result<Tensor> {
        let s = self.seq_len;
        let mut inputs = Vec::with_capacity(which.len() * s);
        let mut targets = Vec::with_capacity(which.len() * s);
        for &block in which {
            let start = blocks.starts[block];
            inputs.extend_from_slice(&blocks.tokens[start..start + s]);
            targets.extend_from_slice(&blocks.tokens[start + 1..start + s + 1]);
        }
        let b = which.len();
        let inputs = Tensor::from_vec(inputs, (b, s), &self.device)?;
        let hidden = self.model.forward(&inputs, ForwardOptions::default(), None)?;
        let (losses, _) = self.model.lm_cross_entropy(&hidden.reshape((b * s, ()))?, &targets, false)?;
        Ok(losses.mean_all()?)
    }
}

impl Task for PretrainTask {
    fn params(&self) -> &Params {
        &self.params
    }

    fn next_loss(&mut self) -> Result<StepLoss> {
        let blocks = self.cursor.take(self.batch_size);
        let loss = self.loss(&self.train, &blocks)?;
        let mut metrics = Map::new();
        metrics.insert("epoch".into(), json!(self.cursor.epochs()));
        Ok(StepLoss { loss, tokens: (blocks.len() * self.seq_len) as u64, metrics })
    }

    fn evaluate(&mut self) -> Result<Option<Evaluation>> {
        let Some(val) = &self.val else { return Ok(None) };
        let count = val.starts.len();
        let limit = crate::train::eval_limit(self.eval_batches, self.batch_size, count);
        let (mut total, mut blocks) = (0f64, 0usize);
        for chunk in (0..limit).collect::<Vec<_>>().chunks(self.batch_size) {
            let loss = self.loss(val, chunk)?.detach().to_scalar::<f32>()? as f64;
            total += loss * chunk.len() as f64;
            blocks += chunk.len();
        }
        Ok(Some(Evaluation { loss: total / blocks as f64, perplexity: true, metrics: Map::new() }))
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        self.parts.save(dir, &self.config, &self.params)
    }

    fn data_state(&self) -> Value {
        self.cursor.state()
    }

    fn restore_data_state(&mut self, state: &Value) -> Result<()> {
        self.cursor.restore(state)
    }

    fn signature(&self) -> Value {
        let c = &self.config;
        json!({
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "tie_word_embeddings": c.tie_word_embeddings,
            "seq_len": self.seq_len,
        })
    }

    fn summary(&self) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("unigram_entropy".into(), json!(self.unigram_entropy));
        out.insert("parameters".into(), json!(self.params.num_elements()));
        out.insert("seq_len".into(), json!(self.seq_len));
        out
    }
}

/// All token ids of the inputs, checked against the tokenizer; and the EOS id they used.
fn read_tokens(paths: &[PathBuf], tokenizer: &LoadedTokenizer) -> Result<(Vec<u32>, Option<u32>)> {
    if paths.is_empty() {
        return Err(usage("no token files given"));
    }
    crate::output::check_single_stdin(paths)?;
    let mut tokens = Vec::new();
    let mut eos = None;
    for path in paths {
        let source = ParquetSource::open(path)?;
        source.expect_kind(Kind::Tokens)?;
        source.require("input_ids", ColumnType::IntList)?;
        check_tokens_match(&source, tokenizer)?;
        if source.num_rows() == 0 {
            return Err(bad_input(source.path(), "no rows: an empty tokens file"));
        }
        eos = eos.or(source.meta(meta::EOS_ID).and_then(|v| v.parse().ok()));
        for batch in source.batches(Some(&["input_ids"]), crate::data::parquet_io::DEFAULT_BATCH_ROWS)? {
            let batch = batch?;
            let lists = batch.token_ids("input_ids", tokenizer.vocab_size)?;
            for i in 0..lists.len() {
                tokens.extend(lists.row(i).iter().map(|&id| id as u32));
            }
        }
    }
    Ok((tokens, eos.or(tokenizer.eos_id())))
}

fn new_config(shape: &ModelShape, tokenizer: &LoadedTokenizer, eos_id: Option<u32>, seq_len: usize) -> Result<ModelConfig> {
    let heads = shape.num_attention_heads;
    let kv_heads = shape.num_key_value_heads.unwrap_or(heads);
    let divides = shape.head_dim.is_some() || (heads > 0 && shape.hidden_size % heads == 0);
    if heads == 0 || !divides || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(usage(format!(
            "model shape: hidden_size {} must divide into num_attention_heads {heads}, which must be a multiple of num_key_value_heads {kv_heads}",
            shape.hidden_size
        )));
    }
    if shape.num_hidden_layers == 0 {
        return Err(usage("model shape: num_hidden_layers must be at least 1"));
    }
    let head_dim = shape.head_dim.unwrap_or(shape.hidden_size / heads);
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(usage(format!("model shape: the head dimension {head_dim} must be even for rotary embeddings")));
    }
    let mut config = ModelConfig::new(
        shape.family,
        tokenizer.vocab_size,
        shape.hidden_size,
        shape.intermediate_size,
        shape.num_hidden_layers,
        heads,
        kv_heads,
        shape.max_position_embeddings.unwrap_or(seq_len),
        shape.tie_word_embeddings,
    );
    config.head_dim = head_dim;
    config.rotary_dim = head_dim;
    config.arch = Architecture::defaults(shape.family, shape.num_hidden_layers, head_dim);
    config.rope_theta = shape.rope_theta;
    config.rms_norm_eps = shape.rms_norm_eps;
    config.eos_token_ids = eos_id.into_iter().collect();
    config.pad_token_id = tokenizer.tokenizer.token_to_id(PAD_TOKEN);
    Ok(config)
}

fn folder_parts(
    tokenizer: &LoadedTokenizer,
    init: Option<&ModelFolder>,
    tokenizer_arg: Option<&Path>,
    eos_id: Option<u32>,
) -> Result<FolderParts> {
    let tokenizer_json = tokenizer.tokenizer.to_string(false)?;
    // A tokenizer folder or the --init folder knows its tokenizer config; a bare
    // tokenizer.json gets ours, naming its EOS.
    let from_tokenizer_folder = match tokenizer_arg.filter(|p| p.is_dir()) {
        Some(dir) => folder::read_tokenizer_config(dir)?,
        None => Map::new(),
    };
    let known = [Some(from_tokenizer_folder), init.map(|f| f.tokenizer_config.clone())]
        .into_iter()
        .flatten()
        .find(|config| !config.is_empty());
    let tokenizer_config = match known {
        Some(config) => config,
        None => {
            let mut config = folder::tokenizer_config_for_trained();
            if let Some(eos) = eos_id.and_then(|id| tokenizer.tokenizer.id_to_token(id)) {
                config.insert("eos_token".into(), json!(eos));
            }
            if tokenizer.tokenizer.token_to_id(PAD_TOKEN).is_none() {
                config.insert("pad_token".into(), Value::Null);
            }
            config
        }
    };
    Ok(FolderParts {
        tokenizer_json,
        tokenizer_config,
        chat_template: init.and_then(|f| f.chat_template.clone()),
        generation_config: init.and_then(|f| f.generation_config.clone()),
    })
}

/// Entropy (nats) of the token frequency distribution: the loss of the best model that ignores
/// context, so a model that learned anything must go below it.
pub fn unigram_entropy(tokens: &[u32], vocab: usize) -> f64 {
    let mut counts = vec![0u64; vocab];
    for &t in tokens {
        counts[t as usize] += 1;
    }
    let n = tokens.len() as f64;
    counts.iter().filter(|&&c| c > 0).map(|&c| -(c as f64 / n) * (c as f64 / n).ln()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_the_stream_with_next_token_targets() {
        let tokens: Arc<Vec<u32>> = Arc::new((0..23).collect());
        let blocks = Blocks::cut(tokens, 5);
        assert_eq!(blocks.starts, vec![0, 5, 10, 15]);
        let (train, val) = blocks.split_tail(0.25);
        assert_eq!(train.starts, vec![0, 5, 10]);
        assert_eq!(val.starts, vec![15]);
    }

    #[test]
    fn entropy_of_a_uniform_stream_is_log_vocab() {
        let tokens: Vec<u32> = (0..4).cycle().take(400).collect();
        assert!((unigram_entropy(&tokens, 8) - 4f64.ln()).abs() < 1e-12);
    }
}
