//! Sentence pairs for translation models: English–French from the Tatoeba corpus, prepared as
//! d2l's `load_data_nmt` does.
//!
//! The text (the 20,000 first pairs ship as `data/fra-eng-20k.txt`) is lower-cased, its
//! non-breaking spaces become spaces, and a space is put before `, . ! ?` where none is; each
//! line `english<TAB>french` is split on spaces into words. The first `count` + 1 lines are
//! read (d2l's loop stops *after* line `count`, so 600 gives 601 pairs). Each side gets a
//! [`Vocab`] of the words seen at least twice, after `<unk>`, `<pad>`, `<bos>`, `<eos>`; each
//! sentence becomes its ids plus `<eos>`, cut or padded with `<pad>` to `steps`.

use std::path::{Path, PathBuf};

use super::text::Vocab;
use crate::diagnostics::{Diag, thousands};

/// Where the shipped pairs live, relative to the repository root.
pub const FRA_ENG: &str = "data/fra-eng-20k.txt";

/// The reserved tokens after `<unk>`, in d2l's order.
pub const RESERVED: [&str; 3] = ["<pad>", "<bos>", "<eos>"];

/// Padding, begin-of-sequence and end-of-sequence ids (the reserved tokens' places).
pub const PAD: u32 = 1;
/// Begin of sequence.
pub const BOS: u32 = 2;
/// End of sequence.
pub const EOS: u32 = 3;

/// d2l's `preprocess_nmt`: lower case, non-breaking spaces to spaces, a space before
/// punctuation that follows a non-space.
pub fn preprocess(text: &str) -> String {
    let text = text.replace(['\u{202f}', '\u{a0}'], " ").to_lowercase();
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    let mut prev: Option<char> = None;
    for c in text.chars() {
        if matches!(c, ',' | '.' | '!' | '?') && prev.is_some_and(|p| p != ' ') {
            out.push(' ');
        }
        out.push(c);
        prev = Some(c);
    }
    out
}

/// One side of the pairs as fixed-length rows of ids.
#[derive(Clone, Debug)]
pub struct Side {
    /// Its vocabulary.
    pub vocab: Vocab,
    /// `rows × steps` ids, row by row.
    pub ids: Vec<u32>,
    /// Tokens before the padding in each row (`<eos>` included).
    pub valid: Vec<usize>,
}

impl Side {
    fn new(sentences: &[Vec<&str>], steps: usize) -> Side {
        let vocab = Vocab::with(sentences.iter().flatten().copied(), 2, &RESERVED);
        let mut ids = Vec::with_capacity(sentences.len() * steps);
        let mut valid = Vec::with_capacity(sentences.len());
        for s in sentences {
            let row = vocab.encode(s, steps);
            valid.push(row.iter().filter(|&&t| t != PAD).count());
            ids.extend(row);
        }
        Side { vocab, ids, valid }
    }
}

impl Vocab {
    /// A sentence's ids plus `<eos>`, cut or padded with `<pad>` to `steps`.
    pub fn encode(&self, words: &[&str], steps: usize) -> Vec<u32> {
        let mut row: Vec<u32> = words.iter().map(|w| self.id(w)).collect();
        row.push(EOS);
        row.resize(steps, PAD);
        row
    }
}

/// Source and target sentences, aligned row by row.
#[derive(Clone, Debug)]
pub struct Pairs {
    /// English.
    pub src: Side,
    /// French.
    pub tgt: Side,
    /// Tokens per row.
    pub steps: usize,
    /// Where they came from.
    pub path: PathBuf,
}

impl Pairs {
    /// The pairs of `text` (already [`preprocess`]ed or not), d2l's first `count` + 1 lines.
    pub fn from_text(text: &str, count: usize, steps: usize, path: PathBuf) -> Pairs {
        let text = preprocess(text);
        let mut src = Vec::new();
        let mut tgt = Vec::new();
        for line in text.split('\n').take(count + 1) {
            let parts: Vec<&str> = line.split('\t').collect();
            if let [s, t] = parts.as_slice() {
                src.push(s.split(' ').collect::<Vec<_>>());
                tgt.push(t.split(' ').collect::<Vec<_>>());
            }
        }
        Pairs {
            src: Side::new(&src, steps),
            tgt: Side::new(&tgt, steps),
            steps,
            path,
        }
    }

    /// The pairs from `path` (default: the shipped file).
    pub fn load(path: Option<&Path>, count: usize, steps: usize) -> Result<Pairs, Diag> {
        let path = path.map_or_else(|| PathBuf::from(FRA_ENG), Path::to_path_buf);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Diag::new(
                "dlc::data",
                format!("cannot read the sentence pairs `{}`: {e}", path.display()),
            )
            .help(format!(
                "run from the repository root (the pairs ship as `{FRA_ENG}`), or pass --data <file> with lines `source<TAB>target`"
            ))
        })?;
        let pairs = Pairs::from_text(&text, count, steps, path.clone());
        if pairs.is_empty() {
            return Err(Diag::new(
                "dlc::data",
                format!("`{}` holds no `source<TAB>target` lines", path.display()),
            )
            .help("each line is a sentence, a tab, and its translation"));
        }
        Ok(pairs)
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.src.valid.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `rows` of one side, concatenated.
    pub fn rows(side: &Side, rows: &[usize], steps: usize) -> Vec<u32> {
        rows.iter()
            .flat_map(|&r| side.ids[r * steps..(r + 1) * steps].iter().copied())
            .collect()
    }

    /// Describes the pairs for the run's log.
    pub fn describe(&self) -> String {
        format!(
            "{} ({} pairs, vocabularies {} → {}, {} tokens a sentence)",
            self.path.display(),
            thousands(self.len() as u64),
            self.src.vocab.len(),
            self.tgt.vocab.len(),
            self.steps
        )
    }
}

/// d2l's BLEU of a predicted token sequence against one reference, with n-grams up to `k`:
/// a brevity penalty `exp(min(0, 1 − len_ref / len_pred))` times the n-gram precisions
/// `p_n`, each raised to `1 / 2^n`.
pub fn bleu(pred: &[&str], reference: &[&str], k: usize) -> f64 {
    let (lp, lr) = (pred.len(), reference.len());
    if lp == 0 {
        return 0.0;
    }
    let mut score = (1.0f64 - lr as f64 / lp as f64).min(0.0).exp();
    for n in 1..=k.min(lp) {
        let mut subs: std::collections::HashMap<&[&str], usize> = Default::default();
        for g in reference.windows(n) {
            *subs.entry(g).or_default() += 1;
        }
        let mut matches = 0;
        for g in pred.windows(n) {
            if let Some(c) = subs.get_mut(g).filter(|c| **c > 0) {
                *c -= 1;
                matches += 1;
            }
        }
        let p = matches as f64 / (lp + 1 - n) as f64;
        score *= p.powf(0.5f64.powi(n as i32));
    }
    score
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocessing_spaces_punctuation_like_d2l() {
        assert_eq!(preprocess("Go.\tVa !"), "go .\tva !");
        assert_eq!(preprocess("Hi,\u{a0}Tom!"), "hi , tom !");
    }

    #[test]
    fn the_shipped_pairs_have_d2ls_vocabularies() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(FRA_ENG);
        let p = Pairs::load(Some(&path), 600, 10).unwrap();
        assert_eq!(p.len(), 601);
        assert_eq!(p.src.vocab.len(), 184);
        assert_eq!(p.tgt.vocab.len(), 201);
        assert_eq!(
            &p.src.vocab.tokens()[..12],
            [
                "<unk>", "<pad>", "<bos>", "<eos>", ".", "!", "i", "i'm", "it", "go", "tom", "?"
            ]
        );
        // "go ." → go, ., <eos>, then padding.
        let go = &p.src.ids[..10];
        assert_eq!(go[..3], [p.src.vocab.id("go"), p.src.vocab.id("."), EOS]);
        assert!(go[3..].iter().all(|&t| t == PAD));
        assert_eq!(p.src.valid[0], 3);
    }

    #[test]
    fn bleu_matches_d2l() {
        let r = ["il", "est", "calme", "."];
        assert_eq!(bleu(&r, &r, 2), 1.0);
        // d2l: "il est bon ." for "il est calme ." with k = 2 gives 0.658.
        let b = bleu(&["il", "est", "bon", "."], &r, 2);
        assert!((b - 0.658).abs() < 1e-3, "{b}");
        assert_eq!(bleu(&[], &r, 2), 0.0);
    }
}
