//! [`Runner`]: a loaded target model with its tokenizer and chat template, plus generation.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tokenizers::Tokenizer;
use trail_kernels::SimdPath;

use crate::device::Device;
use crate::encoder::Encoder;
use crate::error::{LlmError, Result};
use crate::gguf::GgufFile;
use crate::layers::LayerSet;
use crate::linear::simd_path;
use crate::model::{Config, KvCache, KvFormat, Llama, StepOutput};
use crate::sampler::{Sampler, Sampling};
use crate::tokenizer::{self, ChatTemplate, Message};

/// The candle-core release whose CPU kernels compute the matmuls (checked against Cargo.lock
/// by a unit test, so a dependency bump changes the kernel id).
pub const CANDLE_VERSION: &str = "0.11.1";

/// A GGUF llama model ready to run: weights, tokenizer, chat template, stop tokens.
#[derive(Debug)]
pub struct Runner {
    path: PathBuf,
    model: Llama,
    encoder: Encoder,
    template: ChatTemplate,
    stop_tokens: Vec<u32>,
    kernel_id: String,
}

/// Options of [`Runner::generate`].
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Keep the last `context − 1` prompt tokens (with a warning) instead of failing when the
    /// prompt does not fit.
    pub truncate_prompt: bool,
    /// Layers whose hidden states the prefill captures (last prompt token and prompt mean).
    pub layers: LayerSet,
    /// Prefill in chunks of this many tokens (`None`: one chunk).
    pub prefill_chunk: Option<usize>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: Sampling::Greedy,
            truncate_prompt: false,
            layers: LayerSet::NONE,
            prefill_chunk: None,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token (`<|im_end|>`, eos) was produced; it is the last of `tokens`.
    StopToken(u32),
    MaxNewTokens,
    /// The sequence reached the context length.
    ContextFull,
}

/// The result of [`Runner::generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// Prompt tokens actually used (after truncation).
    pub prompt_tokens: usize,
    /// Generated tokens, the stop token included when there was one.
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    /// The last prefill step: first-token logits and the last prompt token's hidden states.
    pub prefill: StepOutput,
    /// The cache after generation: prompt mean of the captured layers, KV for continuing.
    pub cache: KvCache,
    pub prefill_secs: f64,
    /// Time of the decode steps (`tokens.len() − 1` of them: the first token comes from the
    /// prefill).
    pub decode_secs: f64,
}

impl Runner {
    /// Loads a llama GGUF for the CPU.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_on(path, Device::Cpu)
    }

    pub fn load_on(path: &Path, device: Device) -> Result<Self> {
        device.check()?;
        let mut gguf = GgufFile::open(path)?;
        let model = Llama::load(&mut gguf)?;
        let tokenizer = tokenizer::from_gguf(&gguf)?;
        let template = ChatTemplate::from_gguf(&gguf)?;
        let tokens = gguf.strings("tokenizer.ggml.tokens")?;
        let mut stop_tokens: Vec<u32> = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"]
            .iter()
            .filter_map(|s| tokens.iter().position(|t| t == s).map(|i| i as u32))
            .collect();
        if let Ok(eos) = gguf.uint("tokenizer.ggml.eos_token_id") {
            stop_tokens.push(eos as u32);
        }
        stop_tokens.sort_unstable();
        stop_tokens.dedup();
        let kernel_id = kernel_id(&model);
        Ok(Self {
            path: path.to_path_buf(),
            model,
            encoder: Encoder::new(tokenizer),
            template,
            stop_tokens,
            kernel_id,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    pub fn config(&self) -> &Config {
        self.model.config()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        self.encoder.tokenizer()
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Tokens that end generation: `<|im_end|>`, `<|endoftext|>`, `<|eot_id|>` when in the
    /// vocabulary, and the GGUF eos.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    pub fn is_stop(&self, token: u32) -> bool {
        self.stop_tokens.contains(&token)
    }

    /// Names the numerics: crate versions, weight formats, SIMD path, attention kernel. Two
    /// runs with the same id produce the same bits; so do two whose ids [`same_numerics`] finds
    /// equal.
    pub fn kernel_id(&self) -> &str {
        &self.kernel_id
    }

    /// Runs the model on SIMD `path` from now on (the same bits; the kernel id names the path);
    /// an error if this CPU does not support it.
    pub fn set_simd(&mut self, path: SimdPath) -> Result<()> {
        self.model.set_simd(path)?;
        self.kernel_id = kernel_id(&self.model);
        Ok(())
    }

    /// Makes and steps KV caches of `format` from now on ([`KvFormat::F32`]: the numerics
    /// before issue 23); the kernel id names the attention kernel that goes with it.
    pub fn set_kv_format(&mut self, format: KvFormat) {
        self.model.set_kv_format(format);
        self.kernel_id = kernel_id(&self.model);
    }

    /// The chat text for one user message (the template's default system prompt included,
    /// generation prompt added).
    pub fn render_chat(&self, user: &str) -> Result<String> {
        self.render_chat_with_system(None, user)
    }

    /// As [`Runner::render_chat`] with an explicit system message.
    pub fn render_chat_with_system(&self, system: Option<&str>, user: &str) -> Result<String> {
        self.template.render(&self.chat_messages(system, user)?)
    }

    /// An optional system message and the user's, refused when the template has no system
    /// role.
    fn chat_messages<'m>(
        &self,
        system: Option<&'m str>,
        user: &'m str,
    ) -> Result<Vec<Message<'m>>> {
        let mut messages = Vec::with_capacity(2);
        if let Some(content) = system {
            if !self.template.supports_system() {
                return Err(LlmError::Template(
                    "this template has no system role".into(),
                ));
            }
            messages.push(Message {
                role: "system",
                content,
            });
        }
        messages.push(Message {
            role: "user",
            content: user,
        });
        Ok(messages)
    }

    /// Token ids of [`Runner::render_chat`]: special tokens only where the template put them
    /// (the user's text is text, whatever it holds; see [`crate::encoder`]).
    pub fn encode_chat(&self, user: &str) -> Result<Vec<u32>> {
        self.encode_chat_with_system(None, user)
    }

    /// Token ids of [`Runner::render_chat_with_system`], special tokens as in
    /// [`encode_chat`](Self::encode_chat).
    pub fn encode_chat_with_system(&self, system: Option<&str>, user: &str) -> Result<Vec<u32>> {
        self.encode_messages(&self.chat_messages(system, user)?)
    }

    /// Token ids of `messages` through the chat template (generation prompt added): special
    /// tokens only where the template put them, message contents encoded as text.
    pub fn encode_messages(&self, messages: &[Message<'_>]) -> Result<Vec<u32>> {
        self.encoder.encode_messages(&self.template, messages)
    }

    /// Token ids of user text: special-token text written in it (`<|im_end|>`) stays text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encoder.encode(text)
    }

    /// Token ids of trusted text whose special-token texts all become special tokens (the
    /// encoding of a rendered chat before user text was kept apart).
    pub fn encode_with_specials(&self, text: &str) -> Result<Vec<u32>> {
        self.encoder.encode_with_specials(text)
    }

    /// Whether `text` holds the text of one of the special tokens.
    pub fn has_special_text(&self, text: &str) -> bool {
        self.encoder.has_special_text(text)
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer()
            .decode(ids, true)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))
    }

    /// Prefills `prompt` into a fresh cache and generates until a stop token, `max_new_tokens`
    /// or the context end, calling `on_token` with each token as it is chosen.
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32),
    ) -> Result<Generation> {
        let ctx = self.config().max_position_embeddings;
        if prompt.is_empty() {
            return Err(LlmError::Step("empty prompt".into()));
        }
        let mut prompt = prompt;
        if prompt.len() >= ctx {
            if !opts.truncate_prompt {
                return Err(LlmError::PromptTooLong {
                    len: prompt.len(),
                    max: ctx - 1,
                });
            }
            tracing::warn!(
                "prompt of {} tokens truncated to its last {} to fit the context",
                prompt.len(),
                ctx - 1
            );
            prompt = &prompt[prompt.len() - (ctx - 1)..];
        }
        let mut cache = self.model.new_cache();
        let t0 = Instant::now();
        let mut last = None;
        for chunk in prompt.chunks(opts.prefill_chunk.unwrap_or(usize::MAX).max(1)) {
            last = Some(self.model.prefill(&mut cache, chunk, opts.layers)?);
        }
        let prefill = last.expect("a non-empty prompt has a chunk");
        let prefill_secs = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let mut sampler = Sampler::new(opts.sampling);
        let mut tokens = Vec::new();
        let mut step = None;
        let stop = loop {
            if tokens.len() >= opts.max_new_tokens {
                break StopReason::MaxNewTokens;
            }
            let out: &StepOutput = step.as_ref().unwrap_or(&prefill);
            let tok = sampler.sample(out.logits(0));
            tokens.push(tok);
            on_token(tok);
            if self.is_stop(tok) {
                break StopReason::StopToken(tok);
            }
            if tokens.len() >= opts.max_new_tokens {
                break StopReason::MaxNewTokens;
            }
            if cache.len() >= ctx {
                break StopReason::ContextFull;
            }
            step = Some(
                self.model
                    .decode(&mut [&mut cache], &[tok], LayerSet::NONE)?,
            );
        };
        Ok(Generation {
            prompt_tokens: prompt.len(),
            tokens,
            stop,
            prefill,
            cache,
            prefill_secs,
            decode_secs: t1.elapsed().as_secs_f64(),
        })
    }
}

/// Names the numerics of `model`: crate versions, weight formats, trail-kernels' SIMD path (the
/// model's), the SIMD features candle's kernels can use, the attention kernel (the KV cache's
/// format: [`KvFormat::attention_id`]).
fn kernel_id(model: &Llama) -> String {
    format!(
        "trail-llm-{}/{}/{}/candle-core-{CANDLE_VERSION}-k_quants({})/{}",
        env!("CARGO_PKG_VERSION"),
        model.weight_formats().join("+"),
        trail_kernels::kernel_id_on(model.simd()),
        simd_path(),
        model.kv_format().attention_id(),
    )
}

/// Whether two [`Runner::kernel_id`]s give the same bits, so that hidden states, and the
/// predictors trained on them, carry over from one to the other: their [`numerics_key`]s are
/// equal.
pub fn same_numerics(a: &str, b: &str) -> bool {
    numerics_key(a) == numerics_key(b)
}

/// A kernel id without the parts that name how, not what, it computes: trail-kernels' SIMD
/// `path=` (every path runs the same float recurrence over exact integer block sums, tested
/// bit-identical across paths), and candle's target features when every weight format runs on
/// trail-kernels (`q4_0`, `q4_1`, `q8_0`, the types of [`crate::linear`]'s `block_format`; a
/// weight that falls back to candle is named
/// `FORMAT@candle`), since candle's kernels then compute nothing.
pub fn numerics_key(id: &str) -> String {
    let mut segs = id.split('/');
    let head: Vec<&str> = segs.by_ref().take(2).collect();
    let candle_unused = head.get(1).is_some_and(|formats| {
        formats
            .split('+')
            .all(|f| matches!(f, "q4_0" | "q4_1" | "q8_0"))
    });
    let rest = segs.map(|s| {
        let s = s.find(" path=").map_or(s, |i| &s[..i]);
        match s.find('(') {
            Some(i) if candle_unused && s.starts_with("candle-core-") => {
                format!("{}(unused)", &s[..i])
            }
            _ => s.to_string(),
        }
    });
    head.into_iter()
        .map(str::to_string)
        .chain(rest)
        .collect::<Vec<_>>()
        .join("/")
}
