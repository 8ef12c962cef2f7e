//! gguf_check: loads every matmul weight of a GGUF file (default: the SmolLM2-135M Q4_1 file in
//! `~/.cache/trail/models`), lists the block formats used, and checks each matrix's
//! `matmul` against an f64 reference (dequantized weights × dequantized activations).
//!
//! Usage: `cargo run --release -p trail-kernels --example gguf_check [-- path.gguf]`

use std::collections::BTreeMap;
use trail_kernels::{BlockFormat, QActivations, QMatrix};

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().expect("4 bytes"))
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().expect("8 bytes"))
    }
    fn string(&mut self) -> String {
        let n = self.u64() as usize;
        String::from_utf8_lossy(self.take(n)).into_owned()
    }
    /// Skips a metadata value, returning it when it is an unsigned integer.
    fn value(&mut self, ty: u32) -> Option<u64> {
        match ty {
            0 | 1 | 7 => Some(self.take(1)[0] as u64),
            2 | 3 => Some(u16::from_le_bytes(self.take(2).try_into().expect("2")) as u64),
            4..=6 => Some(self.u32() as u64),
            10..=12 => Some(self.u64()),
            8 => {
                self.string();
                None
            }
            9 => {
                let (et, n) = (self.u32(), self.u64());
                for _ in 0..n {
                    self.value(et);
                }
                None
            }
            other => panic!("unknown GGUF value type {other}"),
        }
    }
}

fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        let home = std::env::var("HOME").expect("HOME");
        format!("{home}/.cache/trail/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut r = Reader { b: &bytes, pos: 0 };
    assert_eq!(r.take(4), b"GGUF", "not a GGUF file");
    let _version = r.u32();
    let (n_tensors, n_kv) = (r.u64(), r.u64());
    let mut alignment = 32;
    for _ in 0..n_kv {
        let key = r.string();
        let ty = r.u32();
        let v = r.value(ty);
        if key == "general.alignment" {
            alignment = v.expect("integer alignment") as usize;
        }
    }
    let mut infos = Vec::new();
    for _ in 0..n_tensors {
        let name = r.string();
        let nd = r.u32();
        let dims: Vec<usize> = (0..nd).map(|_| r.u64() as usize).collect();
        let (ty, off) = (r.u32(), r.u64() as usize);
        infos.push((name, dims, ty, off));
    }
    let data = r.pos.div_ceil(alignment) * alignment;
    let mut formats: BTreeMap<String, usize> = BTreeMap::new();
    let mut worst = 0f64;
    for (name, dims, ty, off) in &infos {
        if dims.len() != 2 {
            continue;
        }
        let format = match BlockFormat::from_ggml_type(*ty) {
            Ok(f) => f,
            Err(e) => panic!("{name}: {e}"),
        };
        *formats.entry(format!("{format:?}")).or_default() += 1;
        let (inp, out) = (dims[0], dims[1]);
        let len = out * inp / 32 * format.gguf_block_bytes();
        let m = QMatrix::from_gguf_bytes(format, out, inp, &bytes[data + off..data + off + len])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let n = 3;
        let x: Vec<f32> = (0..n * inp)
            .map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let mut y = vec![0f32; n * out];
        m.matmul(&x, n, &mut y);
        let w = m.dequantize();
        let xa = QActivations::quantize(&x, n, inp).dequantize();
        for r in 0..n {
            for o in 0..out {
                let (mut exact, mut mag) = (0f64, 0f64);
                for i in 0..inp {
                    let p = w[o * inp + i] as f64 * xa[r * inp + i] as f64;
                    exact += p;
                    mag += p.abs();
                }
                let err = (y[r * out + o] as f64 - exact).abs() / mag.max(1e-30);
                worst = worst.max(err);
                assert!(
                    err <= 1e-5,
                    "{name} row {r} out {o}: {} vs {exact}",
                    y[r * out + o]
                );
            }
        }
    }
    println!("{path}: matmul weights by format: {formats:?}");
    println!("all match the f64 reference; worst error / Σ|w·x| = {worst:.2e}");
}
