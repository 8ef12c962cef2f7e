//! Training throughput of the probe on synthetic data shaped like a real layer table.
//!
//! `cargo run --release -p trail-checkpoints --example train_speed -- [rows] [dim] [batch...]`
//! (defaults: 20000 rows × 576, batches 32 and 256). Prints rows/s of the optimizer loop.

use trail_checkpoints::{Bins, Dataset, TrainConfig, split_by_group, train_probe};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rows = args.first().copied().unwrap_or(20_000);
    let dim = args.get(1).copied().unwrap_or(576);
    let batches = if args.len() > 2 {
        args[2..].to_vec()
    } else {
        vec![32, 256]
    };
    let bins = Bins::default();
    // A cheap deterministic generator: features depend weakly on the target.
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    let target: Vec<u32> = (0..rows).map(|_| (next() * 600.0) as u32).collect();
    let features: Vec<f32> = target
        .iter()
        .flat_map(|&t| {
            (0..dim)
                .map(|j| if j < 8 { t as f32 / 100.0 } else { 0.0 })
                .collect::<Vec<_>>()
        })
        .zip(std::iter::repeat_with(&mut next))
        .map(|(x, n)| x + n)
        .collect();
    let ids: Vec<String> = (0..rows).map(|i| format!("r{}", i / 16)).collect();
    let (tr, va) = split_by_group(&ids, 0.1, 0);
    let data = Dataset {
        features: &features,
        dim,
        target: &target,
        cap: None,
    };
    for batch in batches {
        let cfg = TrainConfig {
            epochs: 1,
            batch,
            ..TrainConfig::default()
        };
        let (_, r) = train_probe(&data, &tr, &va, &bins, &cfg).expect("training");
        let e = &r.curve[0];
        println!(
            "rows {} dim {dim} batch {batch}: {:.0} train rows/s, epoch {:.2}s (incl. eval), val MAE {:.1}",
            tr.len(),
            r.train_rows_per_s,
            e.seconds,
            e.val_mae
        );
    }
}
