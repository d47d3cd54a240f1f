//! Parsing: the pest grammar (`grammar/dlc.pest`) and the construction of the spanned AST.
//!
//! Nothing here panics on bad input: pairs are taken with [`Children::take`], which turns a
//! grammar/AST disagreement into an internal diagnostic, and deeply nested or very long input
//! is refused with a diagnostic before it could exhaust the stack.

pub mod ast;

use pest::Parser as _;
use pest::error::{ErrorVariant, InputLocation};
use pest::iterators::{Pair, Pairs};
use pest_derive::Parser;

use crate::diagnostics::{Diag, FileId, Span};
use ast::*;

/// The pest parser generated from `grammar/dlc.pest`.
#[derive(Parser)]
#[grammar = "../grammar/dlc.pest"]
pub struct DlcParser;

/// Deepest bracket nesting accepted.
pub const MAX_NESTING: usize = 128;
/// Most operands accepted in one expression.
pub const MAX_OPERANDS: usize = 4096;

/// Parses a whole file.
pub fn parse_file(text: &str, file: FileId) -> Result<File, Diag> {
    check_nesting(text, file)?;
    let mut pairs = DlcParser::parse(Rule::file, text).map_err(|e| syntax_error(e, text, file))?;
    let b = Builder { file };
    let root = pairs
        .next()
        .ok_or_else(|| internal(Span::new(file, 0, 0), "empty parse"))?;
    b.file(root)
}

/// Parses one expression: the holes of label templates (`"layer{i + 1}"`) and `--set` values.
/// `offset` is added to every span so that they point into the enclosing text.
pub fn parse_expr(text: &str, file: FileId, offset: usize) -> Result<Expr, Diag> {
    check_nesting(text, file).map_err(|d| shift(d, offset))?;
    let whole = format!("{text}\n");
    let mut pairs = DlcParser::parse(Rule::expr, &whole)
        .map_err(|e| shift(syntax_error(e, &whole, file), offset))?;
    let pair = pairs
        .next()
        .ok_or_else(|| internal(Span::new(file, offset, offset), "empty parse"))?;
    if pair.as_str().trim_end().len() != text.trim_end().len() {
        let at = offset + pair.as_str().len();
        return Err(
            Diag::new("dlc::syntax", "unexpected text after the expression")
                .label(
                    Span::new(file, at, offset + text.len()),
                    "not part of the expression",
                )
                .help("write a single expression"),
        );
    }
    let b = Builder { file };
    let e = b.expr(pair).map_err(|d| shift(d, offset))?;
    Ok(shift_expr(e, offset))
}

fn shift(mut d: Diag, offset: usize) -> Diag {
    for (s, _) in &mut d.labels {
        *s = s.shifted(offset);
    }
    d
}

fn shift_expr(mut e: Expr, offset: usize) -> Expr {
    fn go(e: &mut Expr, o: usize) {
        e.span = e.span.shifted(o);
        match &mut e.kind {
            ExprKind::List(xs) | ExprKind::Tuple(xs) => xs.iter_mut().for_each(|x| go(x, o)),
            ExprKind::Field(x, id) => {
                go(x, o);
                id.span = id.span.shifted(o);
            }
            ExprKind::Index(a, b) | ExprKind::Binary(_, a, b) => {
                go(a, o);
                go(b, o);
            }
            ExprKind::Call(f, args) => {
                go(f, o);
                for a in args {
                    a.span = a.span.shifted(o);
                    go(&mut a.value, o);
                }
            }
            ExprKind::Unary(_, x) => go(x, o),
            // Bodies cannot occur inside a one-line hole in practice; keep their spans.
            ExprKind::If(i) => go(&mut i.cond, o),
            _ => {}
        }
    }
    go(&mut e, offset);
    e
}

/// Refuses bracket nesting deeper than [`MAX_NESTING`] before the recursive parser sees it.
fn check_nesting(text: &str, file: FileId) -> Result<(), Diag> {
    match open_brackets(text, text.len()) {
        Err(at) => Err(Diag::new(
            "dlc::too_deep",
            format!("brackets nested more than {MAX_NESTING} levels deep"),
        )
        .label(Span::new(file, at, at + 1), "this bracket is too deep")
        .help("split the expression with `let` bindings or blocks")),
        Ok(_) => Ok(()),
    }
}

/// Positions of the brackets still open at byte `stop`, skipping strings and comments;
/// `Err(position)` of the first bracket deeper than [`MAX_NESTING`].
fn open_brackets(text: &str, stop: usize) -> Result<Vec<usize>, usize> {
    let bytes = text.as_bytes();
    let stop = stop.min(bytes.len());
    let mut open = Vec::new();
    let mut i = 0;
    while i < stop {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < stop && bytes[i] != b'"' && bytes[i] != b'\n' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < stop && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < stop && !(bytes[i] == b'*' && bytes[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b'(' | b'[' | b'{' => {
                open.push(i);
                if open.len() > MAX_NESTING {
                    return Err(i);
                }
            }
            b')' | b']' | b'}' => {
                open.pop();
            }
            _ => {}
        }
        i += 1;
    }
    Ok(open)
}

fn internal(span: Span, what: &str) -> Diag {
    Diag::new("dlc::internal", format!("internal parser error: {what}"))
        .label(span, "here")
        .help("this is a bug in dlc; please report it with this file")
}

/// Describes what the parser expected, in words.
fn rule_words(rule: Rule) -> Option<&'static str> {
    use Rule::*;
    Some(match rule {
        EOI => "end of file",
        ident => "a name",
        int | float => "a number",
        string => "a string",
        use_item | block_item | model_item | variant_item => "`use`, `block` or `model`",
        params => "`(`",
        param => "a parameter name",
        body | group => "`{`",
        input_stmt | kw_input => "`input`",
        output_stmt | kw_output => "`output`",
        train_stmt | kw_train => "`train`",
        setting => "a setting `name: value`",
        let_stmt | kw_let => "`let`",
        chain | term => "a layer",
        label => "a layer name",
        dims => "`[`",
        repeat_t | kw_repeat => "`repeat`",
        for_t | kw_for => "`for`",
        dense_t | kw_dense => "`dense`",
        residual_t | kw_residual => "`residual`",
        shortcut | kw_shortcut => "`shortcut`",
        concat_t | kw_concat => "`concat`",
        branch | kw_branch => "`branch`",
        tuple_pattern => "`(`",
        expr | unary | postfixed | primary | neg | not | kw_not | list | paren | kw_true
        | kw_false | kw_in => "an expression",
        call_args => "`(`",
        arg => "an argument",
        field => "`.`",
        index => "`[`",
        if_expr | kw_if => "`if`",
        kw_else => "`else`",
        comma => "`,`",
        range | or | and | eq | ne | le | ge | lt | gt | add | sub | mul | div | rem | kw_or
        | kw_and => "an operator",
        kw_use => "`use`",
        kw_block => "`block`",
        kw_model => "`model`",
        keyword => "a keyword",
        _ => return None,
    })
}

fn syntax_error(e: pest::error::Error<Rule>, text: &str, file: FileId) -> Diag {
    let pos = match e.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    };
    let found = found_at(text, pos);
    let end = pos + found.len().max(if pos < text.len() { 1 } else { 0 });
    let open = open_brackets(text, pos).unwrap_or_default();
    let innermost = open.last().copied();
    let (message, label) = match &e.variant {
        ErrorVariant::ParsingError {
            positives,
            negatives,
        } => {
            let mut words: Vec<&str> = positives.iter().filter_map(|r| rule_words(*r)).collect();
            // Punctuation is not a rule, so pest cannot name it: infer it from the open bracket.
            if let Some(&b) = innermost.and_then(|at| text.as_bytes().get(at)) {
                words.extend(match b {
                    b'[' => ["`,`", "`]`"],
                    b'(' => ["`,`", "`)`"],
                    _ => ["a new line", "`}`"],
                });
            }
            words.sort();
            words.dedup();
            if words.contains(&"a name") && is_keyword(&found) {
                return Diag::new(
                    "dlc::syntax",
                    format!("`{found}` is a keyword and cannot be used as a name"),
                )
                .label(Span::new(file, pos, end.min(text.len())), "keyword")
                .help("choose another name");
            }
            if words.is_empty() && !negatives.is_empty() {
                let what = if negatives.contains(&Rule::keyword) {
                    "a keyword cannot be used as a name"
                } else {
                    "unexpected text"
                };
                (what.to_string(), "not allowed here".to_string())
            } else {
                let expected = join_words(&words);
                (
                    format!("expected {expected}, found {}", describe(&found)),
                    format!("expected {expected}"),
                )
            }
        }
        ErrorVariant::CustomError { message } => (message.clone(), "here".to_string()),
    };
    let help = if found == "}" || found == ")" || found == "]" {
        "check that every bracket is closed where you meant it to be"
    } else if found.is_empty() {
        "the file ends in the middle of a definition: is a `}` missing?"
    } else {
        "see docs/language.md for the syntax of models, blocks and layers"
    };
    let mut d =
        Diag::new("dlc::syntax", message).label(Span::new(file, pos, end.min(text.len())), label);
    if found.is_empty()
        && let Some(at) = innermost
    {
        d = d.label(Span::new(file, at, at + 1), "this bracket is never closed");
    }
    d.help(help)
}

fn is_keyword(word: &str) -> bool {
    DlcParser::parse(Rule::keyword, word).is_ok_and(|p| p.as_str() == word)
}

fn join_words(words: &[&str]) -> String {
    match words {
        [] => "something else".to_string(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// The token at `pos`, roughly: a word, a number or one character.
fn found_at(text: &str, pos: usize) -> String {
    let rest = text.get(pos..).unwrap_or("");
    let mut chars = rest.chars();
    match chars.next() {
        None => String::new(),
        Some(c) if c.is_alphanumeric() || c == '_' => rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .take(40)
            .collect(),
        Some(c) => c.to_string(),
    }
}

fn describe(found: &str) -> String {
    match found {
        "" => "end of file".to_string(),
        "\n" => "end of line".to_string(),
        s if s.chars().all(|c| c.is_control() || c == '\u{fffd}') => "unreadable bytes".to_string(),
        s => format!("`{s}`"),
    }
}

/// Children of a pair, taken one at a time without panicking.
struct Children<'i> {
    pairs: Pairs<'i, Rule>,
    span: Span,
}

impl<'i> Children<'i> {
    fn take(&mut self) -> Result<Pair<'i, Rule>, Diag> {
        self.pairs
            .next()
            .ok_or_else(|| internal(self.span, "missing child"))
    }

    fn peek_rule(&self) -> Option<Rule> {
        self.pairs.peek().map(|p| p.as_rule())
    }

    fn take_if(&mut self, rule: Rule) -> Option<Pair<'i, Rule>> {
        if self.peek_rule() == Some(rule) {
            self.pairs.next()
        } else {
            None
        }
    }
}

/// Where a pair's content ends: its end, less the whitespace and comments that pest's
/// implicit skipping may have consumed after its last token.
fn content_end(p: &Pair<Rule>) -> usize {
    let text = p.as_str();
    let mut end = text.len();
    loop {
        let t = text[..end].trim_end();
        let cut = if let Some(open) = t.strip_suffix("*/").and_then(|b| b.rfind("/*")) {
            open
        } else {
            let line = t.rfind('\n').map_or(0, |i| i + 1);
            match line_comment(&t[line..]) {
                Some(at) => line + at,
                None => t.len(),
            }
        };
        if cut == end {
            return p.as_span().start() + end;
        }
        end = cut;
    }
}

/// Where a `//` comment starts on a line, outside string literals.
fn line_comment(line: &str) -> Option<usize> {
    let bytes = line.as_bytes();
    let (mut i, mut in_string) = (0, false);
    while i < bytes.len() {
        match (bytes[i], in_string) {
            (b'\\', true) => i += 1,
            (b'"', _) => in_string = !in_string,
            (b'/', false) if bytes.get(i + 1) == Some(&b'/') => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Turns pairs into AST nodes with spans in one file.
struct Builder {
    file: FileId,
}

impl Builder {
    /// The pair's source, without the whitespace and comments that pest's implicit skipping
    /// leaves at its end (so `conv(3)   // note` underlines only `conv(3)`).
    fn span(&self, p: &Pair<Rule>) -> Span {
        let s = p.as_span();
        Span::new(self.file, s.start(), content_end(p))
    }

    fn children<'i>(&self, p: Pair<'i, Rule>) -> Children<'i> {
        let span = self.span(&p);
        Children {
            pairs: p.into_inner(),
            span,
        }
    }

    fn file(&self, p: Pair<Rule>) -> Result<File, Diag> {
        let mut items = Vec::new();
        for item in p.into_inner() {
            let span = self.span(&item);
            items.push(match item.as_rule() {
                Rule::use_item => {
                    let mut c = self.children(item);
                    c.take()?; // `use`
                    let s = c.take()?;
                    Item::Use {
                        path: unescape(s.as_str()),
                        span,
                    }
                }
                Rule::block_item => Item::Block(self.def(item)?),
                Rule::model_item => Item::Model(self.def(item)?),
                Rule::variant_item => {
                    let mut c = self.children(item);
                    c.take()?; // `model`
                    let name = self.ident(c.take()?);
                    let base = self.ident(c.take()?);
                    let args = match c.take_if(Rule::call_args) {
                        Some(a) => self.args(a)?,
                        None => Vec::new(),
                    };
                    Item::Variant {
                        name,
                        base,
                        args,
                        span,
                    }
                }
                Rule::EOI => continue,
                _ => return Err(internal(span, "unexpected item")),
            });
        }
        Ok(File { items })
    }

    fn def(&self, p: Pair<Rule>) -> Result<Def, Diag> {
        let span = self.span(&p);
        let mut c = self.children(p);
        c.take()?; // keyword
        let name = self.ident(c.take()?);
        let params = match c.take_if(Rule::params) {
            Some(ps) => {
                let mut out = Vec::new();
                for param in ps.into_inner() {
                    let mut pc = self.children(param);
                    let name = self.ident(pc.take()?);
                    let default = match pc.take_if(Rule::expr) {
                        Some(e) => Some(self.expr(e)?),
                        None => None,
                    };
                    out.push(Param { name, default });
                }
                out
            }
            None => Vec::new(),
        };
        let body = self.body(c.take()?)?;
        Ok(Def {
            name,
            params,
            body,
            span,
        })
    }

    fn ident(&self, p: Pair<Rule>) -> Ident {
        Ident {
            name: p.as_str().to_string(),
            span: self.span(&p),
        }
    }

    fn body(&self, p: Pair<Rule>) -> Result<Body, Diag> {
        let span = self.span(&p);
        let mut stmts = Vec::new();
        for s in p.into_inner() {
            stmts.push(self.stmt(s)?);
        }
        Ok(Body { stmts, span })
    }

    fn stmt(&self, p: Pair<Rule>) -> Result<Stmt, Diag> {
        let span = self.span(&p);
        match p.as_rule() {
            Rule::input_stmt => {
                let mut c = self.children(p);
                c.take()?; // `input`
                let name = self.ident(c.take()?);
                let dtype = c.take_if(Rule::ident).map(|d| self.ident(d));
                let dims = c
                    .take()?
                    .into_inner()
                    .map(|e| self.expr(e))
                    .collect::<Result<_, _>>()?;
                Ok(Stmt::Input {
                    name,
                    dtype,
                    dims,
                    span,
                })
            }
            Rule::output_stmt => {
                let mut c = self.children(p);
                c.take()?;
                let name = self.ident(c.take()?);
                let chain = match c.take_if(Rule::chain) {
                    Some(ch) => Some(self.chain(ch)?),
                    None => None,
                };
                Ok(Stmt::Output { name, chain, span })
            }
            Rule::let_stmt => {
                let mut c = self.children(p);
                c.take()?;
                let name = self.ident(c.take()?);
                let chain = self.chain(c.take()?)?;
                Ok(Stmt::Let { name, chain, span })
            }
            Rule::train_stmt => {
                let mut settings = Vec::new();
                for setting in p.into_inner().filter(|q| q.as_rule() == Rule::setting) {
                    let mut c = self.children(setting);
                    let name = self.ident(c.take()?);
                    settings.push((name, self.expr(c.take()?)?));
                }
                Ok(Stmt::Train { settings, span })
            }
            Rule::chain => Ok(Stmt::Chain(self.chain(p)?)),
            _ => Err(internal(span, "unexpected statement")),
        }
    }

    fn chain(&self, p: Pair<Rule>) -> Result<Chain, Diag> {
        let span = self.span(&p);
        let terms = p
            .into_inner()
            .map(|t| self.term(t))
            .collect::<Result<_, _>>()?;
        Ok(Chain { terms, span })
    }

    fn term(&self, p: Pair<Rule>) -> Result<Term, Diag> {
        let span = self.span(&p);
        let mut c = self.children(p);
        let label = match c.take_if(Rule::label) {
            Some(l) => {
                let inner = self.children(l).take()?;
                Some(match inner.as_rule() {
                    Rule::ident | Rule::path => Label::Name(self.ident(inner)),
                    _ => {
                        let s = self.span(&inner);
                        let raw = inner.as_str();
                        let text = raw
                            .get(1..raw.len().saturating_sub(1))
                            .unwrap_or("")
                            .to_string();
                        Label::Template(
                            text,
                            Span {
                                file: self.file,
                                start: s.start + 1,
                                end: s.end.saturating_sub(1),
                            },
                        )
                    }
                })
            }
            None => None,
        };
        let kind = self.term_kind(c.take()?)?;
        Ok(Term { label, kind, span })
    }

    fn term_kind(&self, p: Pair<Rule>) -> Result<TermKind, Diag> {
        let span = self.span(&p);
        Ok(match p.as_rule() {
            Rule::repeat_t => self.repeat(p, false)?,
            Rule::for_t => self.for_loop(p, false)?,
            Rule::dense_t => {
                let mut c = self.children(p);
                c.take()?; // `dense`
                let inner = c.take()?;
                match inner.as_rule() {
                    Rule::repeat_t => self.repeat(inner, true)?,
                    _ => self.for_loop(inner, true)?,
                }
            }
            Rule::residual_t => {
                let mut c = self.children(p);
                c.take()?; // `residual`
                let cond = match c.take_if(Rule::kw_if) {
                    Some(_) => Some(Box::new(self.expr(c.take()?)?)),
                    None => None,
                };
                let body = self.body(c.take()?)?;
                let shortcut = match c.take_if(Rule::shortcut) {
                    Some(s) => {
                        let sspan = self.span(&s);
                        let mut sc = self.children(s);
                        sc.take()?; // `shortcut`
                        let cond = match sc.take_if(Rule::kw_if) {
                            Some(_) => Some(self.expr(sc.take()?)?),
                            None => None,
                        };
                        let body = self.body(sc.take()?)?;
                        Some(Box::new(Shortcut {
                            cond,
                            body,
                            span: sspan,
                        }))
                    }
                    None => None,
                };
                TermKind::Residual {
                    cond,
                    body,
                    shortcut,
                }
            }
            Rule::concat_t => {
                let mut c = self.children(p);
                c.take()?; // `concat`
                let args = match c.take_if(Rule::call_args) {
                    Some(a) => self.args(a)?,
                    None => Vec::new(),
                };
                let mut branches = Vec::new();
                while let Some(b) = c.take_if(Rule::branch) {
                    let mut bc = self.children(b);
                    bc.take()?; // `branch`
                    branches.push(self.body(bc.take()?)?);
                }
                TermKind::Concat {
                    args,
                    branches,
                    span,
                }
            }
            Rule::group => TermKind::Group(self.body(self.children(p).take()?)?),
            Rule::expr => TermKind::Expr(self.expr(p)?),
            _ => return Err(internal(span, "unexpected term")),
        })
    }

    fn repeat(&self, p: Pair<Rule>, dense: bool) -> Result<TermKind, Diag> {
        let mut c = self.children(p);
        c.take()?; // `repeat`
        let count = self.expr(c.take()?)?;
        let body = self.body(c.take()?)?;
        Ok(TermKind::Repeat {
            count: Box::new(count),
            body,
            dense,
        })
    }

    fn for_loop(&self, p: Pair<Rule>, dense: bool) -> Result<TermKind, Diag> {
        let mut c = self.children(p);
        c.take()?; // `for`
        let pattern = self.pattern(c.take()?)?;
        c.take()?; // `in`
        let iter = self.expr(c.take()?)?;
        let body = self.body(c.take()?)?;
        Ok(TermKind::For {
            pattern,
            iter: Box::new(iter),
            body,
            dense,
        })
    }

    fn pattern(&self, p: Pair<Rule>) -> Result<Pattern, Diag> {
        match p.as_rule() {
            Rule::ident => Ok(Pattern::Name(self.ident(p))),
            _ => {
                let span = self.span(&p);
                let parts = p
                    .into_inner()
                    .map(|q| self.pattern(q))
                    .collect::<Result<_, _>>()?;
                Ok(Pattern::Tuple(parts, span))
            }
        }
    }

    fn args(&self, p: Pair<Rule>) -> Result<Vec<Arg>, Diag> {
        let mut out = Vec::new();
        for a in p.into_inner() {
            let span = self.span(&a);
            let mut c = self.children(a);
            let name = c.take_if(Rule::ident).map(|i| self.ident(i));
            let value = self.expr(c.take()?)?;
            out.push(Arg { name, value, span });
        }
        Ok(out)
    }

    /// Builds an expression: operands and operators arrive flat; precedence climbing with an
    /// explicit stack keeps this iterative however long the expression is.
    fn expr(&self, p: Pair<Rule>) -> Result<Expr, Diag> {
        let span = self.span(&p);
        let parts: Vec<Pair<Rule>> = p.into_inner().collect();
        if parts.len() > 2 * MAX_OPERANDS {
            return Err(Diag::new(
                "dlc::too_long",
                format!("expression has more than {MAX_OPERANDS} operands"),
            )
            .label(span, "this expression")
            .help("split it with `let` bindings"));
        }
        let mut operands: Vec<Expr> = Vec::new();
        let mut ops: Vec<BinOp> = Vec::new();
        for part in parts {
            if part.as_rule() == Rule::unary {
                operands.push(self.unary(part)?);
                continue;
            }
            let op = binop(part.as_rule()).ok_or_else(|| internal(span, "unknown operator"))?;
            while let Some(&top) = ops.last() {
                if top.precedence() >= op.precedence() {
                    ops.pop();
                    reduce(&mut operands, top, span)?;
                } else {
                    break;
                }
            }
            ops.push(op);
        }
        while let Some(top) = ops.pop() {
            reduce(&mut operands, top, span)?;
        }
        let e = operands
            .pop()
            .ok_or_else(|| internal(span, "empty expression"))?;
        Ok(e)
    }

    fn unary(&self, p: Pair<Rule>) -> Result<Expr, Diag> {
        let mut prefixes = Vec::new();
        let mut operand = None;
        for part in p.into_inner() {
            match part.as_rule() {
                Rule::neg => prefixes.push((UnOp::Neg, self.span(&part))),
                Rule::not => prefixes.push((UnOp::Not, self.span(&part))),
                _ => operand = Some(self.postfixed(part)?),
            }
        }
        let mut e = operand.ok_or_else(|| internal(Span::new(self.file, 0, 0), "no operand"))?;
        while let Some((op, s)) = prefixes.pop() {
            // Fold negative literals so that `-1` is a number, not an operation.
            e = match (op, e.kind) {
                (UnOp::Neg, ExprKind::Int(v)) => Expr {
                    kind: ExprKind::Int(-v),
                    span: s.to(e.span),
                },
                (UnOp::Neg, ExprKind::Float(v)) => Expr {
                    kind: ExprKind::Float(-v),
                    span: s.to(e.span),
                },
                (op, kind) => {
                    let inner = Expr { kind, span: e.span };
                    Expr {
                        span: s.to(inner.span),
                        kind: ExprKind::Unary(op, Box::new(inner)),
                    }
                }
            };
        }
        Ok(e)
    }

    fn postfixed(&self, p: Pair<Rule>) -> Result<Expr, Diag> {
        let mut c = self.children(p);
        let mut e = self.primary(c.take()?)?;
        for post in c.pairs {
            let s = self.span(&post);
            let span = e.span.to(s);
            e = match post.as_rule() {
                Rule::call_args => Expr {
                    kind: ExprKind::Call(Box::new(e), self.args(post)?),
                    span,
                },
                Rule::field => {
                    let id = self.children(post).take()?;
                    Expr {
                        kind: ExprKind::Field(Box::new(e), self.ident(id)),
                        span,
                    }
                }
                Rule::index => {
                    let i = self.expr(self.children(post).take()?)?;
                    Expr {
                        kind: ExprKind::Index(Box::new(e), Box::new(i)),
                        span,
                    }
                }
                _ => return Err(internal(s, "unexpected postfix")),
            };
        }
        Ok(e)
    }

    fn primary(&self, p: Pair<Rule>) -> Result<Expr, Diag> {
        let inner = self.children(p).take()?;
        let span = self.span(&inner);
        let kind = match inner.as_rule() {
            Rule::int => {
                let digits: String = inner.as_str().chars().filter(|c| *c != '_').collect();
                ExprKind::Int(digits.parse().map_err(|_| {
                    Diag::new("dlc::overflow", "integer literal is too large")
                        .label(span, "does not fit in 64 bits")
                        .help("integers range up to 9,223,372,036,854,775,807")
                })?)
            }
            Rule::float => ExprKind::Float(
                inner
                    .as_str()
                    .parse()
                    .map_err(|_| internal(span, "float"))?,
            ),
            Rule::string => ExprKind::Str(unescape(inner.as_str())),
            Rule::kw_true => ExprKind::Bool(true),
            Rule::kw_false => ExprKind::Bool(false),
            Rule::kw_in => ExprKind::In,
            Rule::ident => ExprKind::Var(inner.as_str().to_string()),
            Rule::list => ExprKind::List(
                inner
                    .into_inner()
                    .map(|e| self.expr(e))
                    .collect::<Result<_, _>>()?,
            ),
            Rule::paren => {
                let mut items = Vec::new();
                let mut trailing_comma = false;
                for q in inner.into_inner() {
                    match q.as_rule() {
                        Rule::comma => trailing_comma = true,
                        _ => items.push(self.expr(q)?),
                    }
                }
                if items.len() == 1 && !trailing_comma {
                    let mut e = items.pop().ok_or_else(|| internal(span, "paren"))?;
                    e.span = span;
                    return Ok(e);
                }
                ExprKind::Tuple(items)
            }
            Rule::if_expr => return self.if_expr(inner),
            _ => return Err(internal(span, "unexpected primary")),
        };
        Ok(Expr { kind, span })
    }

    fn if_expr(&self, p: Pair<Rule>) -> Result<Expr, Diag> {
        let span = self.span(&p);
        let mut c = self.children(p);
        c.take()?; // `if`
        let cond = self.expr(c.take()?)?;
        let then = self.body(c.take()?)?;
        let otherwise = match c.take_if(Rule::kw_else) {
            Some(_) => {
                let e = c.take()?;
                Some(match e.as_rule() {
                    Rule::if_expr => {
                        let nested = self.if_expr(e)?;
                        let s = nested.span;
                        let term = Term {
                            label: None,
                            kind: TermKind::Expr(nested),
                            span: s,
                        };
                        Body {
                            stmts: vec![Stmt::Chain(Chain {
                                terms: vec![term],
                                span: s,
                            })],
                            span: s,
                        }
                    }
                    _ => self.body(e)?,
                })
            }
            None => None,
        };
        Ok(Expr {
            kind: ExprKind::If(Box::new(IfExpr {
                cond,
                then,
                otherwise,
            })),
            span,
        })
    }
}

fn reduce(operands: &mut Vec<Expr>, op: BinOp, span: Span) -> Result<(), Diag> {
    let rhs = operands
        .pop()
        .ok_or_else(|| internal(span, "missing operand"))?;
    let lhs = operands
        .pop()
        .ok_or_else(|| internal(span, "missing operand"))?;
    let s = lhs.span.to(rhs.span);
    operands.push(Expr {
        kind: ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)),
        span: s,
    });
    Ok(())
}

fn binop(rule: Rule) -> Option<BinOp> {
    Some(match rule {
        Rule::range => BinOp::Range,
        Rule::or => BinOp::Or,
        Rule::and => BinOp::And,
        Rule::eq => BinOp::Eq,
        Rule::ne => BinOp::Ne,
        Rule::lt => BinOp::Lt,
        Rule::le => BinOp::Le,
        Rule::gt => BinOp::Gt,
        Rule::ge => BinOp::Ge,
        Rule::add => BinOp::Add,
        Rule::sub => BinOp::Sub,
        Rule::mul => BinOp::Mul,
        Rule::div => BinOp::Div,
        Rule::rem => BinOp::Rem,
        _ => return None,
    })
}

/// Strips the quotes of a string literal and resolves its escapes.
fn unescape(raw: &str) -> String {
    let inner = raw
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(raw);
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(other) => out.push(other),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expr(s: &str) -> Expr {
        parse_expr(s, 0, 0).expect("parses")
    }

    #[test]
    fn precedence_and_associativity() {
        let e = expr("1 + 2 * 3 - 4");
        let ExprKind::Binary(BinOp::Sub, lhs, rhs) = e.kind else {
            panic!("{e:?}")
        };
        assert_eq!(rhs.kind, ExprKind::Int(4));
        let ExprKind::Binary(BinOp::Add, _, mul) = lhs.kind else {
            panic!()
        };
        assert!(matches!(mul.kind, ExprKind::Binary(BinOp::Mul, _, _)));
    }

    #[test]
    fn postfix_needs_no_space() {
        assert!(matches!(expr("in.c").kind, ExprKind::Field(_, _)));
        assert!(matches!(expr("xs[0]").kind, ExprKind::Index(_, _)));
        assert!(matches!(expr("f(1, k: 2)").kind, ExprKind::Call(_, _)));
    }

    #[test]
    fn tuples_and_grouping() {
        assert!(matches!(expr("(1, 2)").kind, ExprKind::Tuple(_)));
        assert!(matches!(expr("(1,)").kind, ExprKind::Tuple(_)));
        assert_eq!(expr("(7)").kind, ExprKind::Int(7));
        assert_eq!(expr("-3").kind, ExprKind::Int(-3));
    }

    #[test]
    fn deep_nesting_is_refused_not_crashed() {
        let text = format!(
            "model m {{ input x: [{}1{}] }}",
            "(".repeat(20_000),
            ")".repeat(20_000)
        );
        let err = parse_file(&text, 0).unwrap_err();
        assert_eq!(err.code, "dlc::too_deep");
    }

    #[test]
    fn syntax_errors_speak_words() {
        let err = parse_file("model m { input x: [1, 28 28] }", 0).unwrap_err();
        assert_eq!(err.code, "dlc::syntax");
        assert!(!err.message.contains("Rule"), "{}", err.message);
        assert!(err.message.contains("found `28`"), "{}", err.message);
    }

    #[test]
    fn statements_end_at_newlines() {
        let f = parse_file("model m {\n input x: [4]\n let a = linear(3)\n relu\n}", 0).unwrap();
        let Item::Model(def) = &f.items[0] else {
            panic!()
        };
        assert_eq!(def.body.stmts.len(), 3);
    }
}
