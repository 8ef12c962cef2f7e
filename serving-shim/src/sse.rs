//! A streamed completion as server-sent events, the way OpenAI and vLLM send it: one chunk per
//! piece of new text (detokenized incrementally, an incomplete character held back, and the
//! tail that could start a stop string held back too), the last text chunk with its
//! `finish_reason` and trail's extension, then, when the client asked for it
//! (`stream_options.include_usage`), one chunk with `choices: []` and the usage, and `[DONE]`.
//! With `include_usage` every other chunk carries `usage: null`; without it none has `usage`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, Sse};
use futures_util::Stream;
use trail_llm::Runner;

use crate::openai::{CompletionChoice, Delta, DeltaChoice, Response, TrailExtension, Usage};
use crate::request::{Event, RequestHandle, Summary};
use crate::stop::StopStrings;

/// Which endpoint's chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Text,
    Chat,
}

impl Kind {
    /// The id prefix and the `object` of a whole response.
    pub(crate) fn names(self) -> (&'static str, &'static str) {
        match self {
            Self::Text => ("cmpl", "text_completion"),
            Self::Chat => ("chatcmpl", "chat.completion"),
        }
    }
}

/// What every chunk of a stream shares.
pub(crate) struct Header {
    pub(crate) id: String,
    pub(crate) model: String,
    pub(crate) created: u64,
    pub(crate) kind: Kind,
    pub(crate) include_usage: bool,
}

/// A stream in progress: the tokens so far, how much of their text was sent.
struct Streamer {
    runner: Arc<Runner>,
    handle: RequestHandle,
    header: Header,
    stop: StopStrings,
    tokens: Vec<u32>,
    sent: usize,
    first: bool,
    /// The usage, once the request ended and its finish chunk went out.
    ended: Option<Option<Usage>>,
}

impl Streamer {
    /// A chunk of the stream.
    fn chunk(&self, delta: String, finish: Option<&'static str>, end: Option<&Summary>) -> String {
        let h = &self.header;
        let usage = h.include_usage.then_some(None);
        let trail = end.map(TrailExtension::of);
        match h.kind {
            Kind::Text => self.encode(
                "text_completion",
                vec![CompletionChoice {
                    index: 0,
                    text: delta,
                    logprobs: None,
                    finish_reason: finish,
                }],
                usage,
                trail,
            ),
            Kind::Chat => {
                let d = Delta {
                    role: self.first.then_some("assistant"),
                    content: (!delta.is_empty() || finish.is_none()).then_some(delta),
                };
                self.encode(
                    "chat.completion.chunk",
                    vec![DeltaChoice {
                        index: 0,
                        delta: d,
                        logprobs: None,
                        finish_reason: finish,
                    }],
                    usage,
                    trail,
                )
            }
        }
    }

    /// The closing usage chunk: no choices.
    fn usage_chunk(&self, usage: Usage) -> String {
        let object = match self.header.kind {
            Kind::Text => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        self.encode::<DeltaChoice>(object, Vec::new(), Some(Some(usage)), None)
    }

    fn encode<C: serde::Serialize>(
        &self,
        object: &'static str,
        choices: Vec<C>,
        usage: Option<Option<Usage>>,
        trail: Option<TrailExtension>,
    ) -> String {
        let h = &self.header;
        let r = Response {
            id: h.id.clone(),
            object,
            created: h.created,
            model: h.model.clone(),
            choices,
            usage,
            trail,
        };
        serde_json::to_string(&r).expect("a chunk serializes")
    }

    /// Text decoded since the last chunk: none while it ends in an incomplete character; up to
    /// the first stop string; short of the tail that could start one unless `last`.
    fn delta(&mut self, last: bool) -> String {
        let text = self.runner.decode(&self.tokens).unwrap_or_default();
        if !last && text.ends_with('\u{FFFD}') {
            return String::new();
        }
        let end = match (last, self.stop.find(&text)) {
            (_, Some(at)) => at,
            (true, None) => text.len(),
            (false, None) => self.stop.visible(&text),
        };
        if end <= self.sent || !text.is_char_boundary(self.sent) {
            return String::new();
        }
        let d = text[self.sent..end].to_string();
        self.sent = end;
        d
    }

    async fn next(mut self) -> Option<(Result<SseEvent, Infallible>, Self)> {
        if let Some(usage) = self.ended.take() {
            let usage = usage.filter(|_| self.header.include_usage)?;
            let ev = SseEvent::default().data(self.usage_chunk(usage));
            self.ended = Some(None);
            return Some((Ok(ev), self));
        }
        loop {
            match self.handle.events.recv().await? {
                Event::Token(t) => {
                    self.tokens.push(t);
                    let d = self.delta(false);
                    if d.is_empty() && !self.first {
                        continue;
                    }
                    let ev = SseEvent::default().data(self.chunk(d, None, None));
                    self.first = false;
                    return Some((Ok(ev), self));
                }
                Event::Done(s) => {
                    self.tokens.clone_from(&s.tokens);
                    let d = self.delta(true);
                    let chunk = self.chunk(d, Some(s.finish.as_str()), Some(&s));
                    self.ended = Some(Some(Usage::of(&s)));
                    return Some((Ok(SseEvent::default().data(chunk)), self));
                }
            }
        }
    }
}

/// The SSE response of `handle`'s request, with `header` on every chunk; `stop` cuts the text.
pub(crate) fn stream(
    runner: Arc<Runner>,
    handle: RequestHandle,
    header: Header,
    stop: StopStrings,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    use futures_util::StreamExt;
    let s = Streamer {
        runner,
        handle,
        header,
        stop,
        tokens: Vec::new(),
        sent: 0,
        first: true,
        ended: None,
    };
    let body =
        futures_util::stream::unfold(s, Streamer::next).chain(futures_util::stream::once(async {
            Ok(SseEvent::default().data("[DONE]"))
        }));
    Sse::new(body)
}
