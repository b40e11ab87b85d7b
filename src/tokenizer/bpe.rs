//! Byte-level BPE (`tokenizer.ggml.model = gpt2`), built on the `tokenizers` crate.
//!
//! llama.cpp tokenizes a text fragment in three steps, and so do we:
//! 1. split it into words with the pre-tokenizer regexes named by `tokenizer.ggml.pre`
//!    (each regex splits every piece left by the previous one; matches and the text
//!    between them both become pieces: the `tokenizers` crate's `Split` with
//!    `Isolated` behaviour does exactly that);
//! 2. map every byte of a word to its GPT-2 "byte-level" character;
//! 3. run BPE merges on each word (lowest merge rank first, leftmost on ties: the
//!    same order in llama.cpp and in `tokenizers`' `BPE` model).
//!
//! The regexes are llama.cpp's (written for the `fancy-regex` engine, which supports
//! the `(?!\S)` look-ahead they need). llama.cpp evaluates some of them with
//! hand-written matchers that are designed to be equivalent; the tests check the
//! result token by token against llama.cpp on real text.
//!
//! Unicode categories (`\p{L}`, `\p{N}`, `\p{P}`) come from llama.cpp's own tables,
//! which are Unicode 15.1, while the regex engine knows Unicode 16: characters added
//! in 16.0 are "undefined" to llama.cpp. We therefore restrict each category to
//! characters assigned by Unicode 15.1 (see [`as_unicode_15_1`]).
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{
    Model, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, SplitDelimiterBehavior,
};

use super::TokenizerError;

/// GPT-2's word regex (llama.cpp adds the final `\s+` in its matcher).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's word regex: case-insensitive contractions, digits in groups of up to 3.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's word regex: like Llama 3's, but every digit is its own word.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How one family of `tokenizer.ggml.pre` values tokenizes and detokenizes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PreTokenizerSpec {
    /// Applied in order; each one splits the pieces the previous ones produced.
    pub regexes: &'static [&'static str],
    /// A whole word that is itself a token is emitted without running merges
    /// (llama.cpp's `ignore_merges`, set for the Llama 3 family).
    pub ignore_merges: bool,
    /// llama.cpp's default for `add_bos` when the metadata does not say.
    pub add_bos: bool,
    /// Decoding applies llama.cpp's `clean_spaces` passes (" ." -> "." and so on).
    pub clean_spaces: bool,
}

/// Restrict the Unicode categories in `re` to characters assigned in Unicode 15.1, the
/// version of llama.cpp's tables (`\p{Age=15.1}` means "assigned in 15.1 or earlier").
/// The result is a nested class, valid inside and outside brackets.
fn as_unicode_15_1(re: &str) -> String {
    [r"\p{L}", r"\p{N}", r"\p{P}"]
        .iter()
        .fold(re.to_string(), |re, cat| {
            re.replace(cat, &format!("[{cat}&&\\p{{Age=15.1}}]"))
        })
}

/// The pre-tokenizer names fastkv supports, for error messages.
pub(crate) const SUPPORTED_PRE: &str = "default, gpt-2, smollm, starcoder, qwen2, llama3 (llama-bpe, llama-v3) and their llama.cpp aliases";

/// The spec for a `tokenizer.ggml.pre` value, mirroring llama.cpp's table for the
/// families we support; `None` for anything else.
pub(crate) fn pre_tokenizer_spec(name: &str) -> Option<PreTokenizerSpec> {
    const DEFAULT: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"];
    const DIGITS_THEN_GPT2: &[&str] = &[r"\p{N}", GPT2];
    let spec = |regexes, ignore_merges, add_bos, clean_spaces| PreTokenizerSpec {
        regexes,
        ignore_merges,
        add_bos,
        clean_spaces,
    };
    Some(match name {
        // A missing name means "default" in llama.cpp (with a loud warning).
        "" | "default" => spec(DEFAULT, false, false, true),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => spec(&[LLAMA3], true, true, true),
        "dbrx" | "smaug-bpe" => spec(&[LLAMA3], false, false, true),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "hunyuan" => {
            spec(&[QWEN2], false, false, false)
        }
        "megrez" | "stablelm2" => spec(&[QWEN2], false, false, true),
        "smollm" | "command-r" => spec(DIGITS_THEN_GPT2, false, false, false),
        "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
            spec(DIGITS_THEN_GPT2, false, false, true)
        }
        "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "exaone4" => {
            spec(&[GPT2], false, false, true)
        }
        "trillion" | "granite-docling" => spec(&[GPT2], false, false, false),
        _ => return None,
    })
}

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1
/// bytes stand for themselves, the other 68 bytes are shifted to U+0100 and up, in
/// byte order. Byte-level vocabularies are written in these characters.
pub(crate) fn byte_to_char_table() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut table = ['\0'; 256];
    let mut shifted = 0;
    for b in 0..256u32 {
        let cp = if printable(b) {
            b
        } else {
            shifted += 1;
            255 + shifted
        };
        table[b as usize] = char::from_u32(cp).expect("codepoints below 0x200 are valid");
    }
    table
}

/// The byte-level BPE model of one vocabulary.
pub(crate) struct ByteLevelBpe {
    pre: PreTokenizerWrapper,
    bpe: BPE,
    byte_chars: [char; 256],
    /// Token id of each byte's character, used if the BPE pipeline ever fails.
    byte_ids: [Option<u32>; 256],
}

impl ByteLevelBpe {
    /// `tokens[i]` is the text of id `i` (later duplicates win, as in llama.cpp);
    /// `merges` are "left right" strings, highest priority first.
    pub fn new(
        tokens: &[String],
        merges: &[&str],
        spec: &PreTokenizerSpec,
    ) -> Result<Self, TokenizerError> {
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, text)| (text.clone(), id as u32))
            .collect();
        let merges = parse_merges(merges, &vocab);
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(spec.ignore_merges)
            .build()
            .map_err(|e| TokenizerError::Bpe(e.to_string()))?;
        let byte_chars = byte_to_char_table();
        let mut byte_ids = [None; 256];
        for (b, c) in byte_chars.iter().enumerate() {
            byte_ids[b] = bpe.token_to_id(c.encode_utf8(&mut [0; 4]));
        }
        Ok(Self {
            pre: pre_tokenizer(spec)?,
            bpe,
            byte_chars,
            byte_ids,
        })
    }

    /// Append the ids of `text` (a fragment without special tokens) to `out`.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        if self.try_encode(text, out).is_err() {
            // Not expected (the model has no unknown token and the regexes are fixed),
            // but never lose text: fall back to one token per byte.
            out.extend(text.bytes().filter_map(|b| self.byte_ids[b as usize]));
        }
    }

    fn try_encode(&self, text: &str, out: &mut Vec<u32>) -> tokenizers::Result<()> {
        let mut words = PreTokenizedString::from(text);
        self.pre.pre_tokenize(&mut words)?;
        let mut mapped = String::new();
        let mut ids = Vec::new();
        for (word, _, _) in words.get_splits(OffsetReferential::Original, OffsetType::None) {
            mapped.clear();
            mapped.extend(word.bytes().map(|b| self.byte_chars[b as usize]));
            ids.extend(self.bpe.tokenize(&mapped)?.into_iter().map(|t| t.id));
        }
        out.append(&mut ids);
        Ok(())
    }
}

/// The regex splits of `spec`, applied in sequence.
fn pre_tokenizer(spec: &PreTokenizerSpec) -> Result<PreTokenizerWrapper, TokenizerError> {
    let splits = spec
        .regexes
        .iter()
        .map(|re| {
            Split::new(
                SplitPattern::Regex(as_unicode_15_1(re)),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(PreTokenizerWrapper::Split)
            .map_err(|e| TokenizerError::Bpe(format!("pre-tokenizer regex {re:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PreTokenizerWrapper::Sequence(Sequence::new(splits)))
}

/// Split "left right" merge rules. Like llama.cpp, the separator is the first space
/// after the first byte (so a rule may merge a token that starts with a space), and
/// the first occurrence of a pair keeps its rank. Rules whose parts or result are not
/// tokens are dropped: they could never produce a token id (the `tokenizers` crate
/// would reject them).
fn parse_merges(merges: &[&str], vocab: &Vocab) -> Merges {
    let mut seen = std::collections::HashSet::new();
    merges
        .iter()
        .filter_map(|rule| {
            let sep = rule.bytes().skip(1).position(|b| b == b' ')? + 1;
            let (left, right) = (&rule[..sep], &rule[sep + 1..]);
            let known = vocab.contains_key(left)
                && vocab.contains_key(right)
                && vocab.contains_key(&format!("{left}{right}"));
            (known && seen.insert((left, right))).then(|| (left.to_string(), right.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_gpt2s() {
        let t = byte_to_char_table();
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t[0xAD], 'Ń');
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    fn words(pre: &str, text: &str) -> Vec<String> {
        let pre = pre_tokenizer(&pre_tokenizer_spec(pre).unwrap()).unwrap();
        let mut words = PreTokenizedString::from(text);
        pre.pre_tokenize(&mut words).unwrap();
        words
            .get_splits(OffsetReferential::Original, OffsetType::None)
            .into_iter()
            .map(|(w, _, _)| w.to_string())
            .collect()
    }

    #[test]
    fn pre_tokenizer_splits() {
        let w = |pre, text| words(pre, text);
        assert_eq!(
            w("smollm", "I'm 12 apples!!  ok\n"),
            ["I", "'m", " ", "1", "2", " apples", "!!", " ", " ok", "\n"]
        );
        assert_eq!(w("gpt-2", "abc 123  x "), ["abc", " 123", " ", " x", " "]);
        assert_eq!(
            w("llama3", "I'M 12345 hi\n\n  there"),
            ["I", "'M", " ", "123", "45", " hi", "\n\n", " ", " there"]
        );
        assert_eq!(w("qwen2", "ab12"), ["ab", "1", "2"]);
        assert_eq!(w("default", "a.b 1234"), ["a", ".", "b", " ", "123", "4"]);
    }

    #[test]
    fn categories_are_unicode_15_1() {
        // U+A7CB (a letter since Unicode 16) is undefined to llama.cpp: punctuation-like.
        assert_eq!(words("gpt-2", "x\u{a7cb}!y"), ["x", "\u{a7cb}!", "y"]);
        // U+10D40 (a Garay digit, Unicode 16) is not a digit to llama.cpp.
        assert_eq!(words("smollm", "1 \u{10d40}"), ["1", " \u{10d40}"]);
        // Older letters and digits are unaffected.
        assert_eq!(
            words("gpt-2", "x\u{e9}\u{4e2d}! \u{661}"),
            ["x\u{e9}\u{4e2d}", "!", " \u{661}"]
        );
    }

    #[test]
    fn merges_split_at_first_space_after_first_byte() {
        let vocab: Vocab = ["a", "b", "ab", " ", " a", "  a"]
            .iter()
            .enumerate()
            .map(|(i, s)| (s.to_string(), i as u32))
            .collect();
        let m = parse_merges(&["a b", "  a", "a b", "x y", "nospace"], &vocab);
        assert_eq!(
            m,
            vec![("a".into(), "b".into()), (" ".into(), "a".into())],
            "duplicates, unknown parts and malformed rules are dropped"
        );
    }
}
