//! The syntax tree. Every node carries the span of the text that produced it.

use crate::diagnostics::Span;

/// A name with its span.
#[derive(Debug, Clone, PartialEq)]
pub struct Ident {
    /// The name.
    pub name: String,
    /// Where it was written.
    pub span: Span,
}

/// A parsed file.
#[derive(Debug, Clone, PartialEq)]
pub struct File {
    /// Items in source order.
    pub items: Vec<Item>,
}

/// A top-level item.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// `use "path.dlc"`.
    Use { path: String, span: Span },
    /// `block name(params) { ... }`.
    Block(Def),
    /// `model name(params) { ... }`.
    Model(Def),
    /// `model name = base(args)`.
    Variant {
        name: Ident,
        base: Ident,
        args: Vec<Arg>,
        span: Span,
    },
}

/// A block or model definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Def {
    /// Its name.
    pub name: Ident,
    /// Its parameters, in order.
    pub params: Vec<Param>,
    /// Its statements.
    pub body: Body,
    /// The whole definition.
    pub span: Span,
}

/// A parameter with an optional default value.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// Its name.
    pub name: Ident,
    /// Its default, if any.
    pub default: Option<Expr>,
}

/// A braced list of statements.
#[derive(Debug, Clone, PartialEq)]
pub struct Body {
    /// The statements in order.
    pub stmts: Vec<Stmt>,
    /// The braces and everything between them.
    pub span: Span,
}

/// A statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Stmt {
    /// `input name: dtype[dims]`.
    Input {
        name: Ident,
        dtype: Option<Ident>,
        dims: Vec<Expr>,
        span: Span,
    },
    /// `output name` or `output name = chain`.
    Output {
        name: Ident,
        chain: Option<Chain>,
        span: Span,
    },
    /// `let name = chain`.
    Let {
        name: Ident,
        chain: Chain,
        span: Span,
    },
    /// Terms applied to the flowing tensor.
    Chain(Chain),
    /// `train { name: value ... }`: training settings of the model.
    Train {
        settings: Vec<(Ident, Expr)>,
        span: Span,
    },
}

/// Terms applied one after the other.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    /// The terms.
    pub terms: Vec<Term>,
    /// The whole chain.
    pub span: Span,
}

/// One term of a chain, optionally labelled (`conv1: conv(...)`).
#[derive(Debug, Clone, PartialEq)]
pub struct Term {
    /// The label, if any.
    pub label: Option<Label>,
    /// What the term does.
    pub kind: TermKind,
    /// The whole term, label included.
    pub span: Span,
}

/// A layer label: a name, or a string with `{expr}` holes (`"layer{i + 1}"`). Either may be
/// a dotted path (`backbone.layer4:`), which places the term inside a group of its body.
#[derive(Debug, Clone, PartialEq)]
pub enum Label {
    /// `conv1:` or `backbone.layer4:`
    Name(Ident),
    /// `"denselayer{i + 1}":` — the raw text between the quotes and its span.
    Template(String, Span),
}

/// The kinds of chain term.
#[derive(Debug, Clone, PartialEq)]
pub enum TermKind {
    /// `repeat n { ... }`, `dense repeat n { ... }`.
    Repeat {
        count: Box<Expr>,
        body: Body,
        dense: bool,
    },
    /// `for pat in expr { ... }`, `dense for ...`.
    For {
        pattern: Pattern,
        iter: Box<Expr>,
        body: Body,
        dense: bool,
    },
    /// `residual [if cond] { main } [shortcut [if cond] { proj }]`.
    Residual {
        cond: Option<Box<Expr>>,
        body: Body,
        shortcut: Option<Box<Shortcut>>,
    },
    /// `concat(axis: a) { branch { ... } ... }`.
    Concat {
        args: Vec<Arg>,
        branches: Vec<Body>,
        span: Span,
    },
    /// `{ ... }`: a nested sequence with its own naming scope.
    Group(Body),
    /// A layer call, block call, tensor name or `if`.
    Expr(Expr),
}

/// The shortcut of a residual.
#[derive(Debug, Clone, PartialEq)]
pub struct Shortcut {
    /// `shortcut if cond`: identity when false.
    pub cond: Option<Expr>,
    /// The projection.
    pub body: Body,
    /// The whole shortcut clause.
    pub span: Span,
}

/// A loop variable pattern.
#[derive(Debug, Clone, PartialEq)]
pub enum Pattern {
    /// A single name.
    Name(Ident),
    /// `(a, b, ...)` destructuring.
    Tuple(Vec<Pattern>, Span),
}

/// A call argument, positional or keyword.
#[derive(Debug, Clone, PartialEq)]
pub struct Arg {
    /// The keyword, if any.
    pub name: Option<Ident>,
    /// The value.
    pub value: Expr,
    /// The whole argument.
    pub span: Span,
}

/// An expression.
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    /// What it is.
    pub kind: ExprKind,
    /// Where it was written.
    pub span: Span,
}

/// The kinds of expression.
#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    /// An integer literal.
    Int(i64),
    /// A float literal.
    Float(f64),
    /// `true` / `false`.
    Bool(bool),
    /// A string literal (escapes resolved).
    Str(String),
    /// `[a, b]`.
    List(Vec<Expr>),
    /// `(a, b)`.
    Tuple(Vec<Expr>),
    /// A name.
    Var(String),
    /// `in`: the shape of the flowing tensor.
    In,
    /// `x.name`.
    Field(Box<Expr>, Ident),
    /// `x[i]`.
    Index(Box<Expr>, Box<Expr>),
    /// `f(args)`.
    Call(Box<Expr>, Vec<Arg>),
    /// `-x`, `not x`.
    Unary(UnOp, Box<Expr>),
    /// `a op b`.
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `if cond { ... } else { ... }`; an `else if` is an else body holding one `if`.
    If(Box<IfExpr>),
}

/// `if cond { ... } else { ... }`.
#[derive(Debug, Clone, PartialEq)]
pub struct IfExpr {
    /// The condition.
    pub cond: Expr,
    /// Taken when true.
    pub then: Body,
    /// Taken when false; an `else if` is a body holding one `if`.
    pub otherwise: Option<Body>,
}

/// Unary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnOp {
    /// `-`
    Neg,
    /// `not`
    Not,
}

/// Binary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// `..` (integer range, end excluded)
    Range,
    /// `or`
    Or,
    /// `and`
    And,
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`: floor division on integers, true division otherwise
    Div,
    /// `%`
    Rem,
}

impl BinOp {
    /// Binding power: higher binds tighter.
    pub fn precedence(self) -> u8 {
        use BinOp::*;
        match self {
            Range => 1,
            Or => 2,
            And => 3,
            Eq | Ne | Lt | Le | Gt | Ge => 4,
            Add | Sub => 5,
            Mul | Div | Rem => 6,
        }
    }

    /// The operator as written.
    pub fn symbol(self) -> &'static str {
        use BinOp::*;
        match self {
            Range => "..",
            Or => "or",
            And => "and",
            Eq => "==",
            Ne => "!=",
            Lt => "<",
            Le => "<=",
            Gt => ">",
            Ge => ">=",
            Add => "+",
            Sub => "-",
            Mul => "*",
            Div => "/",
            Rem => "%",
        }
    }
}
