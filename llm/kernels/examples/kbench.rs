//! kbench: timings of trail-kernels on SmolLM2-135M shapes with plain `Instant` timing.
//!
//! `RAYON_NUM_THREADS` sets the thread count (default 2). Prints, per shape and batch size:
//! hot (weights cached, same matrix repeated) time, weight GB/s and GOPS; then a whole decode
//! step (30 layers of q/k/v/o/gate/up/down + the 576→49152 LM head, weights streamed from
//! memory, activations quantized once per shared input) as tokens/s; and a plain memory-read
//! loop over 1 GiB as the bandwidth reference. The first argument picks the SIMD path (`scalar`,
//! `avx2`, `avx512vnni`; default: `TRAIL_SIMD` or the fastest this CPU supports).

use std::hint::black_box;
use std::time::Instant;
use trail_kernels::{BlockFormat, QActivations, QMatrix, SimdPath, matmul_group_on};

fn rng_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u8
        })
        .collect()
}

fn matrix(format: BlockFormat, out: usize, inp: usize, seed: u64) -> QMatrix {
    let gb = format.gguf_block_bytes();
    let mut bytes = rng_bytes(seed, out * inp / 32 * gb);
    for blk in bytes.chunks_exact_mut(gb) {
        blk[..2].copy_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
        if format == BlockFormat::Q4_1 {
            blk[2..4].copy_from_slice(&half::f16::from_f32(-0.08).to_bits().to_le_bytes());
        }
    }
    QMatrix::from_gguf_bytes(format, out, inp, &bytes).expect("valid shape")
}

fn x(n: usize, inp: usize) -> Vec<f32> {
    rng_bytes(7, n * inp)
        .iter()
        .map(|&b| b as f32 / 128.0 - 1.0)
        .collect()
}

#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

unsafe extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// Nanoseconds this thread has spent on a CPU (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_ns() -> u64 {
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `struct timespec` (two 64-bit fields on x86_64 Linux).
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Seconds per call: (fastest wall time of 5 batches, fastest on-CPU time of the calling
/// thread). On a shared box the second excludes time the thread was descheduled; it is the
/// kernel's cost when the matmul runs on the calling thread alone (`RAYON_NUM_THREADS=1`).
fn time(mut f: impl FnMut()) -> (f64, f64) {
    let s = Instant::now();
    f();
    // Batches of about 20 ms.
    let reps = (0.02 / s.elapsed().as_secs_f64()).clamp(1.0, 100_000.0) as usize;
    let (mut wall, mut cpu) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..5 {
        let c0 = thread_cpu_ns();
        let s = Instant::now();
        for _ in 0..reps {
            f();
        }
        let w = s.elapsed().as_secs_f64() / reps as f64;
        let c = (thread_cpu_ns() - c0) as f64 * 1e-9 / reps as f64;
        wall = wall.min(w);
        cpu = cpu.min(c);
    }
    (wall, cpu)
}

/// Sums `c` with 4 independent 512-bit accumulators where the CPU has AVX-512F, so loads bound
/// the loop.
fn read_sum(c: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above).
        return unsafe { read_sum_avx512(c) };
    }
    c.iter().fold(0u64, |a, &v| a.wrapping_add(v))
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn read_sum_avx512(c: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    assert!(c.len().is_multiple_of(32));
    let mut acc = [_mm512_setzero_si512(); 4];
    for i in (0..c.len()).step_by(32) {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: the load reads 8 u64 inside `c`.
            let v = unsafe { _mm512_loadu_si512(c.as_ptr().add(i + 8 * j) as *const _) };
            *a = _mm512_add_epi64(*a, v);
        }
    }
    let s = _mm512_add_epi64(
        _mm512_add_epi64(acc[0], acc[1]),
        _mm512_add_epi64(acc[2], acc[3]),
    );
    _mm512_reduce_add_epi64(s) as u64
}

fn mem_read_gbs(threads: usize) -> f64 {
    use rayon::prelude::*;
    let buf = vec![1u64; 1 << 27]; // 1 GiB
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    let (secs, _) = time(|| {
        let s: u64 = pool.install(|| buf.par_chunks(1 << 16).map(read_sum).sum());
        black_box(s);
    });
    (buf.len() * 8) as f64 / secs / 1e9
}

fn main() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build_global()
            .expect("global pool");
    }
    let path = std::env::args()
        .nth(1)
        .map(|p| p.parse::<SimdPath>().and_then(SimdPath::supported))
        .transpose()
        .expect("the first argument names a SIMD path this CPU supports")
        .unwrap_or_else(SimdPath::selected);
    println!(
        "{} threads={} path={path:?}",
        trail_kernels::kernel_id_on(path),
        rayon::current_num_threads()
    );
    println!(
        "memory read (1 GiB): {:.1} GB/s on 1 thread, {:.1} GB/s on 2 threads",
        mem_read_gbs(1),
        mem_read_gbs(2)
    );

    let shapes = [
        ("q/o 576->576", BlockFormat::Q4_1, 576, 576),
        ("k/v 576->192", BlockFormat::Q4_1, 192, 576),
        ("gate/up 576->1536", BlockFormat::Q4_1, 1536, 576),
        ("down 1536->576", BlockFormat::Q4_1, 576, 1536),
        ("lm_head 576->49152 Q8_0", BlockFormat::Q8_0, 49152, 576),
    ];
    println!("\nhot (same matrix repeated; weights in cache except lm_head)");
    println!(
        "{:<26} {:>4} {:>10} {:>10} {:>9} {:>9}",
        "shape", "n", "wall us", "used us", "GB/s", "GOPS"
    );
    let only = std::env::var("KBENCH_ONLY").ok();
    // With one thread the matmul runs on this thread, so its on-CPU time is the kernel's cost
    // even when other processes share the cores; with more threads only wall time means much.
    let one_thread = rayon::current_num_threads() == 1;
    println!(
        "figures use {} time",
        if one_thread { "on-CPU" } else { "wall" }
    );
    for (name, f, out, inp) in shapes {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let m = matrix(f, out, inp, 1);
        for n in [1, 8, 32, 128] {
            let act = QActivations::quantize_on(path, &x(n, inp), n, inp);
            let mut y = vec![0f32; n * out];
            let (wall, cpu) = time(|| m.matmul_q_on(path, &act, &mut y));
            let s = if one_thread { cpu } else { wall };
            println!(
                "{name:<26} {n:>4} {:>10.1} {:>10.1} {:>9.1} {:>9.1}",
                wall * 1e6,
                s * 1e6,
                m.weight_bytes() as f64 / s / 1e9,
                2.0 * (n * out * inp) as f64 / s / 1e9
            );
        }
    }

    if only.is_some() {
        return;
    }
    println!(
        "\ndecode step: 30 layers + lm_head, weights streamed (matmuls + activation quant only)"
    );
    let layers: Vec<[QMatrix; 7]> = (0..30u64)
        .map(|l| {
            let f = BlockFormat::Q4_1;
            [
                matrix(f, 576, 576, 10 * l),
                matrix(f, 192, 576, 10 * l + 1),
                matrix(f, 192, 576, 10 * l + 2),
                matrix(f, 576, 576, 10 * l + 3),
                matrix(f, 1536, 576, 10 * l + 4),
                matrix(f, 1536, 576, 10 * l + 5),
                matrix(f, 576, 1536, 10 * l + 6),
            ]
        })
        .collect();
    let head = matrix(BlockFormat::Q8_0, 49152, 576, 99);
    let total: usize = layers
        .iter()
        .flatten()
        .map(QMatrix::weight_bytes)
        .sum::<usize>()
        + head.weight_bytes();
    let macs: usize = layers
        .iter()
        .flatten()
        .map(|m| m.out_features() * m.in_features())
        .sum::<usize>()
        + head.out_features() * head.in_features();
    println!("weights {:.1} MB", total as f64 / 1e6);
    for n in [1, 8, 32, 128] {
        let x576 = x(n, 576);
        let x1536 = x(n, 1536);
        let mut ya = vec![0f32; n * 576];
        let mut yb = vec![0f32; n * 192];
        let mut yc = vec![0f32; n * 1536];
        let mut yd = vec![0f32; n * 1536];
        let mut yh = vec![0f32; n * 49152];
        let (wall, cpu) = time(|| {
            for l in &layers {
                let a = QActivations::quantize_on(path, &x576, n, 576);
                let (yk, yv) = (&mut yb.clone(), &mut yb);
                matmul_group_on(path, &a, &mut [(&l[0], &mut ya), (&l[1], yk), (&l[2], yv)]);
                let a = QActivations::quantize_on(path, &x576, n, 576);
                l[3].matmul_q_on(path, &a, &mut ya);
                let a = QActivations::quantize_on(path, &x576, n, 576);
                matmul_group_on(path, &a, &mut [(&l[4], &mut yc), (&l[5], &mut yd)]);
                let a = QActivations::quantize_on(path, &x1536, n, 1536);
                l[6].matmul_q_on(path, &a, &mut ya);
            }
            let a = QActivations::quantize_on(path, &x576, n, 576);
            head.matmul_q_on(path, &a, &mut yh);
        });
        let s = if one_thread { cpu } else { wall };
        println!(
            "n={n:>4}: wall {:>8.2} ms, used {:>8.2} ms/step  {:>8.1} tok/s  {:>6.1} GB/s weights  {:>7.1} GOPS",
            wall * 1e3,
            s * 1e3,
            n as f64 / s,
            total as f64 / s / 1e9,
            2.0 * (n * macs) as f64 / s / 1e9
        );
    }
}
