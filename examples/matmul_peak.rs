//! The f32 matmul peak of this machine as lathe's kernels reach it (gemm, through candle) on
//! the shapes of the bench-tiny training step: one JSON line for `make bench`, so a step's
//! GFLOP/s can be read as a fraction of what the same sitting's matmuls reach.
//!
//!   cargo run --release --example matmul_peak -- [THREADS]

use std::time::Instant;

use candle_core::{Device, Tensor};

/// Rows × inner × columns of the step's matmuls: q/k/v/o, gate/up, down and the LM head at
/// 2,048 tokens (batch 8 × 256).
const SHAPES: [(usize, usize, usize); 4] = [(2048, 256, 256), (2048, 256, 688), (2048, 688, 256), (2048, 256, 4096)];

fn best_gflops(m: usize, k: usize, n: usize) -> candle_core::Result<f64> {
    let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
    let w = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu)?;
    x.matmul(&w)?;
    let mut best = f64::INFINITY;
    for _ in 0..20 {
        let start = Instant::now();
        x.matmul(&w)?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

fn main() -> candle_core::Result<()> {
    let threads: usize = std::env::args().nth(1).and_then(|t| t.parse().ok()).unwrap_or(2);
    // candle's matmul reads its thread count from RAYON_NUM_THREADS.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
    let mut shapes = serde_json::Map::new();
    let mut peak = 0f64;
    for (m, k, n) in SHAPES {
        let gflops = best_gflops(m, k, n)?;
        peak = peak.max(gflops);
        shapes.insert(format!("{m}x{k}x{n}"), serde_json::json!((gflops * 10.0).round() / 10.0));
    }
    let line = serde_json::json!({"bench": "peak", "dtype": "f32", "threads": threads, "gflops": (peak * 10.0).round() / 10.0, "shapes": shapes});
    println!("{line}");
    Ok(())
}
