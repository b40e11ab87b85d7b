//! `fastkv chat`: an interactive conversation that keeps its KV cache between turns,
//! so each turn only runs the new tokens.
use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context, Result};
use clap::Args;

use super::{generate, print_piece, GenStats, ModelArgs, SamplingArgs};
use crate::sampling::Sampler;
use crate::session::Session;
use crate::tokenizer::{ChatMessage, ChatTemplate};

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
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
    let template = match ChatTemplate::from_gguf(l.model.file(), &l.tokenizer) {
        Some(t) => t,
        None => {
            eprintln!(
                "note: {} has no chat template; using a plain \"User:/Assistant:\" format",
                l.path.display()
            );
            ChatTemplate::plain()
        }
    };
    let mut session = Session::new(&l.model, a.model.n_ctx(&l.model));
    let mut sampler = Sampler::new(params);
    let mut messages: Vec<ChatMessage> = a.system.iter().map(ChatMessage::system).collect();
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "chat with {} ({} tokens of context). /exit to quit, /reset to start over.",
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
                messages.retain(|m| m.role == "system");
                session.clear();
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::user(text));
        let rendered = template.render(&messages, true)?;
        // Templates that write the BOS token themselves must not get a second one.
        let bos_text = l.tokenizer.bos().and_then(|b| l.tokenizer.token_text(b));
        let add_bos = !bos_text.is_some_and(|b| rendered.starts_with(b));
        let prompt = l.tokenizer.encode(&rendered, add_bos, true);
        if prompt.len() >= session.n_ctx() {
            eprintln!(
                "the conversation no longer fits in {} tokens; use /reset or a larger -c",
                session.n_ctx()
            );
            messages.pop();
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
        messages.push(ChatMessage::assistant(
            l.tokenizer.decode(&reply, false).trim(),
        ));
        if interactive {
            eprintln!(
                "[{} new prompt tokens, {:.1} t/s; {} tokens, {:.1} t/s]",
                stats.n_prompt, stats.prompt_tps, stats.n_gen, stats.gen_tps
            );
        }
    }
    Ok(())
}
