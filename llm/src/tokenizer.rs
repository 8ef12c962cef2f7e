//! The tokenizer and chat template stored in GGUF metadata.
//!
//! The tokenizer is rebuilt with the `tokenizers` crate as HF builds SmolLM2's: byte-level BPE
//! from `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, pre-tokenizer
//! `Sequence[Split(\p{N}, Isolated), ByteLevel(add_prefix_space=false, use_regex=true)]`,
//! ByteLevel decoder, control and user-defined tokens added as special tokens. (candle's
//! `quantized::tokenizer` helper adds a prefix space and so gets SmolLM2's ids wrong.)

use minijinja::Environment;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{LlmError, Result};
use crate::gguf::GgufFile;

/// GGUF token types that are added as special tokens: control (3) and user-defined (4).
const SPECIAL_TYPES: [i64; 2] = [3, 4];

fn tok_err(e: impl std::fmt::Display) -> LlmError {
    LlmError::Tokenizer(e.to_string())
}

/// Builds the byte-level BPE tokenizer from `tokenizer.ggml.*`.
pub fn from_gguf(gguf: &GgufFile) -> Result<Tokenizer> {
    let model = gguf.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(LlmError::Tokenizer(format!(
            "{}: tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)",
            gguf.path().display()
        )));
    }
    match gguf.string("tokenizer.ggml.pre") {
        Ok("smollm") | Err(_) => {}
        Ok(other) => tracing::warn!(
            "pre-tokenizer `{other}`: using SmolLM2's (digits split, then byte-level)"
        ),
    }
    let tokens = gguf.strings("tokenizer.ggml.tokens")?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let merges = gguf
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| LlmError::BadKey {
                    path: gguf.path().to_path_buf(),
                    key: "tokenizer.ggml.merges".into(),
                    reason: format!("merge `{m}` is not two tokens"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(tok_err)?;
    let mut tokenizer = Tokenizer::new(bpe);
    let digits = Split::new(
        SplitPattern::Regex(r"\p{N}".into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(tok_err)?;
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::Split(digits),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]);
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    if gguf.has("tokenizer.ggml.token_type") {
        let types = gguf.ints("tokenizer.ggml.token_type")?;
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, ty)| SPECIAL_TYPES.contains(ty))
            .map(|(t, _)| AddedToken::from(t.to_string(), true))
            .collect();
        tokenizer.add_special_tokens(special).map_err(tok_err)?;
    }
    Ok(tokenizer)
}

/// The chat template from `tokenizer.chat_template`, rendered with minijinja.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    mentions_system: bool,
}

/// One chat message.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Message<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

impl ChatTemplate {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let source = gguf.string("tokenizer.chat_template")?.to_string();
        let tokens = gguf.strings("tokenizer.ggml.tokens")?;
        let token = |key: &str| -> String {
            gguf.uint(key)
                .ok()
                .and_then(|id| tokens.get(id as usize))
                .map(|s| s.to_string())
                .unwrap_or_default()
        };
        Self::new(
            &source,
            token("tokenizer.ggml.bos_token_id"),
            token("tokenizer.ggml.eos_token_id"),
        )
    }

    pub fn new(source: &str, bos: String, eos: String) -> Result<Self> {
        let mut env = Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let mentions_system = source.contains("system");
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| LlmError::Template(e.to_string()))?;
        Ok(Self {
            env,
            bos,
            eos,
            mentions_system,
        })
    }

    /// Whether the template handles a system message (it names the role).
    pub fn supports_system(&self) -> bool {
        self.mentions_system
    }

    /// Renders `messages` with the generation prompt added.
    pub fn render(&self, messages: &[Message<'_>]) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| LlmError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        .map_err(|e| LlmError::Template(e.to_string()))
    }
}
