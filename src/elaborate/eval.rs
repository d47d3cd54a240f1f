//! Expression evaluation: arithmetic, comparisons, lists, `in`, builtins.

use std::rc::Rc;

use super::value::{Builtin, Callable, Value};
use super::{Elaborator, Flow};
use crate::diagnostics::{Diag, Span};
use crate::syntax::ast::{BinOp, Expr, ExprKind, IfExpr, Stmt, TermKind, UnOp};

/// Longest list a range may produce.
const MAX_RANGE: i64 = 1_000_000;

impl Elaborator<'_> {
    /// Evaluates an expression; `flow` is the tensor `in` refers to.
    pub(super) fn eval(&mut self, e: &Expr, flow: &Flow) -> Value {
        match &e.kind {
            ExprKind::Int(v) => Value::Int(*v),
            ExprKind::Float(v) => Value::Float(*v),
            ExprKind::Bool(v) => Value::Bool(*v),
            ExprKind::Str(s) => Value::Str(Rc::from(s.as_str())),
            ExprKind::List(xs) => {
                Value::List(Rc::new(xs.iter().map(|x| self.eval(x, flow)).collect()))
            }
            ExprKind::Tuple(xs) => {
                Value::Tuple(Rc::new(xs.iter().map(|x| self.eval(x, flow)).collect()))
            }
            ExprKind::Var(name) => self
                .resolve_layer(name, e.span, false)
                .unwrap_or(Value::Poison),
            ExprKind::In => match self.block_inputs.last().unwrap_or(flow) {
                Some(Value::Tensor(t)) => Value::Shape(Rc::new(self.g.shape(*t).clone())),
                Some(_) => Value::Poison,
                None => {
                    self.error(
                        Diag::new("dlc::no_input", "`in` has no tensor to describe")
                            .label(e.span, "nothing flows here yet")
                            .help("`in` is the shape of the tensor entering the current block (in a model body: the current layer)"),
                    );
                    Value::Poison
                }
            },
            ExprKind::Field(x, field) => {
                let v = self.eval(x, flow);
                self.field(v, &field.name, field.span)
            }
            ExprKind::Index(x, i) => {
                let v = self.eval(x, flow);
                let i = self.eval(i, flow);
                self.index(v, i, e.span)
            }
            ExprKind::Call(f, args) => {
                let callee = self.eval(f, flow);
                let values: Vec<Value> = args.iter().map(|a| self.eval(&a.value, flow)).collect();
                match callee {
                    Value::Callable(Callable::Builtin(b)) => {
                        if let Some(kw) = args.iter().find_map(|a| a.name.as_ref()) {
                            self.error(
                                Diag::new(
                                    "dlc::unknown_arg",
                                    format!(
                                        "builtin functions take no keyword arguments, found `{}`",
                                        kw.name
                                    ),
                                )
                                .label(kw.span, "keyword not accepted")
                                .help("pass the arguments by position"),
                            );
                            return Value::Poison;
                        }
                        self.builtin(b, values, e.span)
                    }
                    Value::Callable(_) => {
                        self.error(
                            Diag::new("dlc::not_a_value", "a layer call cannot be used as a value")
                                .label(e.span, "this applies a layer")
                                .help(
                                    "apply layers in a chain, e.g. `let y = x conv(64, kernel: 3)`",
                                ),
                        );
                        Value::Poison
                    }
                    Value::Poison => Value::Poison,
                    v => {
                        self.error(
                            Diag::new(
                                "dlc::not_callable",
                                format!("{} cannot be called", v.type_name()),
                            )
                            .label(f.span, format!("this is {}", v.type_name()))
                            .help("only ops, blocks and builtin functions take arguments"),
                        );
                        Value::Poison
                    }
                }
            }
            ExprKind::Unary(op, x) => {
                let v = self.eval(x, flow);
                match (op, v) {
                    (_, Value::Poison) => Value::Poison,
                    (UnOp::Neg, Value::Int(n)) => n
                        .checked_neg()
                        .map(Value::Int)
                        .unwrap_or_else(|| self.overflow(e.span)),
                    (UnOp::Neg, Value::Float(x)) => Value::Float(-x),
                    (UnOp::Not, Value::Bool(b)) => Value::Bool(!b),
                    (op, v) => self.type_error(
                        e.span,
                        &format!(
                            "cannot apply `{}` to {}",
                            if *op == UnOp::Neg { "-" } else { "not" },
                            v.type_name()
                        ),
                    ),
                }
            }
            ExprKind::Binary(op, a, b) => self.binary(*op, a, b, e.span, flow),
            ExprKind::If(i) => {
                let IfExpr {
                    cond,
                    then,
                    otherwise,
                } = &**i;
                let chosen = match self.condition(cond, flow) {
                    Some(true) => then,
                    Some(false) => match otherwise {
                        Some(b) => b,
                        None => {
                            self.error(
                                Diag::new(
                                    "dlc::missing_else",
                                    "an `if` used as a value needs an `else`",
                                )
                                .label(e.span, "no value when the condition is false")
                                .help("add `else { ... }`"),
                            );
                            return Value::Poison;
                        }
                    },
                    None => return Value::Poison,
                };
                match single_expr(&chosen.stmts) {
                    Some(x) => self.eval(x, flow),
                    None => {
                        self.error(
                            Diag::new(
                                "dlc::not_a_value",
                                "this `if` holds layers, so it cannot be used as a value",
                            )
                            .label(chosen.span, "a value `if` holds one expression per branch")
                            .help("use the `if` as a layer, or write `if c { 1 } else { 2 }`"),
                        );
                        Value::Poison
                    }
                }
            }
        }
    }

    fn overflow(&mut self, span: Span) -> Value {
        self.error(
            Diag::new("dlc::overflow", "integer overflow")
                .label(span, "the result does not fit in 64 bits")
                .help("use smaller numbers"),
        );
        Value::Poison
    }

    fn type_error(&mut self, span: Span, message: &str) -> Value {
        self.error(
            Diag::new("dlc::wrong_type", message.to_string())
                .label(span, "here")
                .help("check the types of the operands"),
        );
        Value::Poison
    }

    fn field(&mut self, v: Value, name: &str, span: Span) -> Value {
        let v = match v {
            Value::Tensor(t) => {
                let names = self.g.dag[t.node].op.output_names();
                if let Some(i) = names.iter().position(|n| *n == name) {
                    return Value::Tensor(crate::ir::Outlet {
                        node: t.node,
                        slot: i + 1,
                    });
                }
                Value::Shape(Rc::new(self.g.shape(t).clone()))
            }
            v => v,
        };
        let Value::Shape(shape) = v else {
            return match v {
                Value::Poison => Value::Poison,
                v => self.type_error(span, &format!("{} has no field `{name}`", v.type_name())),
            };
        };
        let rank = shape.rank();
        let axis = match name {
            "c" if rank >= 2 => Some(1),
            "h" if rank == 4 => Some(2),
            "w" if rank == 4 => Some(3),
            "last" => Some(rank - 1),
            "rank" => return Value::Int(rank as i64),
            "dims" => {
                return Value::List(Rc::new(
                    shape.0.iter().skip(1).map(Value::from_dim).collect(),
                ));
            }
            _ => None,
        };
        match axis {
            Some(i) => Value::from_dim(&shape.0[i]),
            None => {
                self.error(
                    Diag::new("dlc::unknown_field", format!("the shape {shape} has no field `{name}`"))
                        .label(span, "unknown field")
                        .help("shape fields: `c` (axis 1), `h` and `w` (images), `last`, `rank`, `dims` (all but the batch)"),
                );
                Value::Poison
            }
        }
    }

    fn index(&mut self, v: Value, i: Value, span: Span) -> Value {
        let (items, i) = match (&v, i) {
            (Value::Poison, _) | (_, Value::Poison) => return Value::Poison,
            (Value::List(xs) | Value::Tuple(xs), Value::Int(i)) => (xs.clone(), i),
            (Value::Shape(s), Value::Int(i)) => (
                Rc::new(s.0.iter().skip(1).map(Value::from_dim).collect()),
                i,
            ),
            (v, i) => {
                return self.type_error(
                    span,
                    &format!("cannot index {} with {}", v.type_name(), i.type_name()),
                );
            }
        };
        let len = items.len() as i64;
        let at = if i < 0 { i + len } else { i };
        if (0..len).contains(&at) {
            items[at as usize].clone()
        } else {
            self.error(
                Diag::new(
                    "dlc::out_of_range",
                    format!("index {i} is out of range for {v}"),
                )
                .label(
                    span,
                    format!(
                        "{} has {len} element{}",
                        v.type_name(),
                        if len == 1 { "" } else { "s" }
                    ),
                )
                .help(format!("use an index from {} to {}", -len, len - 1)),
            );
            Value::Poison
        }
    }

    fn binary(&mut self, op: BinOp, a: &Expr, b: &Expr, span: Span, flow: &Flow) -> Value {
        use Value::*;
        let lhs = self.eval(a, flow);
        // `and` / `or` short-circuit.
        match (op, &lhs) {
            (BinOp::And, Bool(false)) => return Bool(false),
            (BinOp::Or, Bool(true)) => return Bool(true),
            _ => {}
        }
        let rhs = self.eval(b, flow);
        if matches!(lhs, Poison) || matches!(rhs, Poison) {
            return Poison;
        }
        let mismatch = |this: &mut Self, l: &Value, r: &Value| {
            this.type_error(
                span,
                &format!(
                    "cannot apply `{}` to {} and {}",
                    op.symbol(),
                    l.type_name(),
                    r.type_name()
                ),
            )
        };
        match op {
            BinOp::And | BinOp::Or => match (&lhs, &rhs) {
                (Bool(_), Bool(y)) => Bool(*y),
                _ => mismatch(self, &lhs, &rhs),
            },
            BinOp::Eq | BinOp::Ne => match lhs.equals(&rhs) {
                Some(eq) => Bool(eq == (op == BinOp::Eq)),
                None => mismatch(self, &lhs, &rhs),
            },
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
                let ord = match (&lhs, &rhs) {
                    (Int(x), Int(y)) => x.partial_cmp(y),
                    (Int(_) | Float(_), Int(_) | Float(_)) => {
                        as_f64(&lhs).partial_cmp(&as_f64(&rhs))
                    }
                    (Str(x), Str(y)) => x.partial_cmp(y),
                    _ => return mismatch(self, &lhs, &rhs),
                };
                let Some(ord) = ord else { return Bool(false) };
                Bool(match op {
                    BinOp::Lt => ord.is_lt(),
                    BinOp::Le => ord.is_le(),
                    BinOp::Gt => ord.is_gt(),
                    _ => ord.is_ge(),
                })
            }
            BinOp::Range => match (&lhs, &rhs) {
                (Int(x), Int(y)) => {
                    if y.saturating_sub(*x) > MAX_RANGE {
                        self.error(
                            Diag::new(
                                "dlc::too_large",
                                format!("range {x}..{y} has more than {MAX_RANGE} elements"),
                            )
                            .label(span, "too long")
                            .help("use a shorter range"),
                        );
                        return Poison;
                    }
                    List(Rc::new((*x..*y).map(Int).collect()))
                }
                _ => mismatch(self, &lhs, &rhs),
            },
            BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem => {
                self.arith(op, lhs, rhs, b.span, span)
            }
        }
    }

    fn arith(&mut self, op: BinOp, lhs: Value, rhs: Value, rhs_span: Span, span: Span) -> Value {
        use Value::*;
        let zero = matches!(rhs, Int(0)) || matches!(rhs, Float(f) if f == 0.0);
        if zero && matches!(op, BinOp::Div | BinOp::Rem) && matches!(lhs, Int(_) | Float(_)) {
            self.error(
                Diag::new(
                    "dlc::division_by_zero",
                    format!("division by zero in `{}`", op.symbol()),
                )
                .label(rhs_span, "this is zero")
                .help("check the divisor; sizes often come from parameters or `in`"),
            );
            return Poison;
        }
        match (&lhs, &rhs) {
            (Int(x), Int(y)) => {
                let r = match op {
                    BinOp::Add => x.checked_add(*y),
                    BinOp::Sub => x.checked_sub(*y),
                    BinOp::Mul => x.checked_mul(*y),
                    BinOp::Div => x.checked_div(*y).map(|_| floor_div(*x, *y)),
                    _ => x
                        .checked_div(*y)
                        .and_then(|_| x.checked_sub(y * floor_div(*x, *y))),
                };
                r.map(Int).unwrap_or_else(|| self.overflow(span))
            }
            (Int(_) | Float(_), Int(_) | Float(_)) => {
                let (x, y) = (as_f64(&lhs), as_f64(&rhs));
                Float(match op {
                    BinOp::Add => x + y,
                    BinOp::Sub => x - y,
                    BinOp::Mul => x * y,
                    BinOp::Div => x / y,
                    _ => x - y * (x / y).floor(),
                })
            }
            (List(a), List(b)) if op == BinOp::Add => {
                List(Rc::new(a.iter().chain(b.iter()).cloned().collect()))
            }
            (Tuple(a), Tuple(b)) if op == BinOp::Add => {
                Tuple(Rc::new(a.iter().chain(b.iter()).cloned().collect()))
            }
            (Str(a), Str(b)) if op == BinOp::Add => Str(Rc::from(format!("{a}{b}"))),
            (List(a), Int(n)) | (Int(n), List(a)) if op == BinOp::Mul => {
                let n = (*n).max(0) as usize;
                if a.len().saturating_mul(n) > MAX_RANGE as usize {
                    return self.type_error(span, "list too long");
                }
                List(Rc::new(
                    a.iter().cloned().cycle().take(a.len() * n).collect(),
                ))
            }
            (Sym(s), _) | (_, Sym(s)) => {
                self.error(
                    Diag::new(
                        "dlc::symbolic_dim",
                        format!("cannot compute with the symbolic size `{s}`"),
                    )
                    .label(span, "needs a known size")
                    .help("give the input a fixed size to compute with its dimensions"),
                );
                Poison
            }
            _ => self.type_error(
                span,
                &format!(
                    "cannot apply `{}` to {} and {}",
                    op.symbol(),
                    lhs.type_name(),
                    rhs.type_name()
                ),
            ),
        }
    }

    fn builtin(&mut self, b: Builtin, args: Vec<Value>, span: Span) -> Value {
        use Value::*;
        if args.iter().any(|a| matches!(a, Poison)) {
            return Poison;
        }
        let bad = |this: &mut Self, what: &str| {
            this.error(
                Diag::new("dlc::wrong_type", format!("`{}` {what}", builtin_name(b)))
                    .label(span, "this call")
                    .help("see docs/language.md for the builtin functions"),
            );
            Poison
        };
        // min/max/sum accept a single list or several values.
        let spread = |args: &[Value]| -> Vec<Value> {
            match args {
                [one] => one
                    .items()
                    .map(<[Value]>::to_vec)
                    .unwrap_or_else(|| vec![one.clone()]),
                many => many.to_vec(),
            }
        };
        match b {
            Builtin::Len => match args.as_slice() {
                [List(x) | Tuple(x)] => Int(x.len() as i64),
                [Str(s)] => Int(s.chars().count() as i64),
                [Shape(s)] => Int(s.rank() as i64 - 1),
                _ => bad(self, "takes one list, tuple or string"),
            },
            Builtin::Min | Builtin::Max | Builtin::Sum => {
                let xs = spread(&args);
                if xs.is_empty() && b != Builtin::Sum {
                    return bad(self, "needs at least one value");
                }
                if !xs.iter().all(|x| matches!(x, Int(_) | Float(_))) {
                    return bad(self, "works on numbers");
                }
                let all_int = xs.iter().all(|x| matches!(x, Int(_)));
                if all_int {
                    let mut ints = xs.iter().map(|x| if let Int(n) = x { *n } else { 0 });
                    match b {
                        Builtin::Min => Int(ints.min().unwrap_or(0)),
                        Builtin::Max => Int(ints.max().unwrap_or(0)),
                        _ => ints
                            .try_fold(0i64, |a, n| a.checked_add(n))
                            .map(Int)
                            .unwrap_or_else(|| self.overflow(span)),
                    }
                } else {
                    let fs = xs.iter().map(as_f64);
                    Float(match b {
                        Builtin::Min => fs.fold(f64::INFINITY, f64::min),
                        Builtin::Max => fs.fold(f64::NEG_INFINITY, f64::max),
                        _ => fs.sum(),
                    })
                }
            }
            Builtin::Int => match args.as_slice() {
                [Int(n)] => Int(*n),
                [Float(x)] if x.is_finite() && x.abs() < 9.0e18 => Int(x.trunc() as i64),
                [Bool(v)] => Int(*v as i64),
                _ => bad(self, "takes one finite number"),
            },
            Builtin::Float => match args.as_slice() {
                [Int(_) | Float(_)] => Float(as_f64(&args[0])),
                _ => bad(self, "takes one number"),
            },
            Builtin::Round => match args.as_slice() {
                [Int(n)] => Int(*n),
                [Float(x)] if x.is_finite() && x.abs() < 9.0e18 => Int(x.round_ties_even() as i64),
                _ => bad(self, "takes one finite number"),
            },
            Builtin::Abs => match args.as_slice() {
                [Int(n)] => n
                    .checked_abs()
                    .map(Int)
                    .unwrap_or_else(|| self.overflow(span)),
                [Float(x)] => Float(x.abs()),
                _ => bad(self, "takes one number"),
            },
            Builtin::Range => {
                let (lo, hi) = match args.as_slice() {
                    [Int(n)] => (0, *n),
                    [Int(a), Int(b)] => (*a, *b),
                    _ => return bad(self, "takes `range(n)` or `range(a, b)` with integers"),
                };
                if hi.saturating_sub(lo) > MAX_RANGE {
                    return bad(self, "would make a list that is too long");
                }
                List(Rc::new((lo..hi).map(Int).collect()))
            }
            Builtin::Enumerate => match args.as_slice() {
                [List(x) | Tuple(x)] => List(Rc::new(
                    x.iter()
                        .enumerate()
                        .map(|(i, v)| Tuple(Rc::new(vec![Int(i as i64), v.clone()])))
                        .collect(),
                )),
                _ => bad(self, "takes one list"),
            },
            Builtin::Zip => {
                let lists: Option<Vec<&[Value]>> = args.iter().map(Value::items).collect();
                match lists {
                    Some(lists) if !lists.is_empty() => {
                        let n = lists.iter().map(|l| l.len()).min().unwrap_or(0);
                        List(Rc::new(
                            (0..n)
                                .map(|i| {
                                    Tuple(Rc::new(lists.iter().map(|l| l[i].clone()).collect()))
                                })
                                .collect(),
                        ))
                    }
                    _ => bad(self, "takes lists"),
                }
            }
        }
    }
}

fn builtin_name(b: Builtin) -> &'static str {
    Builtin::ALL
        .iter()
        .find(|(_, x)| *x == b)
        .map(|(n, _)| *n)
        .unwrap_or("?")
}

fn as_f64(v: &Value) -> f64 {
    match v {
        Value::Int(n) => *n as f64,
        Value::Float(x) => *x,
        _ => f64::NAN,
    }
}

/// Floor division as in Python (rounds toward −∞). `y` is non-zero.
fn floor_div(x: i64, y: i64) -> i64 {
    let q = x.wrapping_div(y);
    if (x % y != 0) && ((x < 0) != (y < 0)) {
        q - 1
    } else {
        q
    }
}

/// The expression of a body that holds exactly one plain expression.
fn single_expr(stmts: &[Stmt]) -> Option<&Expr> {
    match stmts {
        [Stmt::Chain(c)] => match c.terms.as_slice() {
            [t] if t.label.is_none() => match &t.kind {
                TermKind::Expr(e) => Some(e),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::floor_div;

    #[test]
    fn floor_division_rounds_down() {
        assert_eq!(floor_div(7, 2), 3);
        assert_eq!(floor_div(-7, 2), -4);
        assert_eq!(floor_div(7, -2), -4);
        assert_eq!(floor_div(-8, 2), -4);
    }
}
