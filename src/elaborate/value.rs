//! Values the elaborator computes with.

use std::fmt;
use std::rc::Rc;

use crate::ir::{Dim, Outlet, Shape};
use crate::ops::OpDef;

/// A value of the language.
#[derive(Clone, Debug)]
pub enum Value {
    /// An integer.
    Int(i64),
    /// A number.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(Rc<str>),
    /// `[a, b, ...]`
    List(Rc<Vec<Value>>),
    /// `(a, b, ...)`
    Tuple(Rc<Vec<Value>>),
    /// A tensor in the graph being built.
    Tensor(Outlet),
    /// The shape of a tensor (`in`).
    Shape(Rc<Shape>),
    /// A symbolic dimension, as in `input x: [T, 64]`.
    Sym(Rc<str>),
    /// An op, block or builtin function, passed around as a value (`block: bottleneck`).
    Callable(Callable),
    /// The result of something that already failed with a diagnostic: it propagates silently.
    Poison,
}

/// Something that can be called.
#[derive(Clone, Debug)]
pub enum Callable {
    /// A layer op.
    Op(&'static OpDef),
    /// A user block, by name.
    Block(Rc<str>),
    /// A builtin function.
    Builtin(Builtin),
}

/// Builtin functions on values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    /// Length of a list, tuple or string.
    Len,
    /// Smallest argument or list element.
    Min,
    /// Largest argument or list element.
    Max,
    /// Sum of a list.
    Sum,
    /// Truncates a number to an integer.
    Int,
    /// Converts to a float.
    Float,
    /// Rounds to the nearest integer (halves to even, as Python).
    Round,
    /// Absolute value.
    Abs,
    /// `range(n)` or `range(a, b)` as a list.
    Range,
    /// `enumerate(xs)`: list of `(i, x)`.
    Enumerate,
    /// `zip(a, b, ...)`: list of tuples.
    Zip,
}

impl Builtin {
    /// Every builtin with its name.
    pub const ALL: &'static [(&'static str, Builtin)] = &[
        ("len", Builtin::Len),
        ("min", Builtin::Min),
        ("max", Builtin::Max),
        ("sum", Builtin::Sum),
        ("int", Builtin::Int),
        ("float", Builtin::Float),
        ("round", Builtin::Round),
        ("abs", Builtin::Abs),
        ("range", Builtin::Range),
        ("enumerate", Builtin::Enumerate),
        ("zip", Builtin::Zip),
    ];

    /// Looks a builtin up by name.
    pub fn lookup(name: &str) -> Option<Builtin> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
    }
}

impl Value {
    /// Describes the value's type in words for diagnostics.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Bool(_) => "a boolean",
            Value::Str(_) => "a string",
            Value::List(_) => "a list",
            Value::Tuple(_) => "a tuple",
            Value::Tensor(_) => "a tensor",
            Value::Shape(_) => "a shape",
            Value::Sym(_) => "a symbolic size",
            Value::Callable(Callable::Op(_)) => "a layer",
            Value::Callable(Callable::Block(_)) => "a block",
            Value::Callable(Callable::Builtin(_)) => "a function",
            Value::Poison => "an invalid value",
        }
    }

    /// The elements of a list or tuple.
    pub fn items(&self) -> Option<&[Value]> {
        match self {
            Value::List(v) | Value::Tuple(v) => Some(v),
            _ => None,
        }
    }

    /// A dimension as a value: known sizes are integers.
    pub fn from_dim(d: &Dim) -> Value {
        match d {
            Dim::Known(n) => Value::Int(*n as i64),
            Dim::Sym(s) => Value::Sym(Rc::from(&**s)),
        }
    }

    /// Structural equality for `==`; `None` when the types cannot be compared.
    pub fn equals(&self, other: &Value) -> Option<bool> {
        Some(match (self, other) {
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Int(a), Value::Float(b)) | (Value::Float(b), Value::Int(a)) => {
                (*a as f64) == *b
            }
            (Value::Float(a), Value::Float(b)) => a == b,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Str(a), Value::Str(b)) => a == b,
            (Value::Sym(a), Value::Sym(b)) => a == b,
            (Value::List(a), Value::List(b)) | (Value::Tuple(a), Value::Tuple(b)) => {
                if a.len() != b.len() {
                    return Some(false);
                }
                for (x, y) in a.iter().zip(b.iter()) {
                    if !x.equals(y)? {
                        return Some(false);
                    }
                }
                true
            }
            (Value::Shape(a), Value::Shape(b)) => a == b,
            _ => return None,
        })
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::Str(s) => f.write_str(s),
            Value::List(v) | Value::Tuple(v) => {
                let (open, close) = if matches!(self, Value::List(_)) {
                    ("[", "]")
                } else {
                    ("(", ")")
                };
                f.write_str(open)?;
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{x}")?;
                }
                f.write_str(close)
            }
            Value::Tensor(_) => f.write_str("<tensor>"),
            Value::Shape(s) => write!(f, "{s}"),
            Value::Sym(s) => f.write_str(s),
            Value::Callable(Callable::Op(d)) => f.write_str(d.name),
            Value::Callable(Callable::Block(b)) => f.write_str(b),
            Value::Callable(Callable::Builtin(b)) => write!(f, "{b:?}"),
            Value::Poison => f.write_str("<error>"),
        }
    }
}
