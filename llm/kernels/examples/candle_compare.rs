//! candle_compare: trail-kernels against candle's `QMatMul` on the real SmolLM2 Q4_1 GGUF file.
//!
//! For each SmolLM2 matmul shape (layer 0 q, k, gate, down and the tied 576→49152 head) it
//! checks that `QMatrix::dequantize` equals candle's dequantization bit for bit (an independent
//! implementation of the ggml layouts), then times both matmuls at n = 1, 8, 32, 128 on the
//! calling thread's CPU time (run with `RAYON_NUM_THREADS=1`) and wall time.
//!
//! Usage: `RAYON_NUM_THREADS=1 cargo run --release -p trail-kernels --example candle_compare`

use candle_core::quantized::{QMatMul, gguf_file};
use candle_core::{Device, Module, Tensor};
use std::io::{Read, Seek, SeekFrom};
use std::time::Instant;
use trail_kernels::{BlockFormat, QActivations, QMatrix};

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
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `struct timespec` (two 64-bit fields on x86_64 Linux).
    assert_eq!(unsafe { clock_gettime(3, &mut ts) }, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// (fastest wall, fastest on-CPU) seconds per call over 5 batches of about 20 ms.
fn time(mut f: impl FnMut()) -> (f64, f64) {
    let s = Instant::now();
    f();
    let reps = (0.02 / s.elapsed().as_secs_f64()).clamp(1.0, 100_000.0) as usize;
    let (mut wall, mut cpu) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..5 {
        let c0 = thread_cpu_ns();
        let s = Instant::now();
        for _ in 0..reps {
            f();
        }
        wall = wall.min(s.elapsed().as_secs_f64() / reps as f64);
        cpu = cpu.min((thread_cpu_ns() - c0) as f64 * 1e-9 / reps as f64);
    }
    (wall, cpu)
}

fn main() -> candle_core::Result<()> {
    let home = std::env::var("HOME").expect("HOME");
    let path = format!("{home}/.cache/trail/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut file = std::fs::File::open(&path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let dev = Device::Cpu;
    println!("{}", trail_kernels::kernel_id());
    println!(
        "{:<26} {:>4} {:>11} {:>11} {:>11} {:>11} {:>7}",
        "tensor", "n", "trail wall", "trail cpu", "candle wall", "candle cpu", "speedup"
    );
    for name in [
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.0.ffn_gate.weight",
        "blk.0.ffn_down.weight",
        "token_embd.weight",
    ] {
        let info = &content.tensor_infos[name];
        let (out, inp) = info.shape.dims2()?;
        let format = match info.ggml_dtype {
            candle_core::quantized::GgmlDType::Q4_0 => BlockFormat::Q4_0,
            candle_core::quantized::GgmlDType::Q4_1 => BlockFormat::Q4_1,
            candle_core::quantized::GgmlDType::Q8_0 => BlockFormat::Q8_0,
            other => panic!("{name}: unexpected {other:?}"),
        };
        let len = out * inp / 32 * format.gguf_block_bytes();
        let mut raw = vec![0u8; len];
        file.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))?;
        file.read_exact(&mut raw)?;
        let ours = QMatrix::from_gguf_bytes(format, out, inp, &raw).expect("load");
        let qt = content.tensor(&mut file, name, &dev)?;
        let theirs = qt.dequantize(&dev)?.flatten_all()?.to_vec1::<f32>()?;
        let mine = ours.dequantize();
        let same = mine
            .iter()
            .zip(&theirs)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same && mine.len() == theirs.len(),
            "{name}: dequantization differs from candle"
        );
        let qmm = QMatMul::from_qtensor(qt)?;
        for n in [1usize, 8, 32, 128] {
            let x: Vec<f32> = (0..n * inp)
                .map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let xt = Tensor::from_vec(x.clone(), (n, inp), &dev)?;
            let mut y = vec![0f32; n * out];
            let (tw, tc) = time(|| {
                let a = QActivations::quantize(&x, n, inp);
                ours.matmul_q(&a, &mut y);
            });
            let (cw, cc) = time(|| {
                let r = qmm.forward(&xt).expect("candle forward");
                std::hint::black_box(r);
            });
            println!(
                "{name:<26} {n:>4} {:>9.1}us {:>9.1}us {:>9.1}us {:>9.1}us {:>6.1}x",
                tw * 1e6,
                tc * 1e6,
                cw * 1e6,
                cc * 1e6,
                cc / tc
            );
        }
    }
    println!("dequantization identical to candle for every tensor above");
    Ok(())
}
