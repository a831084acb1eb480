//! lathe: composable stages that train, tune, evaluate and serve language models.
//!
//! Each stage is a thin binary in `src/bin/` over this library. Stages exchange Parquet files
//! ([`data`]) and Hugging Face model folders ([`model::folder`]).

pub mod adapter;
pub mod annotate;
pub mod cli;
pub mod data;
pub mod dpo;
pub mod error;
pub mod generate;
pub mod human;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod output;
pub mod pretrain;
pub mod sft;
pub mod progress;
pub mod rank;
pub mod redteam;
pub mod safety;
pub mod score;
pub mod serve;
pub mod reward;
pub mod rl;
pub mod tokenizer;
pub mod train;
pub mod web;

pub use error::{Error, Result};

/// Tokenization allocates a string per token and several vectors per document; glibc's
/// allocator spent half of `tokenize encode` in malloc/free, mimalloc a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
