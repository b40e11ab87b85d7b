//! Text to token ids and back, reproducing llama.cpp's tokenizer id for id.
//!
//! The vocabulary comes from GGUF metadata (`tokenizer.ggml.*`). Two families are
//! supported, the ones small llama.cpp-style models use:
//! - `gpt2`: byte-level BPE with merge rules and a regex pre-tokenizer chosen by
//!   `tokenizer.ggml.pre` (SmolLM, Qwen 2, Llama 3...), see `bpe.rs`;
//! - `llama`: SentencePiece-style merges driven by token scores, with `<0xXX>` byte
//!   fallback (Llama 2, Gemma...), see `spm.rs`.
//!
//! Encoding first cuts special tokens out of the text (the job of llama.cpp's
//! `tokenizer_st_partition`, done in one pass: [`SpecialMatcher`]), tokenizes the
//! text between them, and adds BOS/EOS as the metadata asks. Token attributes (control, user-defined, byte...) and the set of
//! end-of-generation tokens follow llama.cpp's loader, including its name-based
//! detection of tokens such as `<|im_end|>` and `<end_of_turn>`, because generation
//! must stop exactly where llama.cpp's would.
//!
//! Known differences from llama.cpp (none affects the supported models' ids):
//! - when several tokens match one of llama.cpp's name lists for EOT/EOM/FIM ids and
//!   the metadata gives none, llama.cpp takes the first in hash-map order; we take the
//!   lowest id (the same choice for SmolLM2). The EOG set, which is what generation
//!   uses, is the same either way;
//! - per-model attribute tweaks keyed on `general.name` (Phi-3's rstrip, BERT masks)
//!   are not applied;
//! - a byte with no byte token in an SPM vocabulary becomes the unknown token (llama.cpp
//!   throws);
//! - special tokens are matched leftmost-longest, where llama.cpp cuts them out one
//!   after another, longest first: the two differ only where two different special
//!   tokens partially overlap in a text.
use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

use crate::gguf::{GgufError, GgufFile};

mod bpe;
pub mod chat;
pub mod sandbox;
mod spm;
mod template_fns;

pub use chat::{ChatMessage, ChatTemplate};

/// What can go wrong building a tokenizer or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer metadata: {0}")]
    Gguf(#[from] GgufError),
    #[error("unsupported tokenizer model '{0}' (tokenizer.ggml.model); fastkv supports 'gpt2' (byte-level BPE) and 'llama' (SentencePiece)")]
    UnsupportedModel(String),
    #[error("unsupported pre-tokenizer '{0}' (tokenizer.ggml.pre); fastkv supports {supported}", supported = bpe::SUPPORTED_PRE)]
    UnsupportedPreTokenizer(String),
    #[error("the model has no vocabulary: metadata key 'tokenizer.ggml.tokens' is missing")]
    MissingVocab,
    #[error("the vocabulary (tokenizer.ggml.tokens) is empty")]
    EmptyVocab,
    #[error(
        "byte-level BPE model without merge rules: metadata key 'tokenizer.ggml.merges' is missing"
    )]
    MissingMerges,
    #[error("bad tokenizer metadata '{key}': {detail}")]
    BadMetadata { key: String, detail: String },
    #[error("cannot build the BPE model: {0}")]
    Bpe(String),
    #[error("chat template: {0}")]
    Template(String),
    /// The child process that renders templates could not be run (not the template's
    /// fault: see `sandbox`).
    #[error("chat template sandbox: {0}")]
    Sandbox(String),
}

/// Token attributes, as llama.cpp's `llama_token_attr` bits.
mod attr {
    pub const UNKNOWN: u16 = 1 << 0;
    pub const UNUSED: u16 = 1 << 1;
    pub const NORMAL: u16 = 1 << 2;
    pub const CONTROL: u16 = 1 << 3;
    pub const USER_DEFINED: u16 = 1 << 4;
    pub const BYTE: u16 = 1 << 5;

    /// From a GGUF `tokenizer.ggml.token_type` value (llama.cpp's `llama_token_type`).
    pub fn from_token_type(t: i64) -> u16 {
        match t {
            1 => NORMAL,
            2 => UNKNOWN,
            3 => CONTROL,
            4 => USER_DEFINED,
            5 => UNUSED,
            6 => BYTE,
            _ => 0, // undefined: never rendered, never matched as special
        }
    }
}

/// One vocabulary entry.
#[derive(Debug, Clone)]
struct TokenData {
    text: String,
    score: f32,
    attr: u16,
}

/// The vocabulary and its reverse index, shared by both tokenizer families.
#[derive(Debug)]
pub(crate) struct Vocab {
    tokens: Vec<TokenData>,
    /// Token ids sorted by text (equal texts: the last id first), for lookups by
    /// binary search: a second copy of every text in a hash map would cost
    /// megabytes of resident memory (tens for a 262k vocabulary).
    by_text: Vec<u32>,
    /// SPM byte fallback: the token for each byte (`<0xXX>`, else the byte itself).
    byte_tokens: [Option<u32>; 256],
}

impl Vocab {
    /// The id of the token with this text (the last one, if several have it, as
    /// in llama.cpp).
    pub(crate) fn lookup(&self, text: &str) -> Option<u32> {
        let i = self
            .by_text
            .partition_point(|&id| self.tokens[id as usize].text.as_str() < text);
        let id = *self.by_text.get(i)?;
        (self.tokens[id as usize].text == text).then_some(id)
    }
    pub(crate) fn score(&self, id: u32) -> f32 {
        self.tokens[id as usize].score
    }
    pub(crate) fn byte_token(&self, b: u8) -> Option<u32> {
        self.byte_tokens[b as usize]
    }
    fn attr(&self, id: u32) -> u16 {
        self.tokens.get(id as usize).map_or(0, |t| t.attr)
    }
}

enum Model {
    Bpe(Box<bpe::ByteLevelBpe>),
    Spm,
}

/// A piece of input text: raw text to tokenize, or an already recognised token.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fragment {
    Text { start: usize, end: usize },
    Token(u32),
}

/// Finds special tokens in a text in one pass, however many the vocabulary has
/// (Gemma 3: 6,414), with an Aho-Corasick automaton (`aho-corasick`, the matcher
/// behind the `regex` crate and Hugging Face's added tokens). At each position the
/// longest token wins, leftmost first, as Hugging Face matches added tokens.
/// llama.cpp instead cuts each special token out in turn, longest first; the two
/// agree except where two different special tokens partially overlap in the text
/// (tests/tokenizer.rs checks llama.cpp's ids on random strings of special pieces).
#[derive(Debug, Clone)]
struct SpecialMatcher {
    /// None when no token has the attributes asked for.
    automaton: Option<aho_corasick::AhoCorasick>,
    /// Token id of each pattern.
    ids: Vec<u32>,
}

impl SpecialMatcher {
    /// The tokens of `vocab` with any of the attributes `with` and none of `without`
    /// (texts that are empty are left out: they would match everywhere).
    fn new(vocab: &Vocab, with: u16, without: u16) -> Result<Self, TokenizerError> {
        let ids: Vec<u32> = (0..vocab.tokens.len() as u32)
            .filter(|&id| {
                let a = vocab.attr(id);
                a & with != 0 && a & without == 0 && !vocab.tokens[id as usize].text.is_empty()
            })
            .collect();
        if ids.is_empty() {
            return Ok(Self {
                automaton: None,
                ids,
            });
        }
        let automaton = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(
                ids.iter()
                    .map(|&id| vocab.tokens[id as usize].text.as_str()),
            )
            .map_err(|e| TokenizerError::BadMetadata {
                key: "tokenizer.ggml.tokens".into(),
                detail: format!("the special tokens cannot be matched: {e}"),
            })?;
        Ok(Self {
            automaton: Some(automaton),
            ids,
        })
    }

    /// (start, end, token id) of each special token in `text`, left to right.
    fn find_iter<'a>(&'a self, text: &'a str) -> impl Iterator<Item = (usize, usize, u32)> + 'a {
        self.automaton
            .iter()
            .flat_map(move |ac| ac.find_iter(text))
            .map(|m| (m.start(), m.end(), self.ids[m.pattern().as_usize()]))
    }
}

/// A tokenizer built from GGUF metadata; see the module docs.
pub struct Tokenizer {
    model: Model,
    kind: String,
    vocab: Vocab,
    /// Finds the tokens cut out of the text before tokenizing: control, user-defined
    /// and unknown tokens (with `parse_special`), or user-defined ones only (without).
    specials: SpecialMatcher,
    user_specials: SpecialMatcher,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    /// SPM: prefix text that starts the input or follows a special token with a space.
    /// Decoding drops the first token's leading space to undo it.
    add_space_prefix: bool,
    clean_spaces: bool,
    eog: BTreeSet<u32>,
    /// Byte-level BPE only: character -> byte, to decode token texts.
    char_to_byte: HashMap<char, u8>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("n_vocab", &self.n_vocab())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

/// Token texts llama.cpp treats as end-of-turn, end-of-message and fill-in-the-middle
/// markers when the metadata does not name them (llama-vocab.cpp, `load`).
const EOT_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_NAMES: &[&str] = &["<|eom_id|>"];
const FIM_PRE_NAMES: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_NAMES: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_NAMES: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_NAMES: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_NAMES: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_NAMES: &[&str] = &["<|file_sep|>"];
/// Token texts llama.cpp always counts as end of generation.
const EOG_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Special token ids, from metadata or found by name.
#[derive(Debug, Default)]
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    fim_pre: Option<u32>,
    fim_suf: Option<u32>,
    fim_mid: Option<u32>,
    fim_pad: Option<u32>,
    fim_rep: Option<u32>,
    fim_sep: Option<u32>,
}

impl SpecialIds {
    /// Ids from `tokenizer.ggml.*_token_id`, else llama.cpp's per-family defaults. An
    /// id out of range falls back to the default (as llama.cpp does), if that is valid.
    fn from_metadata(gguf: &GgufFile, n_vocab: usize, is_spm: bool) -> Self {
        let id_or = |key: &str, default: Option<u32>| {
            let default = default.filter(|&d| (d as usize) < n_vocab);
            match gguf.get_u64(&format!("tokenizer.ggml.{key}")) {
                Some(v) if (v as usize) < n_vocab => Some(v as u32),
                _ => default,
            }
        };
        let id = |key: &str| id_or(key, None);
        let (bos, eos, unk) = if is_spm {
            (Some(1), Some(2), Some(0))
        } else {
            (Some(11), Some(11), None)
        };
        Self {
            bos: id_or("bos_token_id", bos),
            eos: id_or("eos_token_id", eos),
            unk: id_or("unknown_token_id", unk),
            eot: id("eot_token_id"),
            eom: id("eom_token_id"),
            // The second names are deprecated spellings llama.cpp still reads.
            fim_pre: id("fim_pre_token_id").or_else(|| id("prefix_token_id")),
            fim_suf: id("fim_suf_token_id").or_else(|| id("suffix_token_id")),
            fim_mid: id("fim_mid_token_id").or_else(|| id("middle_token_id")),
            fim_pad: id("fim_pad_token_id"),
            fim_rep: id("fim_rep_token_id"),
            fim_sep: id("fim_sep_token_id"),
        }
    }
}

/// Read the token texts, scores and types.
fn read_vocab(gguf: &GgufFile) -> Result<Vocab, TokenizerError> {
    let texts = match gguf.require_str_array("tokenizer.ggml.tokens") {
        Ok(t) => t,
        Err(GgufError::MissingKey { .. }) => return Err(TokenizerError::MissingVocab),
        Err(e) => return Err(e.into()),
    };
    let n = texts.len();
    if n == 0 {
        return Err(TokenizerError::EmptyVocab);
    }
    if n > i32::MAX as usize {
        return Err(bad("tokenizer.ggml.tokens", "more than 2^31 tokens"));
    }
    let scores = gguf.get_f32_array("tokenizer.ggml.scores")?;
    let types = gguf.get_i64_array("tokenizer.ggml.token_type")?;
    check_len("tokenizer.ggml.scores", scores.as_deref(), n)?;
    check_len("tokenizer.ggml.token_type", types.as_deref(), n)?;

    let mut tokens = Vec::with_capacity(n);
    for (i, text) in texts.iter().enumerate() {
        // llama.cpp renames empty tokens so that every text is a distinct key.
        let text = if text.is_empty() {
            format!("[EMPTY_{i}]")
        } else {
            text.to_string()
        };
        tokens.push(TokenData {
            text,
            score: scores.as_ref().map_or(0.0, |s| s[i]),
            attr: types
                .as_ref()
                .map_or(attr::NORMAL, |t| attr::from_token_type(t[i])),
        });
    }
    // A duplicated text maps to its last id, as in llama.cpp.
    let mut by_text: Vec<u32> = (0..n as u32).collect();
    by_text.sort_unstable_by(|&a, &b| {
        tokens[a as usize]
            .text
            .cmp(&tokens[b as usize].text)
            .then(b.cmp(&a))
    });
    Ok(Vocab {
        tokens,
        by_text,
        byte_tokens: [None; 256],
    })
}

/// llama.cpp's name-based rules, applied after loading: find the marker tokens the
/// metadata did not name, fix up token attributes, and return the end-of-generation
/// set. Generation must stop exactly where llama.cpp's would, so these mirror
/// llama-vocab.cpp (`load`) step by step.
fn apply_name_rules(vocab: &mut Vocab, ids: &mut SpecialIds) -> BTreeSet<u32> {
    // llama.cpp takes the first match in hash-map order, which is unspecified; the
    // lowest id is what it picks for SmolLM2 (`<|endoftext|>` over `<|im_end|>`).
    let first_named = |vocab: &Vocab, names: &[&str]| {
        (0..vocab.tokens.len() as u32)
            .find(|&id| names.contains(&vocab.tokens[id as usize].text.as_str()))
    };
    // Marker tokens found by name become control tokens even if the file says otherwise.
    for (slot, names) in [
        (&mut ids.eot, EOT_NAMES),
        (&mut ids.eom, EOM_NAMES),
        (&mut ids.fim_pre, FIM_PRE_NAMES),
        (&mut ids.fim_suf, FIM_SUF_NAMES),
        (&mut ids.fim_mid, FIM_MID_NAMES),
        (&mut ids.fim_pad, FIM_PAD_NAMES),
        (&mut ids.fim_rep, FIM_REP_NAMES),
        (&mut ids.fim_sep, FIM_SEP_NAMES),
    ] {
        if slot.is_none() {
            *slot = first_named(vocab, names);
            if let Some(id) = *slot {
                vocab.tokens[id as usize].attr |= attr::CONTROL;
            }
        }
    }
    // Control tokens named "unused..." are unused.
    for t in vocab.tokens.iter_mut() {
        if t.attr & attr::CONTROL != 0 && t.text.contains("unused") {
            t.attr |= attr::UNUSED;
        }
    }

    // End of generation: FIM pad/repo/separator, every token with an EOG name (made
    // control), then EOS, EOT and EOM.
    let mut eog: BTreeSet<u32> = [ids.fim_pad, ids.fim_rep, ids.fim_sep]
        .into_iter()
        .flatten()
        .collect();
    for (id, t) in vocab.tokens.iter_mut().enumerate() {
        if EOG_NAMES.contains(&t.text.as_str()) {
            eog.insert(id as u32);
            t.attr |= attr::CONTROL;
        }
        // gpt-oss: these markers are always rendered.
        if ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"].contains(&t.text.as_str()) {
            t.attr = attr::USER_DEFINED;
        }
    }
    eog.extend([ids.eos, ids.eot, ids.eom].into_iter().flatten());

    let eog_named = |eog: &BTreeSet<u32>, vocab: &Vocab, text: &str| {
        eog.iter()
            .copied()
            .find(|&id| vocab.tokens[id as usize].text == text)
    };
    let has = |text| eog_named(&eog, vocab, text).is_some();
    let has_call = has("<|call|>") || has("<|calls|>");
    // gpt-oss / solar-open: there "<|end|>" ends a message, not the generation.
    let end_is_not_eog = has_call && (has("<|return|>") || has("<|flush|>"));
    // Gemma 4 / PLaMo 2: there "</s>" is a normal token.
    let s_is_normal = has("<|tool_response>") || has("<|plamo:eos|>");
    if end_is_not_eog {
        if let Some(end) = eog_named(&eog, vocab, "<|end|>") {
            eog.remove(&end);
            vocab.tokens[end as usize].attr = attr::USER_DEFINED;
        }
    }
    if s_is_normal {
        if let Some(s) = eog_named(&eog, vocab, "</s>") {
            eog.remove(&s);
            vocab.tokens[s as usize].attr = attr::NORMAL;
        }
    }
    eog
}

impl Tokenizer {
    /// Build the tokenizer described by a GGUF file's metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, TokenizerError> {
        let model_name = gguf.require_str("tokenizer.ggml.model")?;
        let pre_name = gguf.get_str("tokenizer.ggml.pre").unwrap_or("");
        let pre_spec = match model_name {
            "llama" => None,
            "gpt2" => Some(
                bpe::pre_tokenizer_spec(pre_name)
                    .ok_or_else(|| TokenizerError::UnsupportedPreTokenizer(pre_name.into()))?,
            ),
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        let is_spm = pre_spec.is_none();

        let mut vocab = read_vocab(gguf)?;
        let mut ids = SpecialIds::from_metadata(gguf, vocab.tokens.len(), is_spm);
        let eog = apply_name_rules(&mut vocab, &mut ids);

        // Tokens cut out of the text before tokenizing.
        let specials = SpecialMatcher::new(
            &vocab,
            attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN,
            0,
        )?;
        // Without parse_special, as llama.cpp: a control or unknown token stays text
        // even if it is also user-defined.
        let user_specials =
            SpecialMatcher::new(&vocab, attr::USER_DEFINED, attr::CONTROL | attr::UNKNOWN)?;

        let (model, kind, clean_spaces, char_to_byte) = match pre_spec {
            None => {
                for b in 0..=255u8 {
                    // `<0xXX>`, else the byte itself as a token (ASCII only, since token
                    // texts are UTF-8), else unknown (llama.cpp would throw).
                    vocab.byte_tokens[b as usize] = vocab
                        .lookup(&format!("<0x{b:02X}>"))
                        .or_else(|| {
                            (b < 0x80)
                                .then(|| vocab.lookup(&(b as char).to_string()))
                                .flatten()
                        })
                        .or(ids.unk);
                }
                (
                    Model::Spm,
                    "llama (SentencePiece)".to_string(),
                    false,
                    HashMap::new(),
                )
            }
            Some(spec) => {
                let merges = match gguf.require_str_array("tokenizer.ggml.merges") {
                    Ok(m) => m,
                    Err(GgufError::MissingKey { .. }) => return Err(TokenizerError::MissingMerges),
                    Err(e) => return Err(e.into()),
                };
                let texts: Vec<String> = vocab.tokens.iter().map(|t| t.text.clone()).collect();
                let model = bpe::ByteLevelBpe::new(&texts, &merges, &spec)?;
                let char_to_byte = bpe::byte_to_char_table()
                    .iter()
                    .enumerate()
                    .map(|(b, &c)| (c, b as u8))
                    .collect();
                let pre = if pre_name.is_empty() {
                    "default"
                } else {
                    pre_name
                };
                (
                    Model::Bpe(Box::new(model)),
                    format!("gpt2 (byte-level BPE, pre={pre})"),
                    spec.clean_spaces,
                    char_to_byte,
                )
            }
        };

        Ok(Self {
            model,
            kind,
            vocab,
            specials,
            user_specials,
            bos: ids.bos,
            eos: ids.eos,
            eot: ids.eot,
            eom: ids.eom,
            add_bos: gguf
                .get_bool("tokenizer.ggml.add_bos_token")
                .unwrap_or(is_spm || pre_spec.is_some_and(|s| s.add_bos)),
            add_eos: gguf
                .get_bool("tokenizer.ggml.add_eos_token")
                .unwrap_or(false),
            add_space_prefix: gguf
                .get_bool("tokenizer.ggml.add_space_prefix")
                .unwrap_or(is_spm),
            clean_spaces,
            eog,
            char_to_byte,
        })
    }

    /// Token ids of text rendered with a chat template: control tokens are parsed, and
    /// BOS is added where the model wants it unless the template wrote it already
    /// (a second one would change the model's input).
    pub fn encode_chat(&self, rendered: &str) -> Vec<u32> {
        self.encode_chat_content(rendered, &[])
    }

    /// Token ids of `text`, as `llama_tokenize`. `add_special` adds BOS/EOS where the
    /// model wants them; `parse_special` recognises control tokens written in the text
    /// (user-defined tokens are always recognised, as in llama.cpp).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        self.encode_fragments(text, self.partition(text, parse_special), add_special)
    }

    /// [`Tokenizer::encode_chat`] of a template's output in which the byte ranges
    /// `content` (sorted, disjoint, on character boundaries) are message content:
    /// there, control tokens stay text, as with `parse_special = false`, so that a
    /// message cannot write the template's markup (`<|im_end|><|im_start|>system`).
    /// Without `content` ranges this is `encode_chat`.
    pub fn encode_chat_content(&self, rendered: &str, content: &[Range<usize>]) -> Vec<u32> {
        let mut fragments = Vec::new();
        let mut pos = 0;
        let mut cut = |start: usize, end: usize, parse_special: bool| {
            for f in self.partition(&rendered[start..end], parse_special) {
                let f = match f {
                    Fragment::Text { start: a, end: b } => Fragment::Text {
                        start: start + a,
                        end: start + b,
                    },
                    token => token,
                };
                // Text on both sides of a boundary is one fragment, as in one pass.
                match (fragments.last_mut(), &f) {
                    (Some(Fragment::Text { end, .. }), Fragment::Text { start: a, end: b })
                        if *end == *a =>
                    {
                        *end = *b
                    }
                    _ => fragments.push(f),
                }
            }
        };
        for r in content {
            cut(pos, r.start, true);
            cut(r.start, r.end, false);
            pos = r.end;
        }
        cut(pos, rendered.len(), true);
        let bos_text = self.bos.and_then(|b| self.token_text(b));
        let writes_bos = bos_text.is_some_and(|b| rendered.starts_with(b));
        self.encode_fragments(rendered, fragments, !writes_bos)
    }

    /// Whether `text` spells out a control (or unknown) token, which
    /// [`Tokenizer::encode_chat`] would turn into that token.
    pub fn has_control_text(&self, text: &str) -> bool {
        self.specials
            .find_iter(text)
            .any(|(_, _, id)| self.vocab.attr(id) & (attr::CONTROL | attr::UNKNOWN) != 0)
    }

    fn encode_fragments(
        &self,
        text: &str,
        fragments: Vec<Fragment>,
        add_special: bool,
    ) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let mut prev_special = true; // the start of the input counts as a boundary
        for fragment in fragments {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text { start, end } => {
                    let piece = &text[start..end];
                    match &self.model {
                        Model::Bpe(bpe) => bpe.encode(piece, &mut out),
                        Model::Spm => {
                            let mut escaped = String::with_capacity(piece.len() + 4);
                            if self.add_space_prefix && prev_special {
                                escaped.push('▁');
                            }
                            escaped.extend(piece.chars().map(|c| if c == ' ' { '▁' } else { c }));
                            spm::tokenize(&escaped, &self.vocab, &mut out);
                        }
                    }
                    prev_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// Cut special tokens out of `text` (see [`SpecialMatcher`]). Without
    /// `parse_special`, control and unknown tokens stay text.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let matcher = if parse_special {
            &self.specials
        } else {
            &self.user_specials
        };
        let mut fragments = Vec::new();
        let mut pos = 0;
        for (start, end, id) in matcher.find_iter(text) {
            if start > pos {
                fragments.push(Fragment::Text {
                    start: pos,
                    end: start,
                });
            }
            fragments.push(Fragment::Token(id));
            pos = end;
        }
        if pos < text.len() {
            fragments.push(Fragment::Text {
                start: pos,
                end: text.len(),
            });
        }
        fragments
    }

    /// The raw bytes of one token, as `llama_token_to_piece` (no space stripping).
    /// Control and unknown tokens are empty unless `special`; a byte token is one byte.
    pub fn token_to_piece(&self, id: u32, special: bool) -> Vec<u8> {
        let Some(t) = self.vocab.tokens.get(id as usize) else {
            return Vec::new();
        };
        let special_attr = attr::UNKNOWN | attr::CONTROL;
        if t.attr & special_attr != 0 && !special {
            return Vec::new();
        }
        if t.attr & (special_attr | attr::USER_DEFINED) != 0 {
            return t.text.as_bytes().to_vec();
        }
        if t.attr & attr::NORMAL != 0 {
            return match self.model {
                Model::Spm => t.text.replace('▁', " ").into_bytes(),
                Model::Bpe(_) => self.byte_level_decode(&t.text),
            };
        }
        if t.attr & attr::BYTE != 0 {
            return vec![parse_byte_token(&t.text)];
        }
        Vec::new() // unused / undefined tokens render as nothing
    }

    /// Byte-level characters back to bytes. A character outside the byte alphabet
    /// (a malformed vocabulary) is rendered the way llama.cpp does.
    fn byte_level_decode(&self, text: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len());
        for c in text.chars() {
            match self.char_to_byte.get(&c) {
                Some(&b) => out.push(b),
                None => {
                    out.extend_from_slice(b"[UNK_BYTE_0x");
                    for b in c.encode_utf8(&mut [0; 4]).bytes() {
                        out.extend_from_slice(format!("{b:02x}").as_bytes());
                    }
                    out.extend_from_slice(text.as_bytes());
                    out.push(b']');
                }
            }
        }
        out
    }

    /// Text of `ids` as bytes, as `llama_detokenize` with `remove_special = false`:
    /// with `add_space_prefix` the first token's leading space is dropped (it is the one
    /// encoding added), and BPE families with `clean_spaces` tidy spaces before
    /// punctuation. So `decode(encode(s))` gives back `s` for the supported models,
    /// except that SentencePiece writes spaces as "▁": a literal "▁" comes back as a
    /// space (in llama.cpp too).
    pub fn decode_bytes(&self, ids: &[u32], special: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let piece = self.token_to_piece(id, special);
            let skip = usize::from(i == 0 && self.add_space_prefix && piece.first() == Some(&b' '));
            out.extend_from_slice(&piece[skip..]);
        }
        if self.clean_spaces {
            clean_up_spaces(&mut out);
        }
        out
    }

    /// Text of `ids` (see [`Tokenizer::decode_bytes`]); bytes that do not form valid
    /// UTF-8 (a sequence cut mid-character) become U+FFFD.
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids, special)).into_owned()
    }

    pub fn n_vocab(&self) -> usize {
        self.vocab.tokens.len()
    }
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }
    /// End-of-turn token (metadata, else detected by name).
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }
    /// End-of-message token (metadata, else `<|eom_id|>`).
    pub fn eom(&self) -> Option<u32> {
        self.eom
    }
    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }
    /// Whether `encode(.., add_special = true, ..)` ends with EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos && self.eos.is_some()
    }
    /// Whether generation should stop at `id` (llama.cpp's `llama_vocab_is_eog`).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }
    /// The end-of-generation tokens, in id order.
    pub fn eog_tokens(&self) -> impl Iterator<Item = u32> + '_ {
        self.eog.iter().copied()
    }
    /// Whether `id` is a control token (rendered only when asked for special text).
    pub fn is_control(&self, id: u32) -> bool {
        self.vocab.attr(id) & attr::CONTROL != 0
    }
    /// A short description for `fastkv inspect`.
    pub fn kind(&self) -> &str {
        &self.kind
    }
    /// The token's text as stored in the vocabulary (escaped: "▁" or byte-level
    /// characters for spaces).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.tokens.get(id as usize).map(|t| t.text.as_str())
    }
    /// The id of a token by its exact vocabulary text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.lookup(text)
    }
}

fn bad(key: &str, detail: impl Into<String>) -> TokenizerError {
    TokenizerError::BadMetadata {
        key: key.to_string(),
        detail: detail.into(),
    }
}

fn check_len<T>(key: &str, values: Option<&[T]>, n: usize) -> Result<(), TokenizerError> {
    match values {
        Some(v) if v.len() < n => Err(bad(key, format!("{} entries for {n} tokens", v.len()))),
        _ => Ok(()),
    }
}

/// The byte of a `<0xXX>` token (0 if the text is malformed, as llama.cpp's strtol).
fn parse_byte_token(text: &str) -> u8 {
    let hex = text.get(3..5).unwrap_or("");
    let digits: String = hex.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
    u8::from_str_radix(&digits, 16).unwrap_or(0)
}

/// llama.cpp's `clean_spaces` passes over detokenized bytes: drop the space before
/// `? ! . ,`, turn " ' " into "'", and drop the space before `'s 'm 're 've`.
fn clean_up_spaces(text: &mut Vec<u8>) {
    // Pass 1: " ?", " !", " .", " ," lose their space.
    let mut w = usize::from(!text.is_empty());
    for i in 1..text.len() {
        let x = text[i];
        if text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            w -= 1;
        }
        text[w] = x;
        w += 1;
    }
    text.truncate(w);

    // Pass 2: a lone apostrophe between spaces loses both spaces.
    let n = text.len();
    let mut w = usize::from(n > 0);
    let mut i = 1;
    while i < n {
        let x = text[i];
        if x == b'\'' && i + 1 < n && text[i - 1] == b' ' && text[i + 1] == b' ' {
            w -= 1;
            i += 1;
            text[i] = 0; // the skipped space, as llama.cpp leaves it
        }
        text[w] = x;
        w += 1;
        i += 1;
    }
    text.truncate(w);

    // Pass 3: " 's", " 'm", " 're", " 've" lose their space.
    let n = text.len();
    let mut w = usize::from(n > 0);
    for i in 1..n {
        let x = text[i];
        if text[i - 1] == b' ' && x == b'\'' && i + 1 < n {
            let x1 = text[i + 1];
            let two = |a, b| i + 2 < n && x1 == a && text[i + 2] == b;
            if x1 == b's' || x1 == b'm' || two(b'r', b'e') || two(b'v', b'e') {
                w -= 1;
            }
        }
        text[w] = x;
        w += 1;
    }
    text.truncate(w);
}

/// Streaming detokenizer: feed ids one at a time, get back text as soon as it forms
/// complete UTF-8 characters. A byte-fallback or byte-level token may carry only part
/// of a character; those bytes are held back until the character is complete, so the
/// streamed text never shows replacement characters for split characters.
///
/// No leading-space removal or space cleaning is applied: it streams the pieces of
/// generated tokens, which follow a prompt.
pub struct Detokenizer<'a> {
    tokenizer: &'a Tokenizer,
    special: bool,
    pending: Vec<u8>,
}

impl<'a> Detokenizer<'a> {
    /// `special`: render control tokens (as `token_to_piece`).
    pub fn new(tokenizer: &'a Tokenizer, special: bool) -> Self {
        Self {
            tokenizer,
            special,
            pending: Vec::new(),
        }
    }

    /// Add one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        let piece = self.tokenizer.token_to_piece(id, self.special);
        self.pending.extend_from_slice(&piece);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Bytes that can never become valid: show them as U+FFFD.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// The held-back bytes of an unfinished character, if any (as U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cleaned(s: &str) -> String {
        let mut v = s.as_bytes().to_vec();
        clean_up_spaces(&mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn clean_spaces_matches_llama_cpp_rules() {
        assert_eq!(cleaned("Hello , world !"), "Hello, world!");
        assert_eq!(cleaned("it ' s"), "it's");
        assert_eq!(cleaned("John 's cat"), "John's cat");
        assert_eq!(cleaned("we 're we 've I 'm"), "we're we've I'm");
        assert_eq!(cleaned("don 't"), "don 't");
        assert_eq!(cleaned(""), "");
        assert_eq!(cleaned(" ."), ".");
    }

    #[test]
    fn tokenizer_is_shareable_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<ChatTemplate>();
    }

    #[test]
    fn byte_tokens_parse_like_strtol() {
        assert_eq!(parse_byte_token("<0x0A>"), 10);
        assert_eq!(parse_byte_token("<0xFF>"), 255);
        assert_eq!(parse_byte_token("<0x4G>"), 4);
        assert_eq!(parse_byte_token("x"), 0);
    }
}
