//! `fastkv chat`: an interactive conversation that keeps its KV cache between turns,
//! so each turn only runs the new tokens. `/load FILE` reads a document and
//! compresses it (per the --kv-* flags) before any question about it is asked.
//!
//! On a terminal, lines are read with a line editor (rustyline: editing, history
//! kept across sessions), Ctrl-C stops the current answer, and Ctrl-C or Ctrl-D at the
//! prompt leaves. From a pipe, each line is a message. Either way a line that ends in
//! `\` goes on to the next one, making one multi-line message.
use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Args;
use rustyline::error::ReadlineError;
use rustyline::DefaultEditor;

use super::{
    generate, print_compression, print_piece, CtxArgs, GenStats, KvArgs, Loaded, ModelArgs,
    PrefillBar, SamplingArgs, TemplateArgs,
};
use crate::sampling::Sampler;
use crate::session::Session;
use crate::tokenizer::{ChatMessage, ChatTemplate};

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub template: TemplateArgs,
    #[command(flatten)]
    pub ctx: CtxArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub kv: KvArgs,
    /// A system message that opens the conversation.
    #[arg(long = "system")]
    pub system: Option<String>,
    /// Most tokens per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    pub n_predict: usize,
}

pub fn chat(a: ChatArgs) -> Result<()> {
    let params = a.sampling.params()?;
    let l = a.model.load()?;
    let template = l.template(&a.template)?;
    let mut session = Session::new(&l.model, a.ctx.n_ctx(&l.model));
    a.kv.apply(&mut session, &l, params.seed, Some(&template))?;
    let mut sampler = Sampler::new(params);
    let mut conv = Conversation {
        l: &l,
        template: &template,
        messages: a.system.iter().map(ChatMessage::system).collect(),
        held: String::new(),
        document: String::new(),
    };
    let interactive = std::io::stdin().is_terminal();
    let mut input = if interactive {
        eprintln!(
            "chat with {} ({} tokens of context). /load FILE to read a document, \
             /reset to start over, /exit, Ctrl-D or Ctrl-C to quit; Ctrl-C stops an \
             answer; end a line with \\ to go on to the next.",
            l.path.display(),
            session.n_ctx()
        );
        // Ctrl-C while an answer is written stops it (at the prompt the line editor
        // reads Ctrl-C as a key and leaves).
        ctrlc::set_handler(|| STOP.store(true, Ordering::Relaxed))
            .context("cannot catch Ctrl-C")?;
        Input::editor()?
    } else {
        Input::Lines(std::io::stdin().lock().lines())
    };
    while let Some(line) = input.next()? {
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                conv.messages.retain(|m| m.role == "system");
                conv.held.clear();
                conv.document.clear();
                session.clear();
                continue;
            }
            _ => {}
        }
        if let Some(path) = text.strip_prefix("/load ") {
            if let Err(e) = conv.load(&mut session, path.trim()) {
                eprintln!("error: {e:#}");
            }
            continue;
        }
        let content = std::mem::take(&mut conv.document) + text;
        conv.messages.push(ChatMessage::user(content));
        let (rendered, prompt) = conv.prompt(&session)?;
        if prompt.len() >= session.n_ctx() {
            eprintln!(
                "the conversation no longer fits in {} tokens; use /reset or a larger -c",
                session.n_ctx()
            );
            conv.messages.pop();
            continue;
        }
        let mut stats = GenStats::default();
        let mut out = std::io::stdout().lock();
        STOP.store(false, Ordering::Relaxed);
        let mut stopped = false;
        let reply = generate(
            &mut session,
            &l.tokenizer,
            &mut sampler,
            &prompt,
            Some(a.n_predict),
            &mut stats,
            |piece| {
                let flow = print_piece(&mut out, piece)?;
                if STOP.swap(false, Ordering::Relaxed) {
                    stopped = true;
                    return Ok(ControlFlow::Break(()));
                }
                Ok(flow)
            },
        )?;
        writeln!(out)?;
        if stopped {
            eprintln!("[stopped]");
        }
        let reply_text = l.tokenizer.decode(&reply, false);
        // The reply goes into the conversation as generated (not trimmed), so that
        // the next render starts with the text the session holds.
        conv.held = rendered + &reply_text;
        conv.messages.push(ChatMessage::assistant(reply_text));
        if interactive {
            eprintln!(
                "[{} new prompt tokens, {:.1} t/s; {} tokens, {:.1} t/s; KV cache {:.2} MiB]",
                stats.n_prompt,
                stats.prompt_tps,
                stats.n_gen,
                stats.gen_tps,
                session.kv_bytes() as f64 / (1 << 20) as f64
            );
        }
    }
    input.save_history();
    Ok(())
}

/// Set by Ctrl-C (on a terminal): the answer being written stops.
static STOP: AtomicBool = AtomicBool::new(false);

/// Where the user's messages come from.
enum Input {
    /// A terminal: the line editor, and the file its history is kept in.
    Editor(Box<DefaultEditor>, Option<PathBuf>),
    /// A pipe or file: plain lines.
    Lines(std::io::Lines<std::io::StdinLock<'static>>),
}

impl Input {
    /// The line editor, with the history of earlier sessions.
    fn editor() -> Result<Self> {
        let mut editor = DefaultEditor::new().context("cannot start the line editor")?;
        let history = history_file();
        if let Some(path) = &history {
            // A first session has no history yet.
            let _ = editor.load_history(path);
        }
        Ok(Self::Editor(Box::new(editor), history))
    }

    /// The next message: a line, or lines joined while each ends in `\`. None when
    /// the user leaves (end of input; Ctrl-C or Ctrl-D at the prompt).
    fn next(&mut self) -> Result<Option<String>> {
        let mut message = String::new();
        loop {
            let line = match self {
                Self::Editor(editor, _) => {
                    let prompt = if message.is_empty() { "> " } else { ". " };
                    match editor.readline(prompt) {
                        Ok(line) => line,
                        Err(ReadlineError::Interrupted | ReadlineError::Eof) => return Ok(None),
                        Err(e) => return Err(e).context("cannot read the terminal"),
                    }
                }
                Self::Lines(lines) => match lines.next() {
                    Some(line) => line.context("cannot read standard input")?,
                    None if message.is_empty() => return Ok(None),
                    None => return Ok(Some(message)),
                },
            };
            match line.strip_suffix('\\') {
                Some(start) => {
                    message.push_str(start);
                    message.push('\n');
                }
                None => {
                    message.push_str(&line);
                    if let Self::Editor(editor, _) = self {
                        let _ = editor.add_history_entry(message.as_str());
                    }
                    return Ok(Some(message));
                }
            }
        }
    }

    /// Keep the history for the next session (best effort: a read-only home loses
    /// it, nothing else).
    fn save_history(&mut self) {
        if let Self::Editor(editor, Some(path)) = self {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if let Err(e) = editor.save_history(path) {
                eprintln!(
                    "note: cannot save the chat history to {}: {e}",
                    path.display()
                );
            }
        }
    }
}

/// `$XDG_STATE_HOME/fastkv/chat_history`, or `~/.local/state/fastkv/chat_history`.
fn history_file() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(state.join("fastkv").join("chat_history"))
}

/// The conversation's messages, and the text the session's tokens stand for, so that
/// a new turn only tokenizes what is new: re-tokenizing everything could split a
/// compressed document differently and lose the cache that holds it.
struct Conversation<'a> {
    l: &'a Loaded,
    template: &'a ChatTemplate,
    messages: Vec<ChatMessage>,
    /// Rendered text the session holds (empty when unknown).
    held: String,
    /// Documents loaded since the last question; they open the next user message.
    document: String,
}

impl Conversation<'_> {
    /// The rendered conversation (with the assistant header) and its tokens.
    fn prompt(&self, session: &Session) -> Result<(String, Vec<u32>)> {
        let rendered = self.template.render(&self.messages, true)?;
        let tokens = match rendered.strip_prefix(&self.held) {
            Some(new) if !self.held.is_empty() && !session.tokens().is_empty() => {
                let mut t = session.tokens().to_vec();
                t.extend(self.l.tokenizer.encode(new, false, true));
                t
            }
            _ => {
                warn_if_compressed(session);
                self.l.tokenizer.encode_chat(&rendered)
            }
        };
        Ok((rendered, tokens))
    }

    /// Read a document and compress it into the session: it opens the next user
    /// message, and nothing after it is seen before it is compressed.
    fn load(&mut self, session: &mut Session, path: &str) -> Result<()> {
        let doc = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
        let doc = doc.trim();
        // The text before the document: the conversation so far and the template's
        // opening of a user message.
        const MARK: &str = "\u{1}";
        let mut msgs = self.messages.clone();
        msgs.push(ChatMessage::user(format!("{}{MARK}", self.document)));
        let rendered = self.template.render(&msgs, false)?;
        let before = rendered.split_once(MARK).map_or("", |(b, _)| b);
        let tok = &self.l.tokenizer;
        let prefix = match before.strip_prefix(&self.held) {
            Some(new) if !self.held.is_empty() && !session.tokens().is_empty() => {
                tok.encode(new, false, true)
            }
            _ => {
                warn_if_compressed(session);
                session.clear();
                tok.encode_chat(before)
            }
        };
        let text = format!("{doc}\n\n");
        let context = tok.encode(&text, false, false);
        let needed = session.tokens().len() + prefix.len() + context.len();
        if needed >= session.n_ctx() {
            anyhow::bail!(
                "{path} needs {needed} tokens of context but the session holds {} (raise -c)",
                session.n_ctx()
            );
        }
        let mut bar = PrefillBar::new("document");
        let (_, report) =
            session.feed_context_with_progress(&prefix, &context, &mut |done, n| {
                bar.update(done, n)
            })?;
        bar.finish();
        let cfg = session.eviction();
        print_compression(&report, cfg);
        self.held = format!("{before}{text}");
        self.document.push_str(&text);
        Ok(())
    }
}

/// The template rendered earlier text differently from what the session holds, so
/// the conversation is read again; say so when that loses a compressed document.
fn warn_if_compressed(session: &Session) {
    if session.cache().full_bytes() > session.kv_bytes() {
        eprintln!(
            "note: the chat template changed earlier text; the conversation is read again, \
             and documents loaded before are no longer compressed"
        );
    }
}
