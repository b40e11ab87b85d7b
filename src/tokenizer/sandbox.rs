//! Rendering a model's chat template in a child process, with memory and time limits.
//!
//! A chat template is a program that came with the model file. minijinja's fuel
//! bounds how many instructions it runs and [`super::chat`] caps its output, but one
//! instruction can still build a value of any size or run for minutes: doubling a
//! string held in a namespace 40 times asks for terabytes, and `(["x"] * 10**9)|join`
//! runs for minutes. Neither can be stopped from inside the process (a failed
//! allocation aborts it; a thread cannot be killed). So the front ends render model
//! templates out of process: the `fastkv` binary itself, run as the hidden command
//! `fastkv render-template`, takes one [`RenderJob`] as JSON on stdin, limits its own
//! address space and CPU time (`setrlimit`), renders in process as usual and writes a
//! [`Reply`] on stdout. The parent kills it at a wall-clock deadline. Whatever the
//! template does, the caller gets the rendered text or a
//! [`TokenizerError::Template`] that says which limit stopped it (or a
//! [`TokenizerError::Sandbox`] if the child could not be run at all).
//!
//! A render costs one process start (a few milliseconds, measured in
//! docs/reliability.md), small beside a prompt's prefill.
use std::borrow::Cow;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::chat::{ChatMessage, ChatTemplate};
use super::TokenizerError;

/// The hidden command of the `fastkv` binary that renders one job.
pub const COMMAND: &str = "render-template";

/// Where and under which limits model templates are rendered.
#[derive(Debug, Clone)]
pub struct Sandbox {
    exe: PathBuf,
    limits: Limits,
}

/// The limits of one render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The child's address space (`RLIMIT_AS`), binary and libraries included.
    pub memory_mib: u64,
    /// The child's CPU time (`RLIMIT_CPU`).
    pub cpu_seconds: u64,
    /// Wall-clock time from start to reply, after which the child is killed.
    pub deadline: Duration,
}

impl Default for Limits {
    /// 1 GiB and 5 s of CPU (10 s of wall time): a real template renders a thousand
    /// turns in milliseconds and a few MiB, and the in-process fuel (20 million
    /// instructions) runs out in about a second.
    fn default() -> Self {
        Self {
            memory_mib: 1024,
            cpu_seconds: 5,
            deadline: Duration::from_secs(10),
        }
    }
}

/// One render, as the parent sends it.
#[derive(Debug, Serialize, Deserialize)]
pub struct RenderJob<'a> {
    pub source: Cow<'a, str>,
    pub bos_token: Cow<'a, str>,
    pub eos_token: Cow<'a, str>,
    pub messages: Cow<'a, [ChatMessage]>,
    #[serde(default)]
    pub tools: Option<Cow<'a, serde_json::Value>>,
    pub add_generation_prompt: bool,
}

/// The child's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Rendered(String),
    /// A template error (it did not compile, raised an exception, ran out of fuel...).
    Failed(String),
}

impl Sandbox {
    /// Renders with `exe`, which must be a `fastkv` binary (it runs `exe render-template`).
    pub fn new(exe: impl Into<PathBuf>, limits: Limits) -> Self {
        Self {
            exe: exe.into(),
            limits,
        }
    }

    /// Renders with the running binary, which must be `fastkv`. On Linux this is
    /// `/proc/self/exe`, which still works after the file was replaced (an upgrade
    /// under a running server).
    pub fn this_binary(limits: Limits) -> std::io::Result<Self> {
        let exe = if cfg!(target_os = "linux") {
            PathBuf::from("/proc/self/exe")
        } else {
            std::env::current_exe()?
        };
        Ok(Self::new(exe, limits))
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Render `job` in a child process.
    pub fn render(&self, job: &RenderJob<'_>) -> Result<String, TokenizerError> {
        let input = serde_json::to_vec(job)
            .map_err(|e| TokenizerError::Sandbox(format!("cannot encode the render job: {e}")))?;
        let mut child = Command::new(&self.exe)
            .arg(COMMAND)
            .arg("--memory-mib")
            .arg(self.limits.memory_mib.to_string())
            .arg("--cpu-seconds")
            .arg(self.limits.cpu_seconds.to_string())
            // A dying child's message is one line, not a symbolized backtrace.
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                TokenizerError::Sandbox(format!(
                    "cannot start the template renderer {}: {e}",
                    self.exe.display()
                ))
            })?;
        let (Some(mut stdin), Some(mut stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(TokenizerError::Sandbox(
                "the template renderer has no pipes".into(),
            ));
        };
        // The job is written and the reply read on threads of their own, so that the
        // deadline holds whatever the child does with its pipes. A child that is killed
        // ends both: writing fails (broken pipe) and reading sees the end.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut err = Vec::new();
            let read = stdout.read_to_end(&mut out).map(|_| ());
            // Only a dying child writes to stderr (a line or two).
            let _ = stderr.take(64 * 1024).read_to_end(&mut err);
            let _ = tx.send((read, out, err));
        });
        let answer = rx.recv_timeout(self.limits.deadline);
        if answer.is_err() {
            let _ = child.kill();
        }
        let status = child.wait().map_err(|e| {
            TokenizerError::Sandbox(format!("cannot wait for the template renderer: {e}"))
        })?;
        let _ = writer.join();
        let Ok((read, out, err)) = answer else {
            return Err(TokenizerError::Template(format!(
                "the template ran for more than {} s and was stopped",
                self.limits.deadline.as_secs_f64()
            )));
        };
        if !status.success() {
            return Err(self.died(status, &String::from_utf8_lossy(&err)));
        }
        read.map_err(|e| {
            TokenizerError::Sandbox(format!("cannot read the template renderer's reply: {e}"))
        })?;
        match serde_json::from_slice(&out) {
            Ok(Reply::Rendered(text)) => Ok(text),
            Ok(Reply::Failed(msg)) => Err(TokenizerError::Template(msg)),
            Err(e) => Err(TokenizerError::Sandbox(format!(
                "the template renderer's reply is not valid: {e}"
            ))),
        }
    }

    /// The error for a child that did not exit cleanly: which limit it passed, if any.
    fn died(&self, status: ExitStatus, stderr: &str) -> TokenizerError {
        let limits = self.limits;
        let signal = signal_of(status);
        let msg = if stderr.contains("memory allocation") || stderr.contains("capacity overflow") {
            format!(
                "the template needed more than {} MiB of memory and was stopped",
                limits.memory_mib
            )
        } else if signal == Some(SIGXCPU) {
            format!(
                "the template used more than {} s of CPU time and was stopped",
                limits.cpu_seconds
            )
        } else {
            let last = stderr.lines().last().unwrap_or("").trim();
            format!("the template renderer failed ({status}): {last}")
        };
        TokenizerError::Template(msg)
    }
}

#[cfg(unix)]
fn signal_of(status: ExitStatus) -> Option<i32> {
    std::os::unix::process::ExitStatusExt::signal(&status)
}
#[cfg(not(unix))]
fn signal_of(_: ExitStatus) -> Option<i32> {
    None
}
#[cfg(unix)]
const SIGXCPU: i32 = libc::SIGXCPU;
#[cfg(not(unix))]
const SIGXCPU: i32 = 24;

/// The child's side (`fastkv render-template`): limit this process, read one job from
/// stdin, render it in process and write the [`Reply`] to stdout.
pub fn child_main(memory_mib: u64, cpu_seconds: u64) -> std::io::Result<()> {
    limit_self(memory_mib, cpu_seconds)?;
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input)?;
    let job: RenderJob = serde_json::from_slice(&input)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    drop(input);
    let reply = match ChatTemplate::new(&job.source, &job.bos_token, &job.eos_token).and_then(|t| {
        t.render_with_tools(
            &job.messages,
            job.tools.as_deref(),
            job.add_generation_prompt,
        )
    }) {
        Ok(text) => Reply::Rendered(text),
        Err(TokenizerError::Template(msg)) => Reply::Failed(msg),
        Err(e) => Reply::Failed(e.to_string()),
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &reply)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    out.flush()
}

/// Address space, CPU time, and no core file when a limit ends the process.
#[cfg(unix)]
fn limit_self(memory_mib: u64, cpu_seconds: u64) -> std::io::Result<()> {
    let set = |resource, soft: u64, hard: u64| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct we pass.
        if unsafe { libc::getrlimit(resource, &mut lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Lower the limits, never raise them past what this process was given.
        lim.rlim_max = lim.rlim_max.min(hard as libc::rlim_t);
        lim.rlim_cur = lim.rlim_max.min(soft as libc::rlim_t);
        // SAFETY: setrlimit reads the struct we pass and changes only this process's
        // limits.
        if unsafe { libc::setrlimit(resource, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    let bytes = memory_mib.saturating_mul(1 << 20);
    set(libc::RLIMIT_CORE, 0, 0)?;
    set(libc::RLIMIT_AS, bytes, bytes)?;
    // SIGXCPU at the soft limit, SIGKILL a second later.
    set(libc::RLIMIT_CPU, cpu_seconds, cpu_seconds + 1)
}
#[cfg(not(unix))]
fn limit_self(_: u64, _: u64) -> std::io::Result<()> {
    Ok(())
}
