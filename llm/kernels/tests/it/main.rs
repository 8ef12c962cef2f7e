//! Integration tests for trail-kernels: correctness against an f64 reference, bit-identity
//! across SIMD paths, batch sizes, row offsets and thread counts, and load errors.

use half::f16;
use trail_kernels::{BlockFormat, KernelError, QActivations, QMatrix, SimdPath};

const FORMATS: [BlockFormat; 3] = [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0];

/// SplitMix64: a tiny seeded generator so cases replay exactly.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Random ggml bytes for an `out × inp` matrix.
fn random_gguf(rng: &mut Rng, format: BlockFormat, out: usize, inp: usize) -> Vec<u8> {
    let nb = out * inp / 32;
    let mut bytes = Vec::with_capacity(nb * format.gguf_block_bytes());
    for _ in 0..nb {
        let d = f16::from_f32(rng.unit() * 0.05);
        bytes.extend_from_slice(&d.to_bits().to_le_bytes());
        if format == BlockFormat::Q4_1 {
            let m = f16::from_f32(rng.unit() * 0.2);
            bytes.extend_from_slice(&m.to_bits().to_le_bytes());
        }
        let nq = if format == BlockFormat::Q8_0 { 32 } else { 16 };
        for _ in 0..nq {
            bytes.push(rng.byte());
        }
    }
    bytes
}

/// Independent ggml decoder (the layout as documented by ggml), `out × inp` row-major.
fn decode_gguf(format: BlockFormat, bytes: &[u8], out: usize, inp: usize) -> Vec<f32> {
    let gb = format.gguf_block_bytes();
    let mut w = Vec::with_capacity(out * inp);
    for blk in bytes.chunks_exact(gb) {
        let d = f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
        match format {
            BlockFormat::Q4_0 => {
                let qs = &blk[2..18];
                w.extend(qs.iter().map(|&q| ((q & 15) as i32 - 8) as f32 * d));
                w.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
            BlockFormat::Q4_1 => {
                let m = f16::from_bits(u16::from_le_bytes([blk[2], blk[3]])).to_f32();
                let qs = &blk[4..20];
                w.extend(qs.iter().map(|&q| (q & 15) as f32 * d + m));
                w.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
            BlockFormat::Q8_0 => w.extend(blk[2..34].iter().map(|&q| q as i8 as f32 * d)),
        }
    }
    w
}

fn random_x(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.unit() * 3.0).collect()
}

fn run(m: &QMatrix, path: SimdPath, act: &QActivations) -> Vec<f32> {
    let mut y = vec![f32::NAN; act.rows() * m.out_features()];
    m.matmul_q_on(path, act, &mut y);
    y
}

#[test]
fn dequantize_matches_independent_ggml_decoder() {
    let mut rng = Rng(1);
    for format in FORMATS {
        for (out, inp) in [(1, 32), (17, 64), (40, 96), (48, 576)] {
            let bytes = random_gguf(&mut rng, format, out, inp);
            let m = QMatrix::from_gguf_bytes(format, out, inp, &bytes).unwrap();
            let want = decode_gguf(format, &bytes, out, inp);
            let got = m.dequantize();
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{format:?} {out}x{inp} element {i}"
                );
            }
        }
    }
}

/// Property: on random matrices/activations, every path matches the f64 reference computed from
/// the dequantized weights and dequantized activations, and all paths agree bit for bit.
#[test]
fn every_path_matches_f64_reference_and_each_other() {
    let mut rng = Rng(2);
    for case in 0..60 {
        let format = FORMATS[case % 3];
        let out = 1 + rng.below(70);
        let inp = 32 * (1 + rng.below(20));
        let n = 1 + rng.below(13);
        let bytes = random_gguf(&mut rng, format, out, inp);
        let m = QMatrix::from_gguf_bytes(format, out, inp, &bytes).unwrap();
        let x = random_x(&mut rng, n * inp);
        let act = QActivations::quantize(&x, n, inp);
        let w = m.dequantize();
        let xa = act.dequantize();
        let paths = SimdPath::available();
        let base = run(&m, SimdPath::Scalar, &act);
        for r in 0..n {
            for o in 0..out {
                let (mut exact, mut mag) = (0f64, 0f64);
                for i in 0..inp {
                    let p = w[o * inp + i] as f64 * xa[r * inp + i] as f64;
                    exact += p;
                    mag += p.abs();
                }
                let got = base[r * out + o] as f64;
                assert!(
                    (got - exact).abs() <= 1e-5 * mag + 1e-30,
                    "case {case} {format:?} r{r} o{o}: {got} vs {exact} (mag {mag})"
                );
                // Activation quantization error: at most half a step per element.
                let mut fexact = 0f64;
                for i in 0..inp {
                    fexact += w[o * inp + i] as f64 * x[r * inp + i] as f64;
                }
                let wmag: f64 = (0..inp).map(|i| w[o * inp + i].abs() as f64).sum();
                assert!((got - fexact).abs() <= 3.0 / 254.0 * wmag + 1e-5 * mag);
            }
        }
        for &p in &paths {
            let y = run(&m, p, &act);
            for (i, (a, b)) in y.iter().zip(&base).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "case {case} {format:?} {p:?} element {i}"
                );
            }
        }
    }
}

/// Extreme integer values (all-max weights and activations) must not saturate any path.
#[test]
fn extreme_quants_do_not_saturate() {
    for format in FORMATS {
        for fill in [0x00u8, 0xFF, 0x80, 0x7F, 0x88] {
            let (out, inp) = (16, 256);
            let gb = format.gguf_block_bytes();
            let mut bytes = vec![fill; out * inp / 32 * gb];
            for blk in bytes.chunks_exact_mut(gb) {
                blk[..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
                if format == BlockFormat::Q4_1 {
                    blk[2..4].copy_from_slice(&f16::from_f32(-1.0).to_bits().to_le_bytes());
                }
            }
            let m = QMatrix::from_gguf_bytes(format, out, inp, &bytes).unwrap();
            for xv in [1.0f32, -1.0] {
                let x = vec![xv; 3 * inp];
                let act = QActivations::quantize(&x, 3, inp);
                let w = m.dequantize();
                let want: f64 = w[..inp].iter().map(|&v| v as f64 * xv as f64).sum();
                for p in SimdPath::available() {
                    let y = run(&m, p, &act);
                    for &v in &y {
                        assert!(
                            ((v as f64) - want).abs() <= 1e-6 * want.abs().max(1.0),
                            "{format:?} {fill:#x} {p:?}: {v} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// A row computed alone is bit-identical to the same row inside batches of 1..=40 rows at any
/// offset, on every path and with 1, 2 or 3 threads.
#[test]
fn rows_are_bit_identical_across_batch_sizes_offsets_paths_and_threads() {
    let mut rng = Rng(3);
    for format in FORMATS {
        let (out, inp) = (200, 576);
        let bytes = random_gguf(&mut rng, format, out, inp);
        let m = QMatrix::from_gguf_bytes(format, out, inp, &bytes).unwrap();
        let probe = random_x(&mut rng, inp);
        let alone = run(
            &m,
            SimdPath::Scalar,
            &QActivations::quantize(&probe, 1, inp),
        );
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                for n in 1..=40 {
                    let at = rng.below(n);
                    let mut x = random_x(&mut rng, n * inp);
                    x[at * inp..(at + 1) * inp].copy_from_slice(&probe);
                    let act = QActivations::quantize(&x, n, inp);
                    for p in SimdPath::available() {
                        let mut y = vec![0f32; n * out];
                        m.matmul_q_on(p, &act, &mut y);
                        let row = &y[at * out..(at + 1) * out];
                        for (o, (a, b)) in row.iter().zip(&alone).enumerate() {
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "{format:?} {p:?} threads {threads} n {n} at {at} output {o}"
                            );
                        }
                    }
                }
            });
        }
        // The f32 entry point quantizes the same way.
        let mut y = vec![0f32; out];
        m.matmul(&probe, 1, &mut y);
        assert!(
            y.iter()
                .zip(&alone)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }
}

#[test]
fn load_errors() {
    let e = QMatrix::from_gguf_bytes(BlockFormat::Q4_1, 4, 48, &[0; 200]).unwrap_err();
    assert_eq!(e, KernelError::BadInFeatures { in_features: 48 });
    let e = QMatrix::from_gguf_bytes(BlockFormat::Q8_0, 0, 32, &[]).unwrap_err();
    assert_eq!(e, KernelError::EmptyOutput);
    let e = QMatrix::from_gguf_bytes(BlockFormat::Q4_0, 2, 32, &[0; 35]).unwrap_err();
    assert!(matches!(
        e,
        KernelError::BadLength {
            expected: 36,
            got: 35,
            ..
        }
    ));
    assert!(QMatrix::from_gguf_bytes(BlockFormat::Q4_0, 2, 32, &[0; 36]).is_ok());
    assert!(BlockFormat::from_ggml_type(12).is_err());
    for f in FORMATS {
        assert_eq!(BlockFormat::from_ggml_type(f.ggml_type()).unwrap(), f);
    }
}

/// Paths are chosen at run time: the CPU's features decide which exist, `TRAIL_SIMD` (or the
/// fastest) which one the process runs, and the kernel id names that one. Prints the paths the
/// other tests exercise.
#[test]
fn paths_are_detected_at_run_time_and_named_in_the_kernel_id() {
    let paths = SimdPath::available();
    eprintln!("SIMD paths exercised: {paths:?}");
    assert_eq!(paths[0], SimdPath::Scalar);
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma") && has!("f16c");
        let avx512 = avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vnni");
        assert_eq!(paths.contains(&SimdPath::Avx2), avx2);
        assert_eq!(paths.contains(&SimdPath::Avx512Vnni), avx512);
    }
    assert_eq!(SimdPath::best(), *paths.last().unwrap());
    for p in SimdPath::ALL {
        assert_eq!(p.supported().is_ok(), paths.contains(&p), "{p}");
        assert_eq!(p.name().parse::<SimdPath>(), Ok(p));
    }
    assert_eq!("portable".parse::<SimdPath>(), Ok(SimdPath::Scalar));
    assert_eq!("avx512".parse::<SimdPath>(), Ok(SimdPath::Avx512Vnni));
    assert!(matches!(
        "sse2".parse::<SimdPath>(),
        Err(KernelError::UnknownSimdPath(_))
    ));
    let selected = SimdPath::selected();
    assert_eq!(Ok(selected), SimdPath::from_env());
    let id = trail_kernels::kernel_id();
    assert!(id.contains(env!("CARGO_PKG_VERSION")));
    assert!(id.ends_with(&format!(" path={selected}")), "{id}");
}

/// `TRAIL_SIMD` forces the path of the default entry points: in a child process per supported
/// path, [`selected_path_child`] sees that path in the kernel id and matches the scalar bits; an
/// unknown name makes the child panic.
#[test]
fn trail_simd_forces_the_path_of_a_process() {
    let run = |value: &str| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "selected_path_child"])
            .env(trail_kernels::SIMD_ENV, value)
            .env("TRAIL_KERNELS_CHILD_EXPECT", value)
            .output()
            .unwrap()
    };
    for p in SimdPath::available() {
        let out = run(p.name());
        assert!(
            out.status.success(),
            "{p}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
    }
    let out = run("sse2");
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("unknown SIMD path"), "{text}");
}

/// Run by [`trail_simd_forces_the_path_of_a_process`] with `TRAIL_SIMD` set.
#[test]
#[ignore = "run in a child process by trail_simd_forces_the_path_of_a_process"]
fn selected_path_child() {
    let selected = SimdPath::selected();
    let want: SimdPath = std::env::var("TRAIL_KERNELS_CHILD_EXPECT")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(selected, want);
    assert!(trail_kernels::kernel_id().ends_with(&format!(" path={want}")));
    let mut rng = Rng(6);
    let (out, inp, n) = (40, 96, 5);
    let m = QMatrix::from_gguf_bytes(
        BlockFormat::Q4_1,
        out,
        inp,
        &random_gguf(&mut rng, BlockFormat::Q4_1, out, inp),
    )
    .unwrap();
    let x = random_x(&mut rng, n * inp);
    let mut y = vec![0f32; n * out];
    m.matmul(&x, n, &mut y);
    let base = run(
        &m,
        SimdPath::Scalar,
        &QActivations::quantize_on(SimdPath::Scalar, &x, n, inp),
    );
    assert!(y.iter().zip(&base).all(|(a, b)| a.to_bits() == b.to_bits()));
}

/// Activation quantization gives the same quants, scales and sums on every path, including
/// ties, zeros and tiny/huge magnitudes.
#[test]
fn quantization_is_identical_on_every_path() {
    let mut rng = Rng(4);
    let k = 256;
    let mut x = random_x(&mut rng, 40 * k);
    x[..32].fill(0.0);
    // amax 127 gives d = 1 exactly, so the halves are exact ties for the rounding.
    for (i, v) in x[32..64].iter_mut().enumerate() {
        *v = i as f32 - 16.5;
    }
    x[32] = 127.0;
    for (i, v) in x[64..96].iter_mut().enumerate() {
        *v = (i as f32 - 7.0) * 1e-30;
    }
    for v in &mut x[96..128] {
        *v *= 1e30;
    }
    let base = QActivations::quantize_on(SimdPath::Scalar, &x, 40, k);
    let bd = base.dequantize();
    for p in SimdPath::available() {
        let q = QActivations::quantize_on(p, &x, 40, k);
        let qd = q.dequantize();
        assert!(
            bd.iter().zip(&qd).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{p:?}"
        );
        // Sums enter results through the Q4_0 correction: compare via a Q4_0 matmul.
        let bytes = random_gguf(&mut rng, BlockFormat::Q4_0, 16, k);
        let m = QMatrix::from_gguf_bytes(BlockFormat::Q4_0, 16, k, &bytes).unwrap();
        let (a, b) = (
            run(&m, SimdPath::Scalar, &base),
            run(&m, SimdPath::Scalar, &q),
        );
        assert!(
            a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{p:?}"
        );
    }
    // Quantization error is at most half a step.
    for (blk, (xb, qb)) in x.chunks(32).zip(bd.chunks(32)).enumerate() {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in xb.iter().zip(qb) {
            assert!(
                (a - b).abs() <= amax / 127.0 * 0.5001 + 1e-37,
                "block {blk}: {a} vs {b}"
            );
        }
    }
}

/// A group call (q/k/v sharing one input) gives the same bits as separate calls.
#[test]
fn group_matmul_matches_separate_calls() {
    let mut rng = Rng(5);
    let inp = 576;
    let mats: Vec<QMatrix> = [
        (576, BlockFormat::Q4_1),
        (192, BlockFormat::Q4_0),
        (40, BlockFormat::Q8_0),
    ]
    .iter()
    .map(|&(out, f)| {
        QMatrix::from_gguf_bytes(f, out, inp, &random_gguf(&mut rng, f, out, inp)).unwrap()
    })
    .collect();
    for n in [1, 3, 9] {
        let act = QActivations::quantize(&random_x(&mut rng, n * inp), n, inp);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for p in SimdPath::available() {
            let separate: Vec<Vec<f32>> = mats.iter().map(|m| run(m, p, &act)).collect();
            let mut ys: Vec<Vec<f32>> = mats
                .iter()
                .map(|m| vec![f32::NAN; n * m.out_features()])
                .collect();
            let mut pairs: Vec<(&QMatrix, &mut [f32])> = mats
                .iter()
                .zip(ys.iter_mut())
                .map(|(m, y)| (m, y.as_mut_slice()))
                .collect();
            pool.install(|| trail_kernels::matmul_group_on(p, &act, &mut pairs));
            for (a, b) in ys.iter().zip(&separate) {
                assert!(
                    a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{p:?} n {n}"
                );
            }
        }
    }
}
