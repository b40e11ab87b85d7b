//! `fastkv serve`: the OpenAI-compatible server (see [`crate::server`]), with
//! llama-server's flag names.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::builder::BoolishValueParser;
use clap::Args;

use super::{CtxArgs, KvArgs, ModelArgs, TemplateArgs};
use crate::server::engine::Engine;
use crate::server::{self, Ready, ServerConfig};
use crate::session::Session;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub template: TemplateArgs,
    #[command(flatten)]
    pub ctx: CtxArgs,
    #[command(flatten)]
    pub kv: KvArgs,
    /// Address to listen on (loopback unless told otherwise).
    #[arg(long = "host", default_value = "127.0.0.1", env = "FASTKV_ARG_HOST")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long = "port", default_value_t = 8080, env = "FASTKV_ARG_PORT")]
    pub port: u16,
    /// Conversations served at once (also `-np`, as in llama-server); each slot
    /// keeps its own KV cache of up to -c tokens between requests.
    #[arg(long = "parallel", default_value_t = 1, env = "FASTKV_ARG_PARALLEL")]
    pub parallel: usize,
    /// Requests that may wait for a free slot; more are refused with 503.
    #[arg(long = "max-queue", default_value_t = 8, env = "FASTKV_ARG_MAX_QUEUE")]
    pub max_queue: usize,
    /// Most tokens per reply when a request sets no max_tokens (-1: until the end of
    /// generation or a full context).
    #[arg(
        long = "n-predict",
        default_value_t = 1024,
        allow_negative_numbers = true,
        env = "FASTKV_ARG_N_PREDICT"
    )]
    pub n_predict: i64,
    /// Require `Authorization: Bearer KEY` on every route but /health and /. On the
    /// command line the key shows in `ps`: prefer $FASTKV_API_KEY or --api-key-file.
    #[arg(long = "api-key", env = "FASTKV_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// On a loopback bind, also accept requests whose Host header names NAME
    /// (repeatable, or comma-separated); others are refused, which stops DNS-rebinding
    /// pages.
    #[arg(
        long = "allowed-host",
        value_name = "NAME",
        env = "FASTKV_ARG_ALLOWED_HOST",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,
    /// Seconds a client may take to send a request's headers, and its body (408
    /// after that); a connection idle this long between requests is closed.
    #[arg(
        long = "timeout",
        default_value_t = 60,
        value_name = "SECONDS",
        env = "FASTKV_ARG_TIMEOUT"
    )]
    pub timeout: u64,
    /// Connections open at once; more wait to be accepted.
    #[arg(
        long = "max-connections",
        default_value_t = 256,
        value_name = "N",
        env = "FASTKV_ARG_MAX_CONNECTIONS"
    )]
    pub max_connections: usize,
    /// Say in responses how many prompt tokens were reused from a slot's cache
    /// (usage.prompt_tokens_details.cached_tokens, timings.cache_n). Off by default:
    /// slots are shared, so the count would tell one client about another's prompts.
    #[arg(
        long = "report-cache-hits",
        env = "FASTKV_ARG_REPORT_CACHE_HITS",
        value_parser = BoolishValueParser::new()
    )]
    pub report_cache_hits: bool,
    /// Read the API key from the first line of FILE.
    #[arg(
        long = "api-key-file",
        value_name = "FILE",
        conflicts_with = "api_key",
        env = "FASTKV_ARG_API_KEY_FILE"
    )]
    pub api_key_file: Option<PathBuf>,
    /// The model's name in /v1/models and in responses [default: the file name
    /// without .gguf]. Requests may name any model: the one served answers.
    #[arg(long = "alias", value_name = "NAME", env = "FASTKV_ARG_ALIAS")]
    pub alias: Option<String>,
    /// Serve Prometheus metrics at /metrics. (Switches read from the environment take
    /// 1/0, true/false, yes/no or on/off.)
    #[arg(
        long = "metrics",
        env = "FASTKV_ARG_METRICS",
        value_parser = BoolishValueParser::new()
    )]
    pub metrics: bool,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    if a.parallel == 0 {
        bail!("-np/--parallel must be at least 1");
    }
    let n_predict = match a.n_predict {
        -1 => None,
        n if n >= 1 => Some(n as usize),
        n => bail!("--n-predict must be at least 1, or -1 for no limit; got {n}"),
    };
    // Fail on bad eviction flags before loading anything.
    let seed = 0;
    a.kv.config(seed)?;
    let api_key = api_key(&a)?;
    if a.timeout == 0 || a.max_connections == 0 {
        bail!("--timeout and --max-connections must be at least 1");
    }
    let listening = server::listen(ServerConfig {
        host: a.host.clone(),
        port: a.port,
        api_key: api_key.clone(),
        metrics: a.metrics,
        allowed_hosts: a.allowed_hosts.clone(),
        timeout: std::time::Duration::from_secs(a.timeout),
        max_connections: a.max_connections,
    })?;
    let loopback = listening.addr.ip().is_loopback();
    if !loopback && api_key.is_none() {
        eprintln!(
            "warning: listening on {} without --api-key: anyone who can reach it can use it",
            listening.addr
        );
    }
    eprintln!("fastkv serve: listening on http://{}", listening.addr);

    let l = a.model.load()?;
    let template = l.template(&a.template)?;
    let n_ctx = a.ctx.n_ctx(&l.model);
    let mut proto = Session::new(&l.model, n_ctx);
    a.kv.apply(&mut proto, &l, seed, Some(&template))?;
    let compress = proto.eviction().is_active();
    let (jobs, inbox) = std::sync::mpsc::channel();
    let tokenizer = l.tokenizer.clone();
    let model_id = a.alias.clone().unwrap_or_else(|| {
        l.path
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned())
    });
    listening.set_ready(Ready {
        tokenizer: tokenizer.clone(),
        template: Arc::new(template),
        model_id: model_id.clone(),
        n_ctx,
        n_slots: a.parallel,
        max_queue: a.max_queue,
        compress,
        jobs,
    });
    eprintln!(
        "fastkv serve: {model_id} ready, {} slot(s) of {n_ctx} tokens, KV policy {}",
        a.parallel,
        proto.eviction().policy
    );
    let new_session = Box::new(move || proto.clone());
    let mut engine = Engine::new(
        &tokenizer,
        a.parallel,
        new_session,
        n_predict,
        listening.counters(),
    );
    engine.report_cache_hits(a.report_cache_hits);
    engine.run(inbox);
    Ok(())
}

/// The API key: `--api-key` (or $FASTKV_API_KEY), or the first line of
/// `--api-key-file`. An empty key is refused rather than taken as "no key".
fn api_key(a: &ServeArgs) -> Result<Option<String>> {
    let key = match (&a.api_key, &a.api_key_file) {
        (Some(k), _) => k.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the API key file {}", f.display()))?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        (None, None) => return Ok(None),
    };
    if key.is_empty() {
        bail!("the API key is empty (--api-key, $FASTKV_API_KEY or --api-key-file)");
    }
    Ok(Some(key))
}
