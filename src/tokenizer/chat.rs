//! Chat prompts: the model's own Jinja template (`tokenizer.chat_template`), or a
//! plain-text fallback for models without one.
//!
//! Templates are rendered with `minijinja` in the setting Hugging Face's
//! `apply_chat_template` uses (`trim_blocks` and `lstrip_blocks` on), with the usual
//! variables: `messages` (a list of `{role, content}`), `add_generation_prompt`,
//! `bos_token`, `eos_token`, `tools` and `documents` (none), a `raise_exception(message)`
//! function that turns into a [`TokenizerError::Template`], `strftime_now(format)`, a
//! `tojson` filter that writes JSON as Python's `json.dumps` does, and Python's string,
//! list and dict methods (`.strip()`, `.startswith()`, `.items()`...: minijinja-contrib's
//! pycompat). `tests/chat_templates.rs` holds the renders of published templates to
//! Python's Jinja2 in that environment.
//!
//! The rendered text contains special tokens written out (`<|im_start|>`...): encode
//! it with [`Tokenizer::encode_chat`], which parses them and adds BOS unless the
//! template wrote it. Messages from someone else (a server's clients) go through
//! [`ChatTemplate::render_untrusted`] and [`Tokenizer::encode_chat_content`], which
//! keep control tokens spelled out in message content as text.
//!
//! A render runs at most 20 million template instructions (minijinja's fuel) and
//! writes at most 1 MiB plus four times the messages' content. The front ends also
//! render in a child process with memory and time limits
//! ([`ChatTemplate::sandboxed`]), since one instruction of a hostile template can
//! still ask for any amount of either.
use std::borrow::Cow;
use std::ops::Range;

use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use super::sandbox::{RenderJob, Sandbox};
use super::template_fns;
use super::{Tokenizer, TokenizerError};
use crate::gguf::GgufFile;

/// One chat turn. `role` is usually "system", "user", "assistant" or "tool".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// The tool calls an assistant turn made, in OpenAI's shape
    /// (`[{"type": "function", "function": {"name": ..., "arguments": ...}}]`), for
    /// templates that print them. Absent from the template's view when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A tool turn's answer to this call id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A tool turn's tool name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A way to turn a conversation into prompt text.
pub struct ChatTemplate {
    kind: Kind,
}

struct Jinja {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
    /// Where to render, if not in this process (see [`ChatTemplate::sandboxed`]).
    sandbox: Option<Sandbox>,
}

enum Kind {
    Jinja(Box<Jinja>),
    /// The template did not compile; rendering reports this error.
    Broken(String),
    Plain,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Jinja(_) => "jinja",
            Kind::Broken(_) => "broken",
            Kind::Plain => "plain",
        };
        f.debug_struct("ChatTemplate").field("kind", &kind).finish()
    }
}

const TEMPLATE_NAME: &str = "chat_template";
/// The metadata key of a model's (default) template.
const TEMPLATE_KEY: &str = "tokenizer.chat_template";
/// `--chat-template`'s name for the template under [`TEMPLATE_KEY`] itself.
const DEFAULT_NAME: &str = "default";

/// The texts of the tokenizer's BOS and EOS tokens (empty where it has none): what a
/// template sees as `bos_token` and `eos_token`.
fn special_texts(tokenizer: &Tokenizer) -> (String, String) {
    let text = |id: Option<u32>| {
        id.and_then(|id| tokenizer.token_text(id))
            .unwrap_or_default()
            .to_string()
    };
    (text(tokenizer.bos()), text(tokenizer.eos()))
}

impl ChatTemplate {
    /// The model's template, or `None` if its metadata has no `tokenizer.chat_template`.
    /// A template that does not compile is still returned: [`ChatTemplate::render`]
    /// reports the error.
    pub fn from_gguf(gguf: &GgufFile, tokenizer: &Tokenizer) -> Option<ChatTemplate> {
        let source = gguf.get_str(TEMPLATE_KEY)?;
        Some(Self::for_tokenizer(source, tokenizer).unwrap_or_else(Self::broken))
    }

    /// The names of the model's templates, as `--chat-template` takes them: `default`
    /// for `tokenizer.chat_template`, then the name of each further
    /// `tokenizer.chat_template.NAME` (models with tool-use or RAG variants ship those,
    /// and llama.cpp's converter writes them so), sorted.
    pub fn names_in_gguf(gguf: &GgufFile) -> Vec<String> {
        let mut names = Vec::new();
        if gguf.get_str(TEMPLATE_KEY).is_some() {
            names.push(DEFAULT_NAME.to_string());
        }
        let prefix = format!("{TEMPLATE_KEY}.");
        for key in gguf.keys() {
            if let Some(name) = key.strip_prefix(&prefix) {
                if gguf.get_str(key).is_some() && name != DEFAULT_NAME {
                    names.push(name.to_string());
                }
            }
        }
        names
    }

    /// The model's template called `name` (see [`ChatTemplate::names_in_gguf`]); an
    /// error naming those it has when it has none by that name.
    pub fn from_gguf_named(
        gguf: &GgufFile,
        tokenizer: &Tokenizer,
        name: &str,
    ) -> Result<ChatTemplate, TokenizerError> {
        let key = if name == DEFAULT_NAME {
            TEMPLATE_KEY.to_string()
        } else {
            format!("{TEMPLATE_KEY}.{name}")
        };
        match gguf.get_str(&key) {
            Some(source) => Ok(Self::for_tokenizer(source, tokenizer).unwrap_or_else(Self::broken)),
            None => {
                let names = Self::names_in_gguf(gguf);
                Err(TokenizerError::Template(if names.is_empty() {
                    format!("there is no chat template named `{name}`: the model has none")
                } else {
                    format!(
                        "there is no chat template named `{name}`; the model has: {}",
                        names.join(", ")
                    )
                }))
            }
        }
    }

    /// `source` compiled with `tokenizer`'s BOS and EOS texts as `bos_token` and
    /// `eos_token`.
    pub fn for_tokenizer(source: &str, tokenizer: &Tokenizer) -> Result<Self, TokenizerError> {
        let (bos, eos) = special_texts(tokenizer);
        Self::new(source, &bos, &eos)
    }

    /// A template that did not compile: rendering reports `e`.
    fn broken(e: TokenizerError) -> Self {
        Self {
            kind: Kind::Broken(e.to_string()),
        }
    }

    /// Compile a Jinja chat template; `bos_token` / `eos_token` are the texts the
    /// template sees under those names.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // The template comes from the model file: it may loop without end.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        // What Hugging Face's environment adds (template_fns.rs), and Python's string,
        // list and dict methods.
        env.add_filter("tojson", template_fns::tojson);
        env.add_function("strftime_now", template_fns::strftime_now);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_test("iterable", template_fns::is_iterable);
        env.set_formatter(template_fns::python_formatter);
        env.add_filter("string", template_fns::string);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(template_error)?;
        Ok(Self {
            kind: Kind::Jinja(Box::new(Jinja {
                env,
                source: source.to_string(),
                bos_token: bos_token.to_string(),
                eos_token: eos_token.to_string(),
                sandbox: None,
            })),
        })
    }

    /// The fallback for models without a template (base models such as Gemma 3 270M).
    /// Each message becomes a line `Role: content` (role capitalised: `System`, `User`,
    /// `Assistant`), and the generation prompt is `Assistant:` with no trailing space,
    /// so the model's first token supplies it:
    ///
    /// ```text
    /// User: What is 2+2?
    /// Assistant: 4
    /// User: And 3+3?
    /// Assistant:
    /// ```
    pub fn plain() -> Self {
        Self { kind: Kind::Plain }
    }

    /// Render in a child process under `sandbox`'s limits (a template from a model file
    /// can otherwise exhaust this process's memory or time: see [`super::sandbox`]).
    /// Does nothing to the plain fallback, which runs no template.
    pub fn sandboxed(mut self, sandbox: Sandbox) -> Self {
        if let Kind::Jinja(jinja) = &mut self.kind {
            jinja.sandbox = Some(sandbox);
        }
        self
    }

    /// True for [`ChatTemplate::plain`], so front ends can say that no model template is used.
    pub fn is_fallback(&self) -> bool {
        matches!(self.kind, Kind::Plain)
    }

    /// Render `messages`; with `add_generation_prompt`, end with the text that opens
    /// the assistant's reply.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`ChatTemplate::render`] offering the model `tools` (a list of function schemas
    /// in OpenAI's shape, `[{"type": "function", "function": {"name", "description",
    /// "parameters"}}]`), for templates that describe them in the prompt. The plain
    /// fallback has no place for them and leaves them out.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        match &self.kind {
            Kind::Jinja(jinja) => match &jinja.sandbox {
                Some(sandbox) => sandbox.render(&RenderJob {
                    source: Cow::Borrowed(&jinja.source),
                    bos_token: Cow::Borrowed(&jinja.bos_token),
                    eos_token: Cow::Borrowed(&jinja.eos_token),
                    messages: Cow::Borrowed(messages),
                    tools: tools.map(Cow::Borrowed),
                    add_generation_prompt,
                }),
                None => jinja.render(messages, tools, add_generation_prompt),
            },
            Kind::Broken(e) => Err(TokenizerError::Template(e.clone())),
            Kind::Plain => Ok(render_plain(messages, add_generation_prompt)),
        }
    }
}

impl ChatTemplate {
    /// [`ChatTemplate::render`] for messages from someone else (a server's clients):
    /// also returns the byte ranges of the output that are the content of a message
    /// spelling out control tokens, for [`Tokenizer::encode_chat_content`] to keep as
    /// text. Such content is rendered as a marker and put back after rendering, so
    /// the ranges are exact; content without control tokens is rendered as it is.
    pub fn render_untrusted(
        &self,
        tok: &Tokenizer,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<Range<usize>>), TokenizerError> {
        let mut shown = messages.to_vec();
        let mut held: Vec<(String, String)> = Vec::new(); // (marker, content)
        for (i, m) in shown.iter_mut().enumerate() {
            if tok.has_control_text(&m.content) {
                let marker = format!("\u{E000}fastkv-message-{i}\u{E001}");
                held.push((marker.clone(), std::mem::replace(&mut m.content, marker)));
            }
        }
        let rendered = self.render(&shown, add_generation_prompt)?;
        if held.is_empty() {
            return Ok((rendered, Vec::new()));
        }
        let mut out = String::with_capacity(rendered.len());
        let mut spans = Vec::new();
        let mut rest = rendered.as_str();
        // The earliest marker left, each time (a template may repeat or drop one).
        while let Some((at, marker, content)) = held
            .iter()
            .filter_map(|(m, c)| rest.find(m.as_str()).map(|at| (at, m, c)))
            .min_by_key(|&(at, _, _)| at)
        {
            out.push_str(&rest[..at]);
            spans.push(out.len()..out.len() + content.len());
            out.push_str(content);
            rest = &rest[at + marker.len()..];
        }
        out.push_str(rest);
        Ok((out, spans))
    }
}

impl Jinja {
    /// Render in this process, within the fuel and output limits.
    fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        let mut out = CappedOutput {
            bytes: Vec::new(),
            cap: TEMPLATE_OUTPUT_BASE
                + TEMPLATE_OUTPUT_PER_CONTENT_BYTE
                    * messages.iter().map(|m| m.content.len()).sum::<usize>(),
            overflowed: false,
        };
        template
            .render_captured_to(
                context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    // None when not given, as transformers passes them.
                    tools => tools,
                    documents => (),
                    bos_token => &self.bos_token,
                    eos_token => &self.eos_token,
                },
                &mut out,
            )
            .map_err(|e| {
                if out.overflowed {
                    TokenizerError::Template(format!(
                        "the template's output passed {} bytes for {} messages",
                        out.cap,
                        messages.len()
                    ))
                } else {
                    template_error(e)
                }
            })?;
        // minijinja writes whole `str`s.
        String::from_utf8(out.bytes)
            .map_err(|e| TokenizerError::Template(format!("output not UTF-8: {e}")))
    }
}

fn render_plain(messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str(&capitalize(&m.role));
        out.push_str(": ");
        out.push_str(&m.content);
        out.push('\n');
    }
    if add_generation_prompt {
        out.push_str("Assistant:");
    }
    out
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Template instructions one render may run (minijinja's fuel): a chat template
/// spends a few hundred per message, so this is thousands of messages, and a
/// template that loops without end stops in well under a second.
const TEMPLATE_FUEL: u64 = 20_000_000;

/// A render's output may be the messages' content times this, plus the base: a
/// template only adds markup around them. More stops the render (a hostile template
/// could otherwise grow its output until memory runs out).
const TEMPLATE_OUTPUT_PER_CONTENT_BYTE: usize = 4;
const TEMPLATE_OUTPUT_BASE: usize = 1 << 20;

/// The render's output, refused past `cap` bytes.
struct CappedOutput {
    bytes: Vec<u8>,
    cap: usize,
    /// Set when a write was refused (the render then fails).
    overflowed: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.cap {
            self.overflowed = true;
            return Err(std::io::Error::other("template output too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// minijinja errors carry the template line; keep the whole chain readable.
fn template_error(e: Error) -> TokenizerError {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    TokenizerError::Template(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_format() {
        let t = ChatTemplate::plain();
        assert!(t.is_fallback());
        let msgs = [
            ChatMessage::user("Hi"),
            ChatMessage::assistant("Hello!"),
            ChatMessage::user("Bye"),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "User: Hi\nAssistant: Hello!\nUser: Bye\nAssistant:"
        );
        assert_eq!(t.render(&msgs[..1], false).unwrap(), "User: Hi\n");
    }

    #[test]
    fn jinja_variables_and_errors() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}{{ eos_token }}",
            "<s>",
            "</s>",
        )
        .unwrap();
        assert!(!t.is_fallback());
        assert_eq!(
            t.render(&[ChatMessage::user("x")], true).unwrap(),
            "<s>[user]x></s>"
        );

        let raising =
            ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let err = raising.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");

        assert!(matches!(
            ChatTemplate::new("{% for m in messages %}", "", ""),
            Err(TokenizerError::Template(_))
        ));
    }
}
