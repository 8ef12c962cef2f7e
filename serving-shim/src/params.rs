//! [`Params`]: what a request asks for, read from its wire type ([`crate::openai`]) and checked
//! against the server's limits before any arithmetic meets a client's number: the cap
//! (`max_tokens`, or chat's `max_completion_tokens`) at least 1 and within the context, the
//! sampling ranges, the stop strings, the evaluation-only stop, and every unsupported field at
//! its neutral value. Each refusal is a 400 naming the field.

use serde_json::Value;
use trail_llm::Sampling;

use crate::api_error::ApiError;
use crate::openai::{ChatMessage, Common, Content, Prompt, Unsupported};
use crate::stop::StopStrings;

/// The request field of the evaluation-only stop.
pub(crate) const EVAL_STOP: &str = "eval_output_tokens";

/// What the server allows, as the checks need it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Allowed {
    /// `max_tokens` of a request that gives none.
    pub(crate) default_max_tokens: usize,
    /// The model's context: the most `max_tokens` can be.
    pub(crate) context: usize,
    /// Whether `eval_output_tokens` is accepted.
    pub(crate) eval_stop: bool,
}

/// A request's settings, checked.
#[derive(Debug)]
pub(crate) struct Params {
    pub(crate) max_tokens: usize,
    pub(crate) sampling: Sampling,
    pub(crate) stream: bool,
    /// A stream ends with a usage chunk (`stream_options.include_usage`).
    pub(crate) include_usage: bool,
    pub(crate) ignore_eos: bool,
    pub(crate) stop: StopStrings,
    /// Evaluation only: the profiled length to stop at ([`crate::GenRequest::eval_stop`]).
    pub(crate) eval_stop: Option<usize>,
}

impl Params {
    /// `c` checked against `allowed`; `cap` is the cap and the name of the field that gave it
    /// (`max_tokens`, or chat's `max_completion_tokens`).
    pub(crate) fn check(
        c: Common,
        cap: (Option<u64>, &'static str),
        allowed: Allowed,
    ) -> Result<Self, ApiError> {
        let temperature = c.temperature.unwrap_or(0.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad(
                "temperature",
                "`temperature` must be in [0, 2]",
            ));
        }
        if c.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return Err(ApiError::bad("top_p", "`top_p` must be in (0, 1]"));
        }
        let stream = c.stream.unwrap_or(false);
        if c.stream_options.is_some() && !stream {
            return Err(ApiError::bad(
                "stream_options",
                "`stream_options` is only allowed with `stream: true`",
            ));
        }
        let stop = StopStrings::new(c.stop.map(|s| s.into_vec()).unwrap_or_default())
            .map_err(|e| ApiError::bad("stop", format!("`stop`: {e}")))?;
        Ok(Self {
            max_tokens: max_tokens(cap, allowed)?,
            sampling: Sampling::new(temperature, c.top_p, c.seed.unwrap_or(0)),
            stream,
            include_usage: c.stream_options.is_some_and(|o| o.include_usage),
            ignore_eos: c.ignore_eos.unwrap_or(false),
            stop,
            eval_stop: eval_stop(c.eval_output_tokens, allowed)?,
        })
    }
}

/// The cap (the default when absent), at least 1 and at most the model's context.
fn max_tokens(
    (cap, field): (Option<u64>, &'static str),
    allowed: Allowed,
) -> Result<usize, ApiError> {
    let Some(m) = cap else {
        return Ok(allowed.default_max_tokens);
    };
    if m == 0 {
        return Err(ApiError::bad(
            field,
            format!("`{field}` must be at least 1"),
        ));
    }
    usize::try_from(m)
        .ok()
        .filter(|&m| m <= allowed.context)
        .ok_or_else(|| {
            ApiError::bad(
                field,
                format!(
                    "`{field}` {m} exceeds the context of {} tokens",
                    allowed.context
                ),
            )
            .with_code("context_length_exceeded")
        })
}

/// The evaluation-only stop of a request, refused unless the server allows it.
fn eval_stop(n: Option<u64>, allowed: Allowed) -> Result<Option<usize>, ApiError> {
    let Some(n) = n else {
        return Ok(None);
    };
    if !allowed.eval_stop {
        return Err(ApiError::bad(
            EVAL_STOP,
            "`eval_output_tokens` is an evaluation-only stop (a profiled output length); this \
             server was not started with --allow-eval-output-tokens",
        ));
    }
    Ok(Some(usize::try_from(n).unwrap_or(usize::MAX)))
}

/// Chat's cap: `max_completion_tokens` (OpenAI's newer name) or `max_tokens`; both given must
/// agree.
pub(crate) fn chat_cap(
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
) -> Result<(Option<u64>, &'static str), ApiError> {
    match (max_completion_tokens, max_tokens) {
        (Some(a), Some(b)) if a != b => Err(ApiError::bad(
            "max_completion_tokens",
            format!("`max_completion_tokens` {a} and `max_tokens` {b} disagree: give one"),
        )),
        (Some(a), _) => Ok((Some(a), "max_completion_tokens")),
        (None, b) => Ok((b, "max_tokens")),
    }
}

/// Refuses every unsupported field set to anything but its neutral value (absent, null, `n`
/// and `best_of` 1, `false`, 0, empty, `tool_choice: "none"`, a `text` response format).
pub(crate) fn refuse_unsupported(u: &Unsupported) -> Result<(), ApiError> {
    let refuse = |field: &str, what: &str| {
        Err(ApiError::bad(
            field,
            format!("`{field}` is not supported by this server: {what}"),
        ))
    };
    if u.n.is_some_and(|n| n != 1) {
        return refuse("n", "one choice per request (n = 1)");
    }
    if u.best_of.is_some_and(|n| n != 1) {
        return refuse("best_of", "one sequence per request (best_of = 1)");
    }
    let set = |v: &Option<Value>| {
        v.as_ref().is_some_and(|v| {
            !(v.is_null()
                || *v == Value::Bool(false)
                || v.as_u64() == Some(0)
                || v.as_array().is_some_and(Vec::is_empty)
                || v.as_object().is_some_and(serde_json::Map::is_empty))
        })
    };
    for (field, v, what) in [
        ("logprobs", &u.logprobs, "no log probabilities"),
        ("top_logprobs", &u.top_logprobs, "no log probabilities"),
        ("suffix", &u.suffix, "no insertion"),
        ("logit_bias", &u.logit_bias, "no logit bias"),
        ("tools", &u.tools, "no tool calls"),
        ("functions", &u.functions, "no function calls"),
        ("function_call", &u.function_call, "no function calls"),
    ] {
        if set(v) {
            return refuse(field, what);
        }
    }
    if u.tool_choice
        .as_ref()
        .is_some_and(|v| !v.is_null() && v != "none")
    {
        return refuse("tool_choice", "no tool calls (only \"none\")");
    }
    let text_format = |v: &Value| v.is_null() || v.get("type").is_some_and(|t| t == "text");
    if u.response_format.as_ref().is_some_and(|v| !text_format(v)) {
        return refuse("response_format", "plain text only");
    }
    if u.echo == Some(true) {
        return refuse("echo", "the prompt is not echoed");
    }
    for (field, v) in [
        ("presence_penalty", u.presence_penalty),
        ("frequency_penalty", u.frequency_penalty),
    ] {
        if v.is_some_and(|p| p != 0.0) {
            return refuse(field, "no penalties (0 only)");
        }
    }
    Ok(())
}

/// A completion's prompt: a string, or a list holding one string.
pub(crate) fn prompt(p: Option<Prompt>) -> Result<String, ApiError> {
    match p {
        Some(Prompt::One(s)) => Ok(s),
        Some(Prompt::Many(mut v)) if v.len() == 1 && v[0].is_string() => match v.remove(0) {
            Value::String(s) => Ok(s),
            _ => unreachable!("checked"),
        },
        Some(Prompt::Many(_)) => Err(ApiError::bad(
            "prompt",
            "`prompt` must be a string (one prompt per request; token ids are not accepted)",
        )),
        None => Err(ApiError::bad("prompt", "missing field `prompt`")),
    }
}

/// A chat's messages as (role, text): roles system, user and assistant; content a string or a
/// list of text parts (joined).
pub(crate) fn messages(msgs: Option<Vec<ChatMessage>>) -> Result<Vec<(String, String)>, ApiError> {
    let msgs = msgs.ok_or_else(|| ApiError::bad("messages", "missing field `messages`"))?;
    if msgs.is_empty() {
        return Err(ApiError::bad("messages", "`messages` is empty"));
    }
    msgs.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let field = || format!("messages[{i}]");
            if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                return Err(ApiError::bad(
                    format!("{}.role", field()),
                    format!(
                        "`messages[{i}].role` {:?}: the roles are system, user and assistant",
                        m.role
                    ),
                ));
            }
            let text = content(m.content).map_err(|e| {
                ApiError::bad(
                    format!("{}.content", field()),
                    format!("`messages[{i}].content`: {e}"),
                )
            })?;
            Ok((m.role, text))
        })
        .collect()
}

/// A message's text: the string, or its text parts joined.
fn content(c: Option<Content>) -> Result<String, String> {
    match c {
        Some(Content::Text(s)) => Ok(s),
        Some(Content::Parts(parts)) => parts
            .into_iter()
            .map(|p| match (p.kind.as_str(), p.text) {
                ("text", Some(t)) => Ok(t),
                ("text", None) => Err("a text part without `text`".to_string()),
                (kind, _) => Err(format!("a {kind:?} part: only text parts are supported")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.concat()),
        None => Err("missing (a string or a list of text parts)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::ChatRequest;

    const ALLOWED: Allowed = Allowed {
        default_max_tokens: 16,
        context: 8192,
        eval_stop: false,
    };

    fn chat(body: &str) -> Result<Params, ApiError> {
        let mut r: ChatRequest = serde_json::from_str(body).unwrap();
        refuse_unsupported(&r.unsupported())?;
        let cap = chat_cap(r.max_tokens, r.max_completion_tokens)?;
        Params::check(r.common(), cap, ALLOWED)
    }

    fn param(e: ApiError) -> String {
        format!("{e:?}")
    }

    #[test]
    fn unsupported_fields_pass_only_at_their_neutral_value() {
        for ok in [
            r#"{"n": 1, "logprobs": false, "tools": [], "tool_choice": "none"}"#,
            r#"{"presence_penalty": 0, "response_format": {"type": "text"}, "logit_bias": {}}"#,
            r#"{"top_logprobs": 0, "user": "u1"}"#,
        ] {
            assert!(chat(ok).is_ok(), "{ok}");
        }
        for (bad, field) in [
            (r#"{"n": 2}"#, "n"),
            (r#"{"logprobs": true}"#, "logprobs"),
            (r#"{"tools": [{"type": "function"}]}"#, "tools"),
            (r#"{"tool_choice": "auto"}"#, "tool_choice"),
            (r#"{"frequency_penalty": 0.5}"#, "frequency_penalty"),
            (
                r#"{"response_format": {"type": "json_object"}}"#,
                "response_format",
            ),
        ] {
            let e = param(chat(bad).unwrap_err());
            assert!(
                e.contains(&format!("param: Some(\"{field}\")")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_cap_comes_from_either_name_and_is_bounded() {
        assert_eq!(chat("{}").unwrap().max_tokens, 16);
        assert_eq!(
            chat(r#"{"max_completion_tokens": 7}"#).unwrap().max_tokens,
            7
        );
        assert_eq!(
            chat(r#"{"max_tokens": 7, "max_completion_tokens": 7}"#)
                .unwrap()
                .max_tokens,
            7
        );
        let e = param(chat(r#"{"max_tokens": 6, "max_completion_tokens": 7}"#).unwrap_err());
        assert!(e.contains("max_completion_tokens"), "{e}");
        let e = param(chat(r#"{"max_completion_tokens": 9000}"#).unwrap_err());
        assert!(
            e.contains("context_length_exceeded") && e.contains("max_completion_tokens"),
            "{e}"
        );
        assert!(chat(r#"{"max_tokens": 0}"#).is_err());
    }

    #[test]
    fn stream_options_need_a_stream_and_stop_strings_are_bounded() {
        assert!(chat(r#"{"stream_options": {"include_usage": true}}"#).is_err());
        let p =
            chat(r#"{"stream": true, "stream_options": {"include_usage": true}, "stop": "\n"}"#)
                .unwrap();
        assert!(p.include_usage && p.stream);
        assert_eq!(p.stop.as_slice(), ["\n"]);
        assert!(chat(r#"{"stop": [""]}"#).is_err());
    }

    #[test]
    fn messages_take_strings_or_text_parts_and_name_what_is_wrong() {
        let msgs =
            |v: serde_json::Value| messages(serde_json::from_value(v).unwrap()).map_err(param);
        let m = msgs(serde_json::json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]))
        .unwrap();
        assert_eq!(m[1], ("user".to_string(), "ab".to_string()));
        let e = msgs(serde_json::json!([{"role": "tool", "content": "x"}])).unwrap_err();
        assert!(e.contains("messages[0].role"), "{e}");
        let e = msgs(serde_json::json!([
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        ]))
        .unwrap_err();
        assert!(
            e.contains("messages[0].content") && e.contains("only text parts"),
            "{e}"
        );
        assert!(msgs(serde_json::json!([])).is_err());
    }
}
