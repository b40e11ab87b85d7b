//! RULER-style synthetic long-context tasks, generated deterministically from a seed.
//!
//! A [`Sample`] is a context (an instruction and a haystack with needles in it) and
//! the questions asked about it. The context is what gets compressed; the questions
//! come after, so a query-agnostic policy never sees them.
//!
//! A sample asks one question, as RULER does, or several: with `queries` = K the
//! haystack holds K independent instances of the task (each with its own needles,
//! keys and distractors, at its own depth) and each instance is asked on its own,
//! after the same compressed context. At long contexts the prefill is most of the
//! cost, so K questions per prefill is what makes enough questions affordable; the
//! other instances are more distractors, as in RULER's multi-query tasks.
//!
//! Prompts follow RULER's wording (Hsieh et al., 2024); the key-value task follows
//! SCBench's retrieval task. Context lengths are counted in tokens of the model's
//! own tokenizer, through the `count` function the caller passes.
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;

/// RULER's noise haystack.
const NOISE: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

/// Words for keys ("adjective-noun") and word values. None of them is a digit string,
/// so number needles stay unique.
const ADJECTIVES: &[&str] = &[
    "quiet", "brave", "golden", "hollow", "frozen", "gentle", "rapid", "silent", "crimson",
    "ancient", "bitter", "clever", "distant", "eager", "fragile", "humble", "jolly", "lively",
    "mellow", "nimble", "proud", "rustic", "shiny", "tender", "vivid", "wild", "zealous", "cosmic",
    "dusty", "fuzzy", "glossy", "hasty", "icy", "lucky", "misty", "noisy",
];
const NOUNS: &[&str] = &[
    "harbor", "lantern", "meadow", "falcon", "compass", "glacier", "orchard", "pebble", "canyon",
    "feather", "violin", "walnut", "beacon", "cobbler", "dolphin", "ember", "garnet", "hammock",
    "igloo", "jasmine", "kettle", "lagoon", "marble", "nectar", "otter", "parsley", "quartz",
    "saddle", "thimble", "umbrella", "velvet", "willow", "yarn", "zephyr", "biscuit", "cactus",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TaskError {
    #[error(
        "unknown task '{0}' (choose from: single-noise, single-text, multi-key, multi-value, vt, kv)"
    )]
    Unknown(String),
    #[error("the {0} task needs a text haystack file (--haystack FILE)")]
    NoHaystack(TaskKind),
    #[error("the haystack text has no usable sentences")]
    EmptyHaystack,
    #[error("a context of {0} tokens is too short for the {1} task")]
    TooShort(usize, TaskKind),
    #[error("could not place unique needles for the {0} task (the haystack repeats them)")]
    NotUnique(TaskKind),
    #[error("a sample must ask at least one question")]
    NoQueries,
}

/// The kinds of task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskKind {
    /// One needle (word key, 7-digit number) in the noise haystack.
    SingleNoise,
    /// One needle (word key, word value) in a text haystack.
    SingleText,
    /// Four needles with different keys; the question asks for one of them, the
    /// other three are distractors.
    MultiKey,
    /// Two keys with four values each; the question asks for all values of one key.
    MultiValue,
    /// Variable tracking: two chains of five assignments; the question asks which
    /// variables hold the first chain's value.
    VariableTracking,
    /// Key-value retrieval: a JSON object of random keys and values fills the
    /// context; the question asks for the value of one key.
    KvRetrieval,
}

impl TaskKind {
    pub const ALL: [TaskKind; 6] = [
        TaskKind::SingleNoise,
        TaskKind::SingleText,
        TaskKind::MultiKey,
        TaskKind::MultiValue,
        TaskKind::VariableTracking,
        TaskKind::KvRetrieval,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TaskKind::SingleNoise => "single-noise",
            TaskKind::SingleText => "single-text",
            TaskKind::MultiKey => "multi-key",
            TaskKind::MultiValue => "multi-value",
            TaskKind::VariableTracking => "vt",
            TaskKind::KvRetrieval => "kv",
        }
    }

    /// Whether the task needs a text haystack file.
    pub fn needs_text(self) -> bool {
        self == TaskKind::SingleText
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TaskKind {
    type Err = TaskError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| TaskError::Unknown(s.to_string()))
    }
}

/// One question about a context, and what a correct answer contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub question: String,
    /// The start of the answer, given to the model (RULER's answer prefix).
    pub answer_prefix: String,
    /// Strings the answer must contain; the score is the fraction found.
    pub answers: Vec<String>,
    /// The statements the answers come from: each is in the context exactly once.
    pub evidence: Vec<String>,
}

/// A context and the questions asked about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub task: TaskKind,
    /// The context's size in tokens (of the tokenizer used to build it).
    pub n_tokens: usize,
    pub context: String,
    pub queries: Vec<Query>,
}

/// Builds samples for one tokenizer and haystack text.
pub struct Generator<'a> {
    count: &'a dyn Fn(&str) -> usize,
    sentences: Vec<String>,
    /// Token counts of filler pieces, by text.
    sizes: HashMap<String, usize>,
    seed: u64,
}

impl<'a> Generator<'a> {
    /// `count` gives the number of tokens of a piece of text; `haystack` is the text
    /// that text haystacks are cut from (none: the tasks that need it fail).
    pub fn new(count: &'a dyn Fn(&str) -> usize, haystack: Option<&str>, seed: u64) -> Self {
        let sentences = haystack.map(split_sentences).unwrap_or_default();
        Self {
            count,
            sentences,
            sizes: HashMap::new(),
            seed,
        }
    }

    /// Sample `index` of `n` of a task with a context of about `n_tokens` tokens that
    /// asks `queries` questions (that many instances of the task in one haystack).
    /// Question depths are spread over all n x queries questions: instance q of
    /// sample i sits in slice q*n + i of n*queries equal slices of the context, so
    /// each sample covers every depth and the samples together cover each slice once.
    /// With one question, sample i's needle sits in the i-th of n slices.
    pub fn sample(
        &mut self,
        task: TaskKind,
        n_tokens: usize,
        index: usize,
        n: usize,
        queries: usize,
    ) -> Result<Sample, TaskError> {
        if task.needs_text() && self.sentences.is_empty() {
            return Err(TaskError::NoHaystack(task));
        }
        if queries == 0 {
            return Err(TaskError::NoQueries);
        }
        let n = n.max(1);
        // Retry with fresh draws in the rare case a value also occurs in the haystack.
        for attempt in 0..16u64 {
            let mut rng = ChaCha12Rng::seed_from_u64(
                self.seed
                    ^ (task as u64) << 56
                    ^ (n_tokens as u64) << 24
                    ^ (index as u64) << 4
                    ^ attempt,
            );
            let slices = (n * queries) as f64;
            let depths: Vec<f64> = (0..queries)
                .map(|q| ((q * n + index) as f64 + rng.random::<f64>()) / slices)
                .collect();
            let s = self.build(task, n_tokens, &depths, &mut rng)?;
            // Evidence occurs once; so do answers, but for variable names (the next
            // variable in a chain is assigned from each of them).
            let once = |x: &String| s.context.matches(x.as_str()).count() == 1;
            let unique = s.queries.iter().all(|q| {
                q.evidence.iter().all(once)
                    && (task == TaskKind::VariableTracking || q.answers.iter().all(once))
            });
            if unique {
                return Ok(s);
            }
        }
        Err(TaskError::NotUnique(task))
    }

    /// One context holding an instance of `task` at each of `depths` (fractions of
    /// the haystack); each instance is asked once.
    fn build(
        &mut self,
        task: TaskKind,
        n_tokens: usize,
        depths: &[f64],
        rng: &mut ChaCha12Rng,
    ) -> Result<Sample, TaskError> {
        // Four keys per instance (the asked one and up to three distractors), drawn
        // first for every task so that one question draws as it always has.
        let keys = distinct_keys(rng, 4 * depths.len());
        if task == TaskKind::KvRetrieval {
            return self.kv_retrieval(n_tokens, depths, rng);
        }
        let (mut needles, mut queries) = (Vec::new(), Vec::new());
        let intro = match task {
            TaskKind::SingleNoise | TaskKind::SingleText | TaskKind::MultiKey => {
                let asked: Vec<&str> = keys.iter().step_by(4).map(String::as_str).collect();
                let mut words: Vec<&str> = Vec::new();
                for (q, &depth) in depths.iter().enumerate() {
                    let keys = &keys[4 * q..4 * q + 4];
                    let (kind, value) = if task == TaskKind::SingleText {
                        let w = word(rng, q, &words, &asked);
                        words.push(w);
                        ("word", w.to_string())
                    } else {
                        ("number", number(rng, 7))
                    };
                    let needle = format!(
                        "One of the special magic {kind}s for {} is: {value}.",
                        keys[0]
                    );
                    queries.push(niah_query(
                        kind,
                        &keys[0],
                        vec![value],
                        needle.clone(),
                        false,
                    ));
                    needles.push((depth, needle));
                    if task == TaskKind::MultiKey {
                        for key in &keys[1..] {
                            let value = number(rng, 7);
                            let needle =
                                format!("One of the special magic numbers for {key} is: {value}.");
                            needles.push((rng.random(), needle));
                        }
                    }
                }
                niah_intro(if task == TaskKind::SingleText {
                    "word"
                } else {
                    "number"
                })
            }
            TaskKind::MultiValue => {
                // Two keys per instance, four values each: the first key is asked.
                for (q, &depth) in depths.iter().enumerate() {
                    for (i, key) in keys[2 * q..2 * q + 2].iter().enumerate() {
                        let values: Vec<String> = (0..4).map(|_| number(rng, 7)).collect();
                        let mut evidence = Vec::new();
                        for (j, v) in values.iter().enumerate() {
                            let needle =
                                format!("One of the special magic numbers for {key} is: {v}.");
                            let d = if i == 0 && j == 0 {
                                depth
                            } else {
                                rng.random()
                            };
                            needles.push((d, needle.clone()));
                            evidence.push(needle);
                        }
                        if i == 0 {
                            let mut q = niah_query("number", key, values, String::new(), true);
                            q.evidence = evidence;
                            queries.push(q);
                        }
                    }
                }
                niah_intro("number")
            }
            TaskKind::VariableTracking => {
                // Two chains of five per instance: the first is asked.
                let names = distinct_names(rng, 10 * depths.len());
                for (q, &depth) in depths.iter().enumerate() {
                    for (c, chain) in names[10 * q..10 * q + 10].chunks(5).enumerate() {
                        let value = number(rng, 5);
                        let mut ds: Vec<f64> = (0..5).map(|_| rng.random()).collect();
                        if c == 0 {
                            ds[0] = depth;
                        }
                        ds.sort_by(f64::total_cmp);
                        let mut evidence = Vec::new();
                        for (j, name) in chain.iter().enumerate() {
                            let rhs = if j == 0 {
                                value.clone()
                            } else {
                                format!("VAR {}", chain[j - 1])
                            };
                            needles.push((ds[j], format!("VAR {name} = {rhs}.")));
                            evidence.push(format!("VAR {name} = "));
                        }
                        evidence.push(format!("= {value}."));
                        if c == 0 {
                            queries.push(vt_query(&value, chain, evidence));
                        }
                    }
                }
                "Memorize and track the chain(s) of variable assignment hidden in the \
                 following text.\n\n"
                    .to_string()
            }
            TaskKind::KvRetrieval => unreachable!("built above"),
        };
        let filler = if task == TaskKind::SingleText {
            // The text from a random sentence on, wrapping around.
            let mut v = self.sentences.clone();
            let start = rng.random_range(0..v.len());
            v.rotate_left(start);
            v
        } else {
            NOISE
                .split_inclusive(". ")
                .map(|s| s.trim().to_string())
                .collect()
        };
        let context = self.fill(task, n_tokens, &intro, needles, &filler)?;
        let n_tokens = (self.count)(&context);
        Ok(Sample {
            task,
            n_tokens,
            context,
            queries,
        })
    }

    /// `intro`, then filler sentences (cycled) up to `n_tokens` in all, with the
    /// needles inserted at their depths (fractions of the haystack).
    fn fill(
        &mut self,
        task: TaskKind,
        n_tokens: usize,
        intro: &str,
        mut needles: Vec<(f64, String)>,
        filler: &[String],
    ) -> Result<String, TaskError> {
        let fixed = (self.count)(intro)
            + needles
                .iter()
                .map(|(_, n)| self.size(&format!(" {n}")))
                .sum::<usize>();
        let mut left = n_tokens
            .checked_sub(fixed)
            .filter(|&l| l > 0)
            .ok_or(TaskError::TooShort(n_tokens, task))?;
        let mut hay = Vec::new();
        for s in filler.iter().cycle().take(1 << 20) {
            let size = self.size(&format!(" {s}"));
            if size > left {
                break;
            }
            left -= size;
            hay.push(s.as_str());
        }
        needles.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut out = intro.to_string();
        let mut next = needles.iter().peekable();
        for (i, s) in hay.iter().enumerate() {
            while let Some((_, n)) = next.next_if(|(d, _)| (d * hay.len() as f64) as usize <= i) {
                out.push(' ');
                out.push_str(n);
            }
            out.push(' ');
            out.push_str(s);
        }
        for (_, n) in next {
            out.push(' ');
            out.push_str(n);
        }
        Ok(out)
    }

    fn kv_retrieval(
        &mut self,
        n_tokens: usize,
        depths: &[f64],
        rng: &mut ChaCha12Rng,
    ) -> Result<Sample, TaskError> {
        let task = TaskKind::KvRetrieval;
        let intro = "Extract the value corresponding to the specified key in the JSON object \
                     below.\n\nJSON data:\n{";
        let mut left = n_tokens
            .checked_sub((self.count)(intro) + 1)
            .ok_or(TaskError::TooShort(n_tokens, task))?;
        let mut pairs = Vec::new();
        loop {
            let pair = format!("\"{}\": \"{}\"", uuid(rng), uuid(rng));
            let size = (self.count)(&format!("{pair}, "));
            if size > left {
                break;
            }
            left -= size;
            pairs.push(pair);
        }
        // The asked pairs and at least one other.
        if pairs.len() < depths.len() + 1 {
            return Err(TaskError::TooShort(n_tokens, task));
        }
        let context = format!("{intro}{}}}", pairs.join(", "));
        let mut asked: Vec<usize> = Vec::new();
        for &d in depths {
            // The pair at that depth, or the next one not asked yet.
            let mut i = ((d * pairs.len() as f64) as usize).min(pairs.len() - 1);
            while asked.contains(&i) {
                i = (i + 1) % pairs.len();
            }
            asked.push(i);
        }
        let queries = asked
            .iter()
            .map(|&i| {
                let (key, value) = pairs[i].split_once(": ").expect("a pair has a colon");
                let (key, value) = (key.trim_matches('"'), value.trim_matches('"'));
                Query {
                    question: format!(
                        "Key: \"{key}\"\nThe value associated with the specified key is:"
                    ),
                    answer_prefix: "Corresponding value:".to_string(),
                    answers: vec![value.to_string()],
                    evidence: vec![value.to_string(), key.to_string()],
                }
            })
            .collect();
        Ok(Sample {
            task,
            n_tokens: (self.count)(&context),
            context,
            queries,
        })
    }

    fn size(&mut self, piece: &str) -> usize {
        if let Some(&n) = self.sizes.get(piece) {
            return n;
        }
        let n = (self.count)(piece);
        self.sizes.insert(piece.to_string(), n);
        n
    }
}

fn niah_intro(kind: &str) -> String {
    format!(
        "Some special magic {kind}s are hidden within the following text. Make sure to memorize \
         it. I will quiz you about the {kind}s afterwards.\n"
    )
}

fn niah_query(kind: &str, key: &str, answers: Vec<String>, needle: String, all: bool) -> Query {
    let (question, answer_prefix) = if all {
        (
            format!(
                "What are all the special magic {kind}s for {key} mentioned in the provided text?"
            ),
            format!("The special magic {kind}s for {key} mentioned in the provided text are"),
        )
    } else {
        (
            format!("What is the special magic {kind} for {key} mentioned in the provided text?"),
            format!("The special magic {kind} for {key} mentioned in the provided text is"),
        )
    };
    Query {
        question,
        answer_prefix,
        answers,
        evidence: vec![needle],
    }
}

fn vt_query(value: &str, chain: &[String], evidence: Vec<String>) -> Query {
    Query {
        question: format!(
            "Question: Find all variables that are assigned the value {value} in the text above."
        ),
        answer_prefix: format!(
            "Answer: According to the chain(s) of variable assignment in the text above, 5 \
             variables are assigned the value {value}, they are:"
        ),
        answers: chain.to_vec(),
        evidence,
    }
}

/// The word value of instance `q`: after the first (drawn as a single question
/// draws it), one that no earlier instance used and no asked key contains, so
/// that every answer occurs once.
fn word(rng: &mut ChaCha12Rng, q: usize, used: &[&str], asked_keys: &[&str]) -> &'static str {
    loop {
        let w = pick(rng, NOUNS);
        if q == 0 || !(used.contains(&w) || asked_keys.iter().any(|k| k.contains(w))) {
            return w;
        }
    }
}

/// Sentences of a text, one line each, without very short fragments (headings).
fn split_sentences(text: &str) -> Vec<String> {
    text.split_inclusive(". ")
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| s.len() >= 24 && s.ends_with('.'))
        .collect()
}

fn pick<'s>(rng: &mut ChaCha12Rng, from: &[&'s str]) -> &'s str {
    from[rng.random_range(0..from.len())]
}

/// `n` distinct "adjective-noun" keys.
fn distinct_keys(rng: &mut ChaCha12Rng, n: usize) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    while keys.len() < n {
        let k = format!("{}-{}", pick(rng, ADJECTIVES), pick(rng, NOUNS));
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys
}

/// `n` distinct five-letter upper-case variable names.
fn distinct_names(rng: &mut ChaCha12Rng, n: usize) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    while names.len() < n {
        let v: String = (0..5)
            .map(|_| char::from(b'A' + rng.random_range(0..26u8)))
            .collect();
        if !names.contains(&v) {
            names.push(v);
        }
    }
    names
}

/// A number of `digits` digits without a leading zero.
fn number(rng: &mut ChaCha12Rng, digits: u32) -> String {
    rng.random_range(10u64.pow(digits - 1)..10u64.pow(digits))
        .to_string()
}

/// A random UUID-shaped string (8-4-4-4-12 hex digits).
fn uuid(rng: &mut ChaCha12Rng) -> String {
    let hex = |rng: &mut ChaCha12Rng, n: usize| -> String {
        (0..n)
            .map(|_| char::from_digit(rng.random_range(0..16), 16).expect("a hex digit"))
            .collect()
    };
    format!(
        "{}-{}-{}-{}-{}",
        hex(rng, 8),
        hex(rng, 4),
        hex(rng, 4),
        hex(rng, 4),
        hex(rng, 12)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in tokenizer: about one token per four bytes.
    fn count(s: &str) -> usize {
        s.len().div_ceil(4)
    }

    const TEXT: &str = "Valkyria Chronicles III is a tactical role-playing game developed by \
        Sega. It was released in January 2011 in Japan. The game began development in 2010, \
        carrying over a large portion of the work done on its predecessor. It met with positive \
        sales in Japan, and was praised by both Japanese and western critics. A manga adaptation \
        was also released in the following year with new characters.";

    fn all_samples(seed: u64, n_tokens: usize) -> Vec<Sample> {
        let c: &dyn Fn(&str) -> usize = &count;
        let mut g = Generator::new(c, Some(TEXT), seed);
        let mut out = Vec::new();
        for task in TaskKind::ALL {
            for i in 0..3 {
                out.push(g.sample(task, n_tokens, i, 3, 1).unwrap());
            }
        }
        out
    }

    #[test]
    fn same_seed_same_prompts_other_seed_other_prompts() {
        let a = all_samples(7, 1000);
        assert_eq!(a, all_samples(7, 1000));
        let b = all_samples(8, 1000);
        for (x, y) in a.iter().zip(&b) {
            assert_ne!(x.queries, y.queries, "{}", x.task);
        }
    }

    #[test]
    fn every_answer_is_in_the_context_exactly_once() {
        for s in all_samples(3, 1500) {
            for q in &s.queries {
                assert!(!q.answers.is_empty());
                for e in &q.evidence {
                    assert_eq!(s.context.matches(e.as_str()).count(), 1, "{}: {e}", s.task);
                }
                for a in &q.answers {
                    assert!(
                        q.evidence.iter().any(|e| e.contains(a.as_str())),
                        "{}: answer {a} is not in its evidence",
                        s.task
                    );
                    // Values (numbers, words, UUIDs) occur once; a variable name also
                    // occurs where the next variable is assigned from it.
                    if s.task != TaskKind::VariableTracking {
                        assert_eq!(s.context.matches(a.as_str()).count(), 1, "{}: {a}", s.task);
                    }
                }
            }
        }
    }

    #[test]
    fn contexts_have_the_requested_size() {
        for s in all_samples(1, 2000) {
            assert!(s.n_tokens <= 2000, "{}: {}", s.task, s.n_tokens);
            assert!(s.n_tokens > 1800, "{}: {}", s.task, s.n_tokens);
            assert_eq!(s.n_tokens, count(&s.context));
        }
    }

    #[test]
    fn needle_depths_are_spread_over_the_samples() {
        let c: &dyn Fn(&str) -> usize = &count;
        let mut g = Generator::new(c, None, 5);
        let n = 8;
        let mut depths = Vec::new();
        for i in 0..n {
            let s = g.sample(TaskKind::SingleNoise, 2000, i, n, 1).unwrap();
            let at = s.context.find(&s.queries[0].evidence[0]).unwrap();
            depths.push(at as f64 / s.context.len() as f64);
        }
        for (i, d) in depths.iter().enumerate() {
            let slice = i as f64 / n as f64;
            assert!(
                (slice - 0.05..slice + 1.0 / n as f64 + 0.05).contains(d),
                "sample {i}: depth {d}"
            );
        }
    }

    /// Several questions per sample: every task places an independent instance per
    /// question (its own keys, values and evidence, each once in the context), and
    /// the questions of all samples cover the depth slices one each.
    #[test]
    fn several_questions_per_sample() {
        let c: &dyn Fn(&str) -> usize = &count;
        let mut g = Generator::new(c, Some(TEXT), 9);
        let (n, k) = (3, 4);
        for task in TaskKind::ALL {
            let mut depths = Vec::new();
            for i in 0..n {
                let s = g.sample(task, 6000, i, n, k).unwrap();
                assert_eq!(s.queries.len(), k, "{task}");
                assert!(
                    s.n_tokens <= 6000 && s.n_tokens > 5000,
                    "{task}: {}",
                    s.n_tokens
                );
                let mut questions: Vec<&str> =
                    s.queries.iter().map(|q| q.question.as_str()).collect();
                questions.dedup();
                assert_eq!(questions.len(), k, "{task}: repeated questions");
                for q in &s.queries {
                    for e in &q.evidence {
                        assert_eq!(s.context.matches(e.as_str()).count(), 1, "{task}: {e}");
                    }
                    if task != TaskKind::VariableTracking {
                        for a in &q.answers {
                            assert_eq!(s.context.matches(a.as_str()).count(), 1, "{task}: {a}");
                        }
                    }
                    let first = q.evidence.iter().filter_map(|e| s.context.find(e.as_str()));
                    if let Some(at) = first.min() {
                        depths.push(at as f64 / s.context.len() as f64);
                    }
                }
            }
            // One question in each of the n*k slices (the first piece of evidence can
            // sit before its slice where distractors share the instance).
            if matches!(
                task,
                TaskKind::SingleNoise | TaskKind::SingleText | TaskKind::KvRetrieval
            ) {
                depths.sort_by(f64::total_cmp);
                for (j, d) in depths.iter().enumerate() {
                    let slice = j as f64 / (n * k) as f64;
                    assert!(
                        (slice - 0.05..slice + 1.0 / (n * k) as f64 + 0.05).contains(d),
                        "{task}: question {j} at depth {d}"
                    );
                }
            }
        }
    }

    #[test]
    fn clear_errors() {
        let c: &dyn Fn(&str) -> usize = &count;
        let mut g = Generator::new(c, None, 0);
        assert_eq!(
            g.sample(TaskKind::SingleText, 1000, 0, 1, 1),
            Err(TaskError::NoHaystack(TaskKind::SingleText))
        );
        assert!(matches!(
            g.sample(TaskKind::MultiKey, 20, 0, 1, 1),
            Err(TaskError::TooShort(20, TaskKind::MultiKey))
        ));
        assert_eq!(
            g.sample(TaskKind::SingleNoise, 1000, 0, 1, 0),
            Err(TaskError::NoQueries)
        );
        assert_eq!(
            "needle".parse::<TaskKind>(),
            Err(TaskError::Unknown("needle".into()))
        );
        assert_eq!("vt".parse::<TaskKind>(), Ok(TaskKind::VariableTracking));
    }
}
