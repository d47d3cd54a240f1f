//! Text for language models: The Time Machine as a stream of character ids, as d2l prepares it.
//!
//! [`Corpus::time_machine`] reads the book (the copy shipped in `data/timemachine.txt`, or a
//! file the caller names), keeps letters only (every run of other characters becomes one
//! space, each line trimmed and lower-cased), and numbers the characters with a [`Vocab`]:
//! `<unk>` is 0, then the characters by falling frequency, ties in order of first appearance —
//! d2l's `Vocab`, so ids equal the book's (28 tokens: `<unk>`, space and 26 letters).
//! [`Corpus::batches`] cuts the stream into d2l's random subsequences of `steps` tokens, each
//! with its target shifted by one.

use std::path::{Path, PathBuf};

use super::batch::shuffled_order;
use crate::diagnostics::{Diag, thousands};

/// Where the shipped copy of The Time Machine lives, relative to the repository root.
pub const TIME_MACHINE: &str = "data/timemachine.txt";

/// The unknown token, id 0.
pub const UNK: &str = "<unk>";

/// Token ↔ id, d2l's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vocab {
    tokens: Vec<String>,
    ids: std::collections::HashMap<String, u32>,
}

impl Vocab {
    /// The vocabulary of `tokens`: `<unk>` first, then by falling count, ties by first use.
    pub fn new<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Vocab {
        Vocab::with(tokens, 0, &[])
    }

    /// d2l's `Vocab(tokens, min_freq, reserved_tokens)`: `<unk>`, then `reserved`, then the
    /// tokens seen at least `min_freq` times by falling count, ties by first use.
    pub fn with<'a>(
        tokens: impl IntoIterator<Item = &'a str>,
        min_freq: usize,
        reserved: &[&str],
    ) -> Vocab {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        let mut index = std::collections::HashMap::new();
        for t in tokens {
            let i = *index.entry(t).or_insert_with(|| {
                counts.push((t, 0));
                counts.len() - 1
            });
            counts[i].1 += 1;
        }
        // Stable: equal counts keep the order of first appearance, as Python's `sorted`.
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        let mut all = vec![UNK.to_string()];
        all.extend(reserved.iter().map(|t| t.to_string()));
        for (t, n) in counts {
            if n < min_freq {
                break;
            }
            if !all.iter().any(|a| a == t) {
                all.push(t.to_string());
            }
        }
        let ids = all
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        Vocab { tokens: all, ids }
    }

    /// Number of tokens, `<unk>` included.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether only `<unk>` is known.
    pub fn is_empty(&self) -> bool {
        self.tokens.len() <= 1
    }

    /// The id of a token (0 when unknown).
    pub fn id(&self, token: &str) -> u32 {
        self.ids.get(token).copied().unwrap_or(0)
    }

    /// The token of an id.
    pub fn token(&self, id: u32) -> &str {
        self.tokens.get(id as usize).map_or(UNK, String::as_str)
    }

    /// Every token, by id.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }
}

/// A text as one stream of token ids.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// The ids, in reading order.
    pub ids: Vec<u32>,
    /// Their vocabulary.
    pub vocab: Vocab,
    /// Where the text came from.
    pub path: PathBuf,
}

/// d2l's cleaning of one line: runs of non-letters become a space; trimmed; lower case.
pub fn clean_line(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut gap = false;
    for c in line.chars() {
        if c.is_ascii_alphabetic() {
            if gap && !out.is_empty() {
                out.push(' ');
            }
            gap = false;
            out.push(c.to_ascii_lowercase());
        } else {
            gap = true;
        }
    }
    out
}

impl Corpus {
    /// The characters of `text`, cleaned line by line and joined without separators (as d2l
    /// does), cut to the first `max_tokens` if given.
    pub fn characters(text: &str, max_tokens: Option<usize>, path: PathBuf) -> Corpus {
        let lines: Vec<String> = text.lines().map(clean_line).collect();
        let chars: Vec<String> = lines
            .iter()
            .flat_map(|l| l.chars().map(String::from))
            .collect();
        let vocab = Vocab::new(chars.iter().map(String::as_str));
        let mut ids: Vec<u32> = chars.iter().map(|c| vocab.id(c)).collect();
        if let Some(n) = max_tokens {
            ids.truncate(n);
        }
        Corpus { ids, vocab, path }
    }

    /// The Time Machine from `path` (default: the shipped copy), d2l's first 10,000 characters
    /// when `max_tokens` says so.
    pub fn time_machine(path: Option<&Path>, max_tokens: Option<usize>) -> Result<Corpus, Diag> {
        let path = path.map_or_else(|| PathBuf::from(TIME_MACHINE), Path::to_path_buf);
        let bytes = std::fs::read(&path).map_err(|e| {
            Diag::new(
                "dlc::data",
                format!("cannot read the text `{}`: {e}", path.display()),
            )
            .help(format!(
                "run from the repository root (the book ships as `{TIME_MACHINE}`), or pass --data <file>"
            ))
        })?;
        let text = String::from_utf8_lossy(&bytes);
        let corpus = Corpus::characters(&text, max_tokens, path.clone());
        if corpus.ids.len() < 2 || corpus.vocab.is_empty() {
            return Err(Diag::new(
                "dlc::data",
                format!("`{}` holds no letters to learn from", path.display()),
            )
            .help("pass a plain-text file with English text"));
        }
        Ok(corpus)
    }

    /// One epoch of d2l's random sampling: the stream from a random offset below `steps`, cut
    /// into subsequences of `steps` tokens, visited in a random order, `batch` at a time
    /// (a last partial batch is dropped). Each batch is `(inputs, targets)`, both
    /// `batch × steps` ids row by row, the targets one token ahead.
    pub fn batches(
        &self,
        batch: usize,
        steps: usize,
        seed: u64,
        epoch: u64,
    ) -> Vec<(Vec<u32>, Vec<u32>)> {
        let offset = shuffled_order(steps.max(1), seed ^ 0x7E47, epoch)[0];
        let stream = &self.ids[offset.min(self.ids.len())..];
        let count = stream.len().saturating_sub(1) / steps.max(1);
        let order = shuffled_order(count, seed, epoch);
        order
            .chunks_exact(batch.max(1))
            .map(|starts| {
                let mut x = Vec::with_capacity(batch * steps);
                let mut y = Vec::with_capacity(batch * steps);
                for &s in starts {
                    let at = s * steps;
                    x.extend_from_slice(&stream[at..at + steps]);
                    y.extend_from_slice(&stream[at + 1..at + steps + 1]);
                }
                (x, y)
            })
            .collect()
    }

    /// How many batches [`Corpus::batches`] gives at most.
    pub fn batches_per_epoch(&self, batch: usize, steps: usize) -> usize {
        self.ids.len().saturating_sub(steps) / steps.max(1) / batch.max(1)
    }

    /// Describes the corpus for the run's log.
    pub fn describe(&self) -> String {
        format!(
            "{} ({} characters, vocabulary of {})",
            self.path.display(),
            thousands(self.ids.len() as u64),
            self.vocab.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cleaned_like_d2l() {
        assert_eq!(
            clean_line("  The Time Traveller (for so"),
            "the time traveller for so"
        );
        assert_eq!(clean_line("--"), "");
        assert_eq!(clean_line("it's 1895!"), "it s");
    }

    #[test]
    fn vocab_orders_by_count_then_first_use() {
        let v = Vocab::new(["b", "a", "a", "c", "b", "d"]);
        assert_eq!(v.tokens(), ["<unk>", "b", "a", "c", "d"]);
        assert_eq!(v.id("a"), 2);
        assert_eq!(v.id("zzz"), 0);
        assert_eq!(v.token(4), "d");
    }

    #[test]
    fn the_time_machine_has_d2ls_vocabulary() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(TIME_MACHINE);
        let c = Corpus::time_machine(Some(&path), Some(10_000)).unwrap();
        assert_eq!(c.vocab.len(), 28);
        assert_eq!(c.ids.len(), 10_000);
        // d2l: vocab.idx_to_token[:10] and the first tokens of the corpus.
        assert_eq!(
            &c.vocab.tokens()[..10],
            ["<unk>", " ", "e", "t", "a", "i", "n", "o", "s", "h"]
        );
        let first: String = c.ids[..16].iter().map(|&i| c.vocab.token(i)).collect();
        assert_eq!(first, "the time machine");
    }

    #[test]
    fn batches_pair_each_input_with_the_next_token() {
        let c = Corpus::characters("abcdefghijklmnopqrstuvwxyz", None, PathBuf::new());
        let batches = c.batches(2, 5, 1, 0);
        assert_eq!(batches.len(), c.batches_per_epoch(2, 5).min(batches.len()));
        assert!(!batches.is_empty());
        let mut seen = std::collections::HashSet::new();
        for (x, y) in &batches {
            assert_eq!(x.len(), 10);
            for (row_x, row_y) in x.chunks(5).zip(y.chunks(5)) {
                assert!(
                    seen.insert(row_x.to_vec()),
                    "each subsequence once per epoch"
                );
                let text: String = row_x.iter().map(|&i| c.vocab.token(i)).collect();
                let next: String = row_y.iter().map(|&i| c.vocab.token(i)).collect();
                assert_eq!(&text[1..], &next[..4]);
            }
        }
        assert_ne!(
            c.batches(2, 5, 1, 0),
            c.batches(2, 5, 1, 1),
            "epochs differ"
        );
    }
}
