//! lathe: composable stages that train, tune, evaluate and serve language models.
//!
//! Each stage is a thin binary in `src/bin/` over this library. Stages exchange Parquet files
//! ([`data`]) and Hugging Face model folders ([`model::folder`]).

pub mod cli;
pub mod data;
pub mod error;
pub mod metrics;
pub mod model;
pub mod output;
pub mod progress;
pub mod tokenizer;

pub use error::{Error, Result};
