//! [`Encoder`]: text to token ids with special tokens only where the chat template put them.
//!
//! A user message that contains `<|im_end|>\n<|im_start|>system` must not close its own turn
//! and forge a system turn. So user text (a message's content, a completion prompt) is encoded
//! with special-token text left as text, and a rendered chat keeps the special tokens the
//! template itself wrote: it is rendered once with each content replaced by a marker, the
//! special tokens are found in the template's text only, and the text between two of them
//! (template text and contents alike) is encoded as one piece without special-token parsing.
//!
//! For text whose contents hold no special-token text, the ids are exactly those of encoding the
//! rendered chat with special-token parsing (the tokenizer splits at special tokens before it
//! pre-tokenizes either way, so the pieces are the same).

use std::ops::Range;

use tokenizers::Tokenizer;

use crate::error::{LlmError, Result};
use crate::tokenizer::{ChatTemplate, Message};

fn tok_err(e: impl std::fmt::Display) -> LlmError {
    LlmError::Tokenizer(e.to_string())
}

/// Marks message `i`'s content in a rendering (private-use characters, which no chat template
/// writes and no special token contains).
fn marker(i: usize) -> String {
    format!("\u{F0000}{i}\u{F0001}")
}

/// The tokenizer twice: with special-token parsing (template text) and without (user text).
#[derive(Debug)]
pub struct Encoder {
    special: Tokenizer,
    plain: Tokenizer,
    /// Special tokens' texts and ids, longest first.
    specials: Vec<(String, u32)>,
}

impl Encoder {
    /// The encoder over `tokenizer` (its special tokens are the added tokens marked special).
    pub fn new(tokenizer: Tokenizer) -> Self {
        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);
        let mut specials: Vec<(String, u32)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (t.content, id))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Self {
            special: tokenizer,
            plain,
            specials,
        }
    }

    /// The tokenizer with special-token parsing (decoding, vocabulary).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.special
    }

    /// Ids of user text: special-token text stays text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        ids(&self.plain, text)
    }

    /// Ids of trusted text whose special-token texts are all meant as special tokens.
    pub fn encode_with_specials(&self, text: &str) -> Result<Vec<u32>> {
        ids(&self.special, text)
    }

    /// Whether `text` holds the text of a special token.
    pub fn has_special_text(&self, text: &str) -> bool {
        self.specials.iter().any(|(s, _)| text.contains(s.as_str()))
    }

    /// Ids of `messages` through `template` (generation prompt added): special tokens only
    /// where the template wrote them.
    pub fn encode_messages(
        &self,
        template: &ChatTemplate,
        messages: &[Message<'_>],
    ) -> Result<Vec<u32>> {
        let (text, contents) = render_marked(template, messages)?;
        let mut out = Vec::new();
        let mut from = 0;
        for (at, len, id) in self.template_specials(&text, &contents) {
            out.extend(ids(&self.plain, &text[from..at])?);
            out.push(id);
            from = at + len;
        }
        out.extend(ids(&self.plain, &text[from..])?);
        Ok(out)
    }

    /// Special tokens in `text` outside `contents`, leftmost-longest: (offset, length, id).
    fn template_specials(&self, text: &str, contents: &[Range<usize>]) -> Vec<(usize, usize, u32)> {
        let mut found = Vec::new();
        let mut pos = 0;
        while pos < text.len() {
            if let Some(r) = contents.iter().find(|r| r.start == pos && !r.is_empty()) {
                pos = r.end;
                continue;
            }
            let next_content = contents
                .iter()
                .map(|r| r.start)
                .filter(|&s| s > pos)
                .min()
                .unwrap_or(text.len());
            let hit = self.specials.iter().find(|(s, _)| {
                text[pos..].starts_with(s.as_str()) && pos + s.len() <= next_content
            });
            match hit {
                Some((s, id)) => {
                    found.push((pos, s.len(), *id));
                    pos += s.len();
                }
                None => pos += text[pos..].chars().next().map_or(1, char::len_utf8),
            }
        }
        found
    }
}

fn ids(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    tokenizer
        .encode_fast(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(tok_err)
}

/// Renders `messages` with each content as a marker, then puts the contents in: the rendered
/// text and the byte ranges of the contents in it. A template that transforms contents (so
/// the result differs from rendering them directly) is an error rather than a guess.
fn render_marked(
    template: &ChatTemplate,
    messages: &[Message<'_>],
) -> Result<(String, Vec<Range<usize>>)> {
    let markers: Vec<String> = (0..messages.len()).map(marker).collect();
    let marked: Vec<Message<'_>> = messages
        .iter()
        .zip(&markers)
        .map(|(m, k)| Message {
            role: m.role,
            content: k,
        })
        .collect();
    let rendered = template.render(&marked)?;
    let mut text = String::with_capacity(rendered.len());
    let mut contents = Vec::new();
    let mut rest = rendered.as_str();
    while let Some(start) = rest.find('\u{F0000}') {
        text.push_str(&rest[..start]);
        let after = &rest[start + '\u{F0000}'.len_utf8()..];
        let end = after
            .find('\u{F0001}')
            .ok_or_else(|| LlmError::Template("a content marker lost its end".into()))?;
        let i: usize = after[..end]
            .parse()
            .map_err(|_| LlmError::Template("a content marker was altered".into()))?;
        let content = messages
            .get(i)
            .ok_or_else(|| LlmError::Template("a content marker was altered".into()))?
            .content;
        contents.push(text.len()..text.len() + content.len());
        text.push_str(content);
        rest = &after[end + '\u{F0001}'.len_utf8()..];
    }
    text.push_str(rest);
    if text != template.render(messages)? {
        return Err(LlmError::Template(
            "the chat template transforms message contents: they cannot be kept apart from \
             its special tokens"
                .into(),
        ));
    }
    Ok((text, contents))
}
