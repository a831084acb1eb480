//! The memory bandwidth of this machine as element-wise f32 kernels reach it: the figure that
//! the non-matmul work of a training step (norms, activations, residuals, AdamW) is bound by.
//! `make profile` prints it beside the matmul peak.
//!
//!   cargo run --release --example memory_bandwidth -- [THREADS]
//!
//! Two kernels over 256 MiB buffers, far larger than the caches, best of 10: `copy` (y = x) and
//! `triad` (y = a + s·b, the STREAM triad). GB/s counts the bytes read plus the bytes written.

use std::time::Instant;

use rayon::prelude::*;

const ELEMENTS: usize = 64 << 20;
const CHUNK: usize = 1 << 16;

fn best_seconds(mut kernel: impl FnMut()) -> f64 {
    kernel();
    (0..10)
        .map(|_| {
            let start = Instant::now();
            kernel();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|t| t.parse().ok()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
    let a: Vec<f32> = (0..ELEMENTS).map(|i| i as f32).collect();
    let b: Vec<f32> = (0..ELEMENTS).map(|i| (i % 7) as f32).collect();
    let mut y = vec![0f32; ELEMENTS];
    let bytes = (ELEMENTS * 4) as f64;

    let copy = best_seconds(|| {
        y.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).for_each(|(y, a)| y.copy_from_slice(a));
    });
    let triad = best_seconds(|| {
        y.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(y, (a, b))| {
            for ((y, a), b) in y.iter_mut().zip(a).zip(b) {
                *y = a + 3.0 * b;
            }
        });
    });
    std::hint::black_box(&y);
    let copy_gbs = 2.0 * bytes / copy / 1e9;
    let triad_gbs = 3.0 * bytes / triad / 1e9;
    let round = |x: f64| (x * 10.0).round() / 10.0;
    let line = serde_json::json!({
        "bench": "bandwidth", "threads": threads, "gb_per_s": round(copy_gbs.max(triad_gbs)),
        "kernels": {"copy": round(copy_gbs), "triad": round(triad_gbs)},
    });
    println!("{line}");
}
