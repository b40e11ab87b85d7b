//! `fastkv chat`: an interactive conversation that keeps its KV cache between turns,
//! so each turn only runs the new tokens. `/load FILE` reads a document and
//! compresses it (per the --kv-* flags) before any question about it is asked.
use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context, Result};
use clap::Args;

use super::{
    generate, print_compression, print_piece, CtxArgs, GenStats, KvArgs, Loaded, ModelArgs,
    PrefillBar, SamplingArgs,
};
use crate::sampling::Sampler;
use crate::session::Session;
use crate::tokenizer::{ChatMessage, ChatTemplate};

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
    let template = l.template()?;
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
    if interactive {
        eprintln!(
            "chat with {} ({} tokens of context). /load FILE to read a document, \
             /reset to start over, /exit to quit.",
            l.path.display(),
            session.n_ctx()
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("cannot read standard input")?;
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
        let reply = generate(
            &mut session,
            &l.tokenizer,
            &mut sampler,
            &prompt,
            Some(a.n_predict),
            &mut stats,
            |piece| print_piece(&mut out, piece),
        )?;
        writeln!(out)?;
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
    Ok(())
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
