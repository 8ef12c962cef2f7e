//! Tiny random llama GGUF files for tests: a few layers of a few dozen dimensions, written in
//! milliseconds, loaded and run in well under a second, in any of the formats the runner reads.
//!
//! [`tiny_gguf`] writes a GGUF v3 file with the `llama.*` keys [`crate::Config::from_gguf`]
//! reads, a byte-level BPE vocabulary as SmolLM2's (`<|endoftext|>`, `<|im_start|>`,
//! `<|im_end|>` at ids 0, 1, 2, then the 256 ByteLevel characters, then merges), SmolLM2's
//! ChatML template with a short system prompt, and seeded random weights quantized to a
//! [`TinyFormat`]. [`TinySpec::weights`] gives the same weights in f32, so a test can run its
//! own reference forward or compare a quantized model with the F32 one: every tensor draws from
//! its own stream (seed and name), so the weights do not depend on the format or on `tied`.
//!
//! The rows of the special tokens in `token_embd` (and `output`) are scaled down to 1 %: their
//! logits stay near zero while the top ones reach 3–5, so greedy decoding never picks a stop
//! token and a generation runs to `max_new_tokens` (sampling rarely does). Tests that want
//! early stops point `tokenizer.ggml.eos_token_id` at an ordinary token with
//! [`tiny_gguf_with`].

use std::io::Cursor;
use std::path::{Path, PathBuf};

use crate::sampler::SplitMix64;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// The special tokens, at ids 0, 1 and 2 (SmolLM2's order).
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// `tokenizer.ggml.bos_token_id`: `<|im_start|>`.
pub const BOS: u32 = 1;

/// `tokenizer.ggml.eos_token_id`: `<|im_end|>`.
pub const EOS: u32 = 2;

/// `llama.attention.layer_norm_rms_epsilon`.
pub const RMS_EPS: f32 = 1e-5;

/// `llama.rope.freq_base`.
pub const ROPE_THETA: f32 = 10_000.0;

/// SmolLM2-Instruct's chat template, with a shorter default system prompt.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and \
messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' \
}}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + \
'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Merges tried first (in rank order); letter pairs fill the rest of the vocabulary.
const MERGES: [(&str, &str); 24] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "s"),
    ("r", "e"),
    ("a", "t"),
    ("e", "n"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġ", "c"),
    ("i", "s"),
    ("Ġ", "h"),
    ("l", "l"),
    ("Ġ", "i"),
    ("e", "s"),
    ("Ġ", "o"),
    ("Ġ", "b"),
    ("a", "n"),
    ("Ġ", "m"),
    ("o", "u"),
];

/// The weight format of every matrix (norm weights are always F32, as llama.cpp writes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TinyFormat {
    F32,
    Q4_0,
    Q4_1,
    Q8_0,
    /// 256-value super-blocks: `hidden` and `ffn` must be multiples of 256.
    Q4K,
}

impl TinyFormat {
    pub const ALL: [Self; 5] = [Self::F32, Self::Q4_0, Self::Q4_1, Self::Q8_0, Self::Q4K];

    pub fn dtype(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
        }
    }

    /// The name [`crate::Llama::weight_formats`] gives it (`"q4_1"` …).
    pub fn name(self) -> String {
        format!("{:?}", self.dtype()).to_lowercase()
    }
}

/// The shape and contents of a tiny model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TinySpec {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    /// At least 259 (3 specials and 256 bytes); the rest are merges.
    pub vocab: usize,
    pub ctx: usize,
    pub format: TinyFormat,
    /// No `output.weight`: the LM head is `token_embd`.
    pub tied: bool,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            layers: 2,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            ffn: 128,
            vocab: 300,
            ctx: 128,
            format: TinyFormat::F32,
            tied: true,
            seed: 0,
        }
    }
}

/// One tensor of [`TinySpec::weights`], in candle order (`[out, in]` for a matrix).
#[derive(Clone, Debug)]
pub struct Weight {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl TinySpec {
    /// The default spec in `format`, sized so that every format's blocks fit (Q4K needs 256).
    pub fn new(format: TinyFormat) -> Self {
        let mut spec = Self {
            format,
            ..Self::default()
        };
        if format == TinyFormat::Q4K {
            spec.hidden = 256;
            spec.ffn = 256;
        }
        spec
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// The file name [`tiny_gguf`] writes.
    pub fn file_name(&self) -> String {
        format!(
            "tiny-l{}-h{}-a{}x{}-f{}-v{}-c{}-{}-{}-s{}.gguf",
            self.layers,
            self.hidden,
            self.heads,
            self.kv_heads,
            self.ffn,
            self.vocab,
            self.ctx,
            self.format.name(),
            if self.tied { "tied" } else { "untied" },
            self.seed
        )
    }

    /// Every tensor in f32, in the order written: `token_embd`, `output_norm`, `output` (untied
    /// only), then each block's.
    pub fn weights(&self) -> Vec<Weight> {
        let (h, f, kv) = (self.hidden, self.ffn, self.kv_heads * self.head_dim());
        let matrix = |name: String, out: usize, inp: usize| {
            let a = (3.0 / inp as f64).sqrt() as f32;
            self.tensor(name, vec![out, inp], |x| x * a)
        };
        let norm = |name: String| self.tensor(name, vec![h], |x| 1.0 + 0.1 * x);
        let mut all = vec![self.embedding("token_embd.weight")];
        all.push(norm("output_norm.weight".into()));
        if !self.tied {
            all.push(self.embedding("output.weight"));
        }
        for i in 0..self.layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            all.push(norm(p("attn_norm")));
            all.push(matrix(p("attn_q"), h, h));
            all.push(matrix(p("attn_k"), kv, h));
            all.push(matrix(p("attn_v"), kv, h));
            all.push(matrix(p("attn_output"), h, h));
            all.push(norm(p("ffn_norm")));
            all.push(matrix(p("ffn_gate"), f, h));
            all.push(matrix(p("ffn_up"), f, h));
            all.push(matrix(p("ffn_down"), h, f));
        }
        all
    }

    /// Uniform in [-0.3, 0.3), special-token rows scaled to 1 % (see the module docs). Small
    /// enough that the blocks' outputs outweigh the embedding in the residual stream: with
    /// larger rows a tied head mostly repeats the input token.
    fn embedding(&self, name: &str) -> Weight {
        let mut w = self.tensor(name.into(), vec![self.vocab, self.hidden], |x| 0.3 * x);
        for v in &mut w.data[..SPECIALS.len() * self.hidden] {
            *v *= 0.01;
        }
        w
    }

    /// `map` of uniform [-1, 1) values from the stream of (`seed`, `name`).
    fn tensor(&self, name: String, shape: Vec<usize>, map: impl Fn(f32) -> f32) -> Weight {
        // FNV-1a of the name, mixed with the seed: one stream per tensor.
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let mut rng = SplitMix64(h ^ self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let n = shape.iter().product();
        let data = (0..n)
            .map(|_| map(((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0))
            .collect();
        Weight { name, shape, data }
    }

    /// The vocabulary (specials, the 256 ByteLevel characters in byte order, merge results)
    /// and the merges (`"a b"`, in rank order).
    pub fn vocabulary(&self) -> (Vec<String>, Vec<String>) {
        assert!(
            self.vocab >= SPECIALS.len() + 256,
            "a vocabulary of {} has no room for the specials and 256 bytes",
            self.vocab
        );
        let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
        tokens.extend(byte_level_chars().into_iter().map(String::from));
        let letters: Vec<String> = ('a'..='z').map(String::from).collect();
        let pairs = letters
            .iter()
            .flat_map(|a| letters.iter().map(move |b| (a.as_str(), b.as_str())));
        let mut merges = Vec::new();
        for (a, b) in MERGES.into_iter().chain(pairs) {
            if tokens.len() == self.vocab {
                break;
            }
            let merged = format!("{a}{b}");
            if !tokens.contains(&merged) {
                merges.push(format!("{a} {b}"));
                tokens.push(merged);
            }
        }
        assert_eq!(
            tokens.len(),
            self.vocab,
            "vocabulary too large for the merges"
        );
        (tokens, merges)
    }

    /// The metadata [`tiny_gguf`] writes, in order.
    pub fn metadata(&self) -> Vec<(String, Value)> {
        let (tokens, merges) = self.vocabulary();
        let types: Vec<Value> = (0..tokens.len())
            .map(|i| Value::I32(if i < SPECIALS.len() { 3 } else { 1 }))
            .collect();
        let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
        let u32v = |v: usize| Value::U32(v as u32);
        let s = |v: &str| Value::String(v.into());
        [
            ("general.architecture", s("llama")),
            ("general.name", s("tiny-llama")),
            ("general.alignment", Value::U32(32)),
            ("llama.context_length", u32v(self.ctx)),
            ("llama.embedding_length", u32v(self.hidden)),
            ("llama.block_count", u32v(self.layers)),
            ("llama.feed_forward_length", u32v(self.ffn)),
            ("llama.attention.head_count", u32v(self.heads)),
            ("llama.attention.head_count_kv", u32v(self.kv_heads)),
            ("llama.rope.dimension_count", u32v(self.head_dim())),
            ("llama.rope.freq_base", Value::F32(ROPE_THETA)),
            (
                "llama.attention.layer_norm_rms_epsilon",
                Value::F32(RMS_EPS),
            ),
            ("llama.vocab_size", u32v(self.vocab)),
            ("tokenizer.ggml.model", s("gpt2")),
            ("tokenizer.ggml.pre", s("smollm")),
            ("tokenizer.ggml.tokens", strings(tokens)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.merges", strings(merges)),
            ("tokenizer.ggml.bos_token_id", Value::U32(BOS)),
            ("tokenizer.ggml.eos_token_id", Value::U32(EOS)),
            ("tokenizer.chat_template", s(CHAT_TEMPLATE)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// Writes the tiny model of `spec` into `dir` (named by [`TinySpec::file_name`]) and returns
/// its path.
pub fn tiny_gguf(dir: &Path, spec: TinySpec) -> PathBuf {
    tiny_gguf_with(dir, spec, &spec.file_name(), |_| {})
}

/// As [`tiny_gguf`], named `name`, after `edit` has changed the metadata (to write a broken or
/// altered file).
pub fn tiny_gguf_with(
    dir: &Path,
    spec: TinySpec,
    name: &str,
    edit: impl FnOnce(&mut Vec<(String, Value)>),
) -> PathBuf {
    let mut metadata = spec.metadata();
    edit(&mut metadata);
    let tensors: Vec<(String, QTensor)> = spec
        .weights()
        .into_iter()
        .map(|w| {
            let dtype = if w.shape.len() == 1 {
                GgmlDType::F32
            } else {
                spec.format.dtype()
            };
            let t = Tensor::from_vec(w.data, w.shape, &Device::Cpu).expect("tensor");
            let q = QTensor::quantize(&t, dtype)
                .unwrap_or_else(|e| panic!("{}: {dtype:?}: {e}", w.name));
            (w.name, q)
        })
        .collect();
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut bytes = Cursor::new(Vec::new());
    gguf_file::write(&mut bytes, &meta, &refs).expect("write GGUF");
    let mut bytes = bytes.into_inner();
    // candle writes version 2; v3 differs only in allowing big-endian files, which this is not.
    bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
    let path = dir.join(name);
    trail_fs::write_atomic(&path, &bytes).unwrap_or_else(|e| panic!("{e}"));
    path
}

/// GPT-2's `bytes_to_unicode`: the character ByteLevel shows for each byte, in byte order.
pub fn byte_level_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).expect("a valid code point")
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests;
