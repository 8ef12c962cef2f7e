//! The OpenAI wire types of the front end ([`crate::http`]), as serde structs: the bodies of
//! `POST /v1/completions` ([`CompletionRequest`]) and `POST /v1/chat/completions`
//! ([`ChatRequest`]), and every body the server answers with (completions, chat completions,
//! their stream chunks, the model list).
//!
//! A request field the server does not know is refused (`deny_unknown_fields`), and so is one
//! it knows but does not support, set to anything but its neutral value (`n: 2`, `logprobs`,
//! `best_of`, tools…): [`Unsupported`] lists them, and `params` checks them. Nothing a
//! client asks for is dropped silently. A type error names its field (the front end reads the
//! body through `serde_path_to_error`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::request::Summary;

/// The fields both endpoints share: caps, sampling, streaming, stop strings, trail's extras.
#[derive(Debug, Default)]
pub struct Common {
    /// The model to run; when given, one of the served names (404 otherwise).
    pub model: Option<String>,
    /// Most tokens to generate.
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Strings that end the text (not included in it).
    pub stop: Option<Stop>,
    /// Generate past stop tokens (benchmarks; vLLM's extension).
    pub ignore_eos: Option<bool>,
    /// Evaluation only: the profiled output length to stop at (see [`crate::http`]).
    pub eval_output_tokens: Option<u64>,
    /// An end-user identifier: accepted and not used (OpenAI's, for abuse monitoring).
    pub user: Option<String>,
}

/// Fields of OpenAI's API that this server does not support: each is refused unless absent or
/// at its neutral value.
#[derive(Debug, Default)]
pub struct Unsupported {
    pub n: Option<u64>,
    pub best_of: Option<u64>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub echo: Option<bool>,
    pub suffix: Option<Value>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub response_format: Option<Value>,
}

/// Declares a request struct with the [`Common`] and [`Unsupported`] fields inline (serde's
/// `flatten` would lose `deny_unknown_fields` and the field names in type errors), plus its
/// own, and the accessors that gather them.
macro_rules! request {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            pub model: Option<String>,
            pub max_tokens: Option<u64>,
            pub temperature: Option<f64>,
            pub top_p: Option<f64>,
            pub seed: Option<u64>,
            pub stream: Option<bool>,
            pub stream_options: Option<StreamOptions>,
            pub stop: Option<Stop>,
            pub ignore_eos: Option<bool>,
            pub eval_output_tokens: Option<u64>,
            pub user: Option<String>,
            pub n: Option<u64>,
            pub best_of: Option<u64>,
            pub logprobs: Option<Value>,
            pub top_logprobs: Option<Value>,
            pub echo: Option<bool>,
            pub suffix: Option<Value>,
            pub presence_penalty: Option<f64>,
            pub frequency_penalty: Option<f64>,
            pub logit_bias: Option<Value>,
            pub tools: Option<Value>,
            pub tool_choice: Option<Value>,
            pub functions: Option<Value>,
            pub function_call: Option<Value>,
            pub response_format: Option<Value>,
        }

        impl $name {
            /// The fields both endpoints share (moved out).
            pub fn common(&mut self) -> Common {
                Common {
                    model: self.model.take(),
                    max_tokens: self.max_tokens,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    seed: self.seed,
                    stream: self.stream,
                    stream_options: self.stream_options.take(),
                    stop: self.stop.take(),
                    ignore_eos: self.ignore_eos,
                    eval_output_tokens: self.eval_output_tokens,
                    user: self.user.take(),
                }
            }

            /// The unsupported fields (moved out).
            pub fn unsupported(&mut self) -> Unsupported {
                Unsupported {
                    n: self.n,
                    best_of: self.best_of,
                    logprobs: self.logprobs.take(),
                    top_logprobs: self.top_logprobs.take(),
                    echo: self.echo,
                    suffix: self.suffix.take(),
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    logit_bias: self.logit_bias.take(),
                    tools: self.tools.take(),
                    tool_choice: self.tool_choice.take(),
                    functions: self.functions.take(),
                    function_call: self.function_call.take(),
                    response_format: self.response_format.take(),
                }
            }
        }
    };
}

request! {
    /// `POST /v1/completions`.
    CompletionRequest {
        /// One string, or a list holding one string.
        prompt: Option<Prompt>,
    }
}

request! {
    /// `POST /v1/chat/completions`.
    ChatRequest {
        messages: Option<Vec<ChatMessage>>,
        /// The newer name of `max_tokens` (OpenAI's); both given must agree.
        max_completion_tokens: Option<u64>,
    }
}

/// A completion's prompt.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<Value>),
}

/// `stop`: one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    /// The strings, in order.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// One last chunk with `choices: []` and the usage (every other chunk has `usage: null`).
    #[serde(default)]
    pub include_usage: bool,
}

/// A chat message as sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    /// A string, or a list of text parts.
    pub content: Option<Content>,
    /// A participant's name: accepted and not used (the chat template has no place for it).
    #[serde(default)]
    pub name: Option<String>,
}

/// A message's content.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a message's content: only `{"type": "text", "text": …}` is supported.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    /// The counts of a finished request.
    pub fn of(s: &Summary) -> Self {
        Self {
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.tokens.len(),
            total_tokens: s.prompt_tokens + s.tokens.len(),
        }
    }
}

/// trail's extension beside `usage`: seconds from arrival to first admission and preemptions
/// (what a load generator cannot observe from the outside).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TrailExtension {
    pub queue_s: Option<f64>,
    pub preemptions: u32,
    pub recomputed_tokens: usize,
}

impl TrailExtension {
    /// The extension of a finished request.
    pub fn of(s: &Summary) -> Self {
        Self {
            queue_s: s
                .times
                .first_scheduled
                .map(|f| (f - s.times.arrival).max(0.0)),
            preemptions: s.preemptions_policy + s.preemptions_memory,
            recomputed_tokens: s.recomputed_tokens,
        }
    }
}

/// A choice of `/v1/completions`, whole or as a stream chunk.
#[derive(Debug, Serialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

/// The assistant's message of a chat choice.
#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

/// A choice of `/v1/chat/completions`.
#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<()>,
    pub finish_reason: &'static str,
}

/// The delta of a chat stream chunk: the role on the first, content while there is text.
#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A choice of a chat stream chunk.
#[derive(Debug, Serialize)]
pub struct DeltaChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

/// A response body or a stream chunk: `id`, `object`, `created`, `model`, the choices, and
/// (when present) `usage` and trail's extension. In a stream, `usage` is absent unless the
/// client asked for it (`stream_options.include_usage`), then null on every chunk but the last.
#[derive(Debug, Serialize)]
pub struct Response<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trail: Option<TrailExtension>,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// One served model, as vLLM lists it.
#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// The model it serves (the GGUF's name).
    pub root: String,
    pub parent: Option<String>,
    /// The model's context length.
    pub max_model_len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ChatRequest, String> {
        let de = &mut serde_json::Deserializer::from_str(body);
        serde_path_to_error::deserialize(de).map_err(|e| format!("{}: {}", e.path(), e.inner()))
    }

    #[test]
    fn an_unknown_field_or_a_wrong_type_is_refused_naming_the_field() {
        let e = chat(r#"{"messages": [], "max_tokens": "many"}"#).unwrap_err();
        assert!(e.starts_with("max_tokens:"), "{e}");
        let e = chat(r#"{"messages": [], "frequency_penality": 1}"#).unwrap_err();
        assert!(e.contains("frequency_penality"), "{e}");
        let e = chat(r#"{"messages": [], "stream_options": {"include_usage": 1}}"#).unwrap_err();
        assert!(e.starts_with("stream_options.include_usage:"), "{e}");
    }

    #[test]
    fn content_parts_stop_lists_and_unsupported_fields_are_read() {
        let mut r = chat(
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                "stop": ["a", "b"], "n": 2, "logprobs": true, "max_completion_tokens": 5}"#,
        )
        .unwrap();
        let msgs = r.messages.take().unwrap();
        assert!(
            matches!(&msgs[0].content, Some(Content::Parts(p)) if p[0].text.as_deref() == Some("hi"))
        );
        assert_eq!(r.max_completion_tokens, Some(5));
        let c = r.common();
        assert_eq!(c.stop.unwrap().into_vec(), ["a", "b"]);
        let u = r.unsupported();
        assert_eq!(u.n, Some(2));
        assert_eq!(u.logprobs, Some(Value::Bool(true)));
    }

    #[test]
    fn stream_usage_is_absent_null_or_a_value() {
        let chunk = |usage| Response::<CompletionChoice> {
            id: "x".into(),
            object: "text_completion",
            created: 0,
            model: "m".into(),
            choices: vec![],
            usage,
            trail: None,
        };
        let absent = serde_json::to_value(chunk(None)).unwrap();
        assert!(absent.get("usage").is_none());
        let null = serde_json::to_value(chunk(Some(None))).unwrap();
        assert!(null["usage"].is_null() && null.get("usage").is_some());
        let u = Usage {
            prompt_tokens: 2,
            completion_tokens: 3,
            total_tokens: 5,
        };
        let v = serde_json::to_value(chunk(Some(Some(u)))).unwrap();
        assert_eq!(v["usage"]["total_tokens"], 5);
    }
}
