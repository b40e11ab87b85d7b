//! A small safe wrapper around llama.cpp's C API, used as the reference fastkv is
//! measured against (tests: tokens and logits must agree; bench: side-by-side speed).
//! llama.cpp is built by `llama-cpp-sys-2` from the same ggml source as our kernels.
use std::ffi::CString;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Once;

use crate::llama as ll;

static INIT: Once = Once::new();

unsafe extern "C" fn quiet_log(
    _level: ll::ggml_log_level,
    _text: *const std::os::raw::c_char,
    _user_data: *mut std::ffi::c_void,
) {
}

fn init() {
    INIT.call_once(|| {
        // SAFETY: plain global initialisation calls, done once, before any other use.
        unsafe {
            // llama.cpp logs every load to stderr; keep it quiet unless asked.
            if std::env::var_os("FASTKV_LLAMA_LOG").is_none() {
                ll::llama_log_set(Some(quiet_log), std::ptr::null_mut());
            }
            ll::llama_backend_init();
        }
    });
}

/// A llama.cpp model (weights, or only the vocabulary).
pub struct RefModel {
    model: NonNull<ll::llama_model>,
}

// SAFETY: llama.cpp models are immutable after loading and documented as shareable
// between contexts on different threads.
unsafe impl Send for RefModel {}
unsafe impl Sync for RefModel {}

impl RefModel {
    /// Load a GGUF model on the CPU (no GPU layers). `vocab_only` skips the weights.
    pub fn load(path: &Path, vocab_only: bool) -> Result<Self, String> {
        init();
        let cpath = CString::new(path.to_string_lossy().as_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: default params are plain data; the path is a valid C string that
        // outlives the call.
        let model = unsafe {
            let mut p = ll::llama_model_default_params();
            p.n_gpu_layers = 0;
            p.vocab_only = vocab_only;
            ll::llama_model_load_from_file(cpath.as_ptr(), p)
        };
        NonNull::new(model)
            .map(|model| Self { model })
            .ok_or_else(|| format!("llama.cpp could not load {}", path.display()))
    }

    fn vocab(&self) -> *const ll::llama_vocab {
        // SAFETY: the model pointer is valid for the life of self.
        unsafe { ll::llama_model_get_vocab(self.model.as_ptr()) }
    }

    pub fn n_vocab(&self) -> usize {
        // SAFETY: valid vocab pointer.
        unsafe { ll::llama_vocab_n_tokens(self.vocab()) as usize }
    }

    /// Tokenize like `llama_tokenize` (no backslash unescaping: text is literal).
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<i32> {
        let mut out = vec![0i32; text.len() + 8];
        loop {
            // SAFETY: `text` is valid for text.len() bytes and `out` for out.len() tokens.
            let n = unsafe {
                ll::llama_tokenize(
                    self.vocab(),
                    text.as_ptr().cast(),
                    text.len() as i32,
                    out.as_mut_ptr(),
                    out.len() as i32,
                    add_special,
                    parse_special,
                )
            };
            if n >= 0 {
                out.truncate(n as usize);
                return out;
            }
            out.resize((-n) as usize, 0);
        }
    }

    /// The bytes of one token's text (`special` renders control tokens).
    pub fn token_to_piece(&self, token: i32, special: bool) -> Vec<u8> {
        let mut buf = vec![0u8; 64];
        loop {
            // SAFETY: buf is valid for buf.len() bytes.
            let n = unsafe {
                ll::llama_token_to_piece(
                    self.vocab(),
                    token,
                    buf.as_mut_ptr().cast(),
                    buf.len() as i32,
                    0,
                    special,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
    }

    pub fn is_eog(&self, token: i32) -> bool {
        // SAFETY: valid vocab pointer.
        unsafe { ll::llama_vocab_is_eog(self.vocab(), token) }
    }
}

impl Drop for RefModel {
    fn drop(&mut self) {
        // SAFETY: we own the model and free it once; contexts borrow it (lifetime 'm).
        unsafe { ll::llama_model_free(self.model.as_ptr()) }
    }
}

/// Options for a reference context.
#[derive(Debug, Clone, Copy)]
pub struct RefContextParams {
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_threads: i32,
    /// Use flash attention (llama.cpp's CPU default is "auto", which enables it).
    pub flash_attn: bool,
}

impl Default for RefContextParams {
    fn default() -> Self {
        Self {
            n_ctx: 2048,
            n_batch: 512,
            n_threads: 2,
            flash_attn: true,
        }
    }
}

/// A llama.cpp inference context over a [`RefModel`].
pub struct RefContext<'m> {
    ctx: NonNull<ll::llama_context>,
    model: &'m RefModel,
    n_batch: usize,
    n_past: usize,
}

impl<'m> RefContext<'m> {
    pub fn new(model: &'m RefModel, params: RefContextParams) -> Result<Self, String> {
        // SAFETY: default params are plain data; the model outlives the context.
        let ctx = unsafe {
            let mut p = ll::llama_context_default_params();
            p.n_ctx = params.n_ctx;
            p.n_batch = params.n_batch;
            p.n_ubatch = params.n_batch;
            p.n_threads = params.n_threads;
            p.n_threads_batch = params.n_threads;
            p.no_perf = true;
            p.flash_attn_type = if params.flash_attn {
                ll::LLAMA_FLASH_ATTN_TYPE_ENABLED
            } else {
                ll::LLAMA_FLASH_ATTN_TYPE_DISABLED
            };
            ll::llama_init_from_model(model.model.as_ptr(), p)
        };
        let ctx = NonNull::new(ctx).ok_or("llama.cpp could not create a context")?;
        Ok(Self {
            ctx,
            model,
            n_batch: params.n_batch as usize,
            n_past: 0,
        })
    }

    pub fn model(&self) -> &'m RefModel {
        self.model
    }

    /// Forget all cached tokens.
    pub fn clear(&mut self) {
        // SAFETY: valid context; clearing memory is always allowed.
        unsafe { ll::llama_memory_clear(ll::llama_get_memory(self.ctx.as_ptr()), true) };
        self.n_past = 0;
    }

    /// Evaluate `tokens` after what is cached. With `all_logits`, returns the logits of
    /// every token (n_tokens x n_vocab, row-major); otherwise only of the last one.
    pub fn eval(&mut self, tokens: &[i32], all_logits: bool) -> Result<Vec<f32>, String> {
        let n_vocab = self.model.n_vocab();
        let mut out = Vec::new();
        for (ci, chunk) in tokens.chunks(self.n_batch.max(1)).enumerate() {
            let last_chunk = (ci + 1) * self.n_batch >= tokens.len();
            // SAFETY: the batch is allocated for chunk.len() tokens with one seq id each,
            // every field we read back is written here, and it is freed below.
            unsafe {
                let mut batch = ll::llama_batch_init(chunk.len() as i32, 0, 1);
                for (i, &t) in chunk.iter().enumerate() {
                    *batch.token.add(i) = t;
                    *batch.pos.add(i) = (self.n_past + i) as i32;
                    *batch.n_seq_id.add(i) = 1;
                    **batch.seq_id.add(i) = 0;
                    *batch.logits.add(i) =
                        (all_logits || (last_chunk && i + 1 == chunk.len())) as i8;
                }
                batch.n_tokens = chunk.len() as i32;
                let rc = ll::llama_decode(self.ctx.as_ptr(), batch);
                if rc != 0 {
                    ll::llama_batch_free(batch);
                    return Err(format!("llama_decode failed with code {rc}"));
                }
                for i in 0..chunk.len() {
                    if *batch.logits.add(i) != 0 {
                        let p = ll::llama_get_logits_ith(self.ctx.as_ptr(), i as i32);
                        if p.is_null() {
                            ll::llama_batch_free(batch);
                            return Err("llama.cpp returned no logits".into());
                        }
                        out.extend_from_slice(std::slice::from_raw_parts(p, n_vocab));
                    }
                }
                ll::llama_batch_free(batch);
            }
            self.n_past += chunk.len();
        }
        Ok(out)
    }

    /// Greedy generation of up to `n` tokens after `prompt` (stops at end of generation).
    pub fn generate_greedy(&mut self, prompt: &[i32], n: usize) -> Result<Vec<i32>, String> {
        let mut logits = self.eval(prompt, false)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let next = argmax(&logits) as i32;
            if self.model.is_eog(next) {
                break;
            }
            out.push(next);
            logits = self.eval(&[next], false)?;
        }
        Ok(out)
    }
}

impl Drop for RefContext<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the context and free it once.
        unsafe { ll::llama_free(self.ctx.as_ptr()) }
    }
}

/// Index of the largest value (first on ties), as llama.cpp's greedy sampler picks.
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}
