//! Source files, spans and the one diagnostic type every stage reports with.
//!
//! A [`Diag`] carries a stable code (`dlc::...`), a message, labelled spans and a help
//! line. The source text is attached once, at the API boundary, by [`Sources::attach`].

use std::fmt;
use std::sync::Arc;

use miette::{
    Diagnostic, GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource, SourceCode,
};

/// Index of a file in [`Sources`].
pub type FileId = u32;

/// A byte range in one source file (offsets fit in 32 bits: files are limited to 1 GiB).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Span {
    /// The file the range is in.
    pub file: FileId,
    /// First byte.
    pub start: u32,
    /// One past the last byte.
    pub end: u32,
}

impl Span {
    /// A span in `file` from `start` to `end`.
    pub fn new(file: FileId, start: usize, end: usize) -> Self {
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Span {
            file,
            start: clamp(start),
            end: clamp(end),
        }
    }

    /// The smallest span covering both (same file assumed).
    pub fn to(self, other: Span) -> Span {
        Span {
            file: self.file,
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }

    /// The byte range.
    pub fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }

    /// The same span moved `offset` bytes later.
    pub fn shifted(self, offset: usize) -> Span {
        Span::new(
            self.file,
            self.start as usize + offset,
            self.end as usize + offset,
        )
    }
}

/// One loaded source file.
#[derive(Debug)]
pub struct SourceFile {
    /// The path as the user gave it (or as resolved from a `use`).
    pub path: String,
    /// The text; invalid UTF-8 is replaced so that diagnostics can still show it.
    pub text: Arc<str>,
    named: Arc<NamedSource<Arc<str>>>,
}

/// Every file loaded for one compilation.
#[derive(Debug, Default)]
pub struct Sources {
    files: Vec<SourceFile>,
}

impl Sources {
    /// Adds a file and returns its id.
    pub fn add(&mut self, path: impl Into<String>, text: impl Into<Arc<str>>) -> FileId {
        let path = path.into();
        let text: Arc<str> = text.into();
        let named = Arc::new(NamedSource::new(path.clone(), text.clone()));
        self.files.push(SourceFile { path, text, named });
        (self.files.len() - 1) as FileId
    }

    /// The file with this id.
    pub fn file(&self, id: FileId) -> &SourceFile {
        &self.files[id as usize]
    }

    /// Every loaded file, in load order.
    pub fn files(&self) -> impl Iterator<Item = &SourceFile> {
        self.files.iter()
    }

    /// The id of an already loaded path.
    pub fn find(&self, path: &str) -> Option<FileId> {
        self.files
            .iter()
            .position(|f| f.path == path)
            .map(|i| i as FileId)
    }

    /// The text a span covers.
    pub fn slice(&self, span: Span) -> &str {
        let text = &self.file(span.file).text;
        text.get(span.range()).unwrap_or("")
    }

    /// Attaches the source of the diagnostic's primary span so that it renders with context.
    pub fn attach(&self, mut diag: Diag) -> Diag {
        if let Some((span, _)) = diag.labels.first()
            && let Some(file) = self.files.get(span.file as usize)
        {
            let file_id = span.file;
            diag.source = Some(file.named.clone());
            // Labels in other files cannot be drawn on this source: fold them into the help.
            let (here, elsewhere): (Vec<_>, Vec<_>) =
                diag.labels.drain(..).partition(|(s, _)| s.file == file_id);
            diag.labels = here;
            for (s, text) in elsewhere {
                let other = self.file(s.file);
                let line = other.text[..(s.start as usize).min(other.text.len())]
                    .lines()
                    .count()
                    .max(1);
                let note = format!("{text} ({}:{line})", other.path);
                diag.help = Some(match diag.help.take() {
                    Some(h) => format!("{h}\n{note}"),
                    None => note,
                });
            }
        }
        diag
    }
}

/// A compiler diagnostic: code, message, labelled spans, help.
#[derive(Debug, Clone)]
pub struct Diag {
    /// Stable code such as `dlc::shape_mismatch`.
    pub code: &'static str,
    /// One-line description of what is wrong.
    pub message: String,
    /// Labelled spans; the first is the primary one.
    pub labels: Vec<(Span, String)>,
    /// What to do about it.
    pub help: Option<String>,
    source: Option<Arc<NamedSource<Arc<str>>>>,
}

impl Diag {
    /// A diagnostic with a code and message and no labels yet.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Diag {
            code,
            message: message.into(),
            labels: Vec::new(),
            help: None,
            source: None,
        }
    }

    /// Adds a labelled span.
    pub fn label(mut self, span: Span, text: impl Into<String>) -> Self {
        self.labels.push((span, text.into()));
        self
    }

    /// Sets the help line.
    pub fn help(mut self, text: impl Into<String>) -> Self {
        self.help = Some(text.into());
        self
    }

    /// The primary span, if any.
    pub fn span(&self) -> Option<Span> {
        self.labels.first().map(|(s, _)| *s)
    }

    /// Renders without colour at a fixed width: the form used by snapshot tests.
    pub fn render_plain(&self, width: usize) -> String {
        let handler = GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor())
            .with_width(width)
            .with_links(false);
        let mut out = String::new();
        if handler.render_report(&mut out, self).is_err() {
            out = format!("{self}");
        }
        out
    }
}

impl fmt::Display for Diag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Diag {}

impl Diagnostic for Diag {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.code))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn SourceCode> {
        self.source.as_deref().map(|s| s as &dyn SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        if self.source.is_none() || self.labels.is_empty() {
            return None;
        }
        Some(Box::new(self.labels.iter().enumerate().map(
            |(i, (span, text))| {
                let len = span.range().len();
                let label = (!text.is_empty()).then(|| text.clone());
                if i == 0 {
                    LabeledSpan::new_primary_with_span(label, (span.start as usize, len))
                } else {
                    LabeledSpan::new_with_span(label, (span.start as usize, len))
                }
            },
        )))
    }
}

/// Formats an integer with thousands separators: `25,557,032`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The closest candidate to `name`, if one is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let prefix =
        |c: &str| name.len().min(c.len()) >= 3 && (name.starts_with(c) || c.starts_with(name));
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(name, c), c))
        .filter(|(d, c)| {
            (*d <= 2.max(name.len().min(c.len()) / 3) && *d < name.len().max(1)) || prefix(c)
        })
        .min_by_key(|(d, c)| (*d, *c))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(25557032), "25,557,032");
    }

    #[test]
    fn did_you_mean_finds_typos_only() {
        assert_eq!(
            did_you_mean("covn", ["conv", "linear", "relu"]),
            Some("conv")
        );
        assert_eq!(
            did_you_mean("maxpol", ["maxpool", "avgpool"]),
            Some("maxpool")
        );
        assert_eq!(did_you_mean("transformer", ["conv", "relu"]), None);
        assert_eq!(
            did_you_mean("batchsize", ["batch", "epochs"]),
            Some("batch")
        );
    }
}
