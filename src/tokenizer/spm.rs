//! SentencePiece-style tokenization from token scores (`tokenizer.ggml.model = llama`).
//!
//! There are no merge rules: the text (spaces already escaped to "▁") starts as one
//! symbol per UTF-8 character, and we keep merging the adjacent pair whose
//! concatenation is a vocabulary token with the highest score (leftmost on ties),
//! until no adjacent pair forms a token. A final symbol that is not a token is
//! spelled out as byte tokens (`<0xXX>`). This is llama.cpp's `llm_tokenizer_spm`;
//! a priority queue keeps it O(n log n), so a whole book takes well under a second.
use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::Vocab;

const NONE: usize = usize::MAX;

/// A run of the input, linked to its live neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    /// Byte length; 0 once merged into its left neighbour.
    len: usize,
    prev: usize,
    next: usize,
}

/// A candidate merge of two adjacent symbols.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged text, to detect stale entries.
    size: usize,
}

impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}

/// Append the ids of `text` (escaped, without special tokens) to `out`.
pub(crate) fn tokenize(text: &str, vocab: &Vocab, out: &mut Vec<u32>) {
    let mut symbols: Vec<Symbol> = text
        .char_indices()
        .enumerate()
        .map(|(i, (start, c))| Symbol {
            start,
            len: c.len_utf8(),
            prev: i.wrapping_sub(1), // 0 - 1 wraps to NONE
            next: i + 1,
        })
        .collect();
    let Some(last) = symbols.last_mut() else {
        return;
    };
    last.next = NONE;

    let mut queue = BinaryHeap::new();
    let try_add =
        |queue: &mut BinaryHeap<Bigram>, symbols: &[Symbol], left: usize, right: usize| {
            if left == NONE || right == NONE {
                return;
            }
            let (l, r) = (symbols[left], symbols[right]);
            let merged = &text[l.start..r.start + r.len];
            if let Some(id) = vocab.lookup(merged) {
                queue.push(Bigram {
                    score: vocab.score(id),
                    left,
                    right,
                    size: merged.len(),
                });
            }
        };
    for i in 1..symbols.len() {
        try_add(&mut queue, &symbols, i - 1, i);
    }

    while let Some(b) = queue.pop() {
        let (l, r) = (symbols[b.left], symbols[b.right]);
        // Skip pairs where either side has changed since the entry was queued.
        if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
            continue;
        }
        symbols[b.left].len += r.len;
        symbols[b.left].next = r.next;
        symbols[b.right].len = 0;
        if r.next != NONE {
            symbols[r.next].prev = b.left;
        }
        try_add(&mut queue, &symbols, l.prev, b.left);
        try_add(&mut queue, &symbols, b.left, r.next);
    }

    // Symbol 0 is never merged away (merges always absorb the right-hand symbol).
    let mut i = 0;
    while i != NONE {
        let s = symbols[i];
        let piece = &text[s.start..s.start + s.len];
        match vocab.lookup(piece) {
            Some(id) => out.push(id),
            None => out.extend(piece.bytes().filter_map(|b| vocab.byte_token(b))),
        }
        i = s.next;
    }
}
