//! Elaboration: evaluates a model's parameters and expressions, expands blocks, unrolls
//! loops, resolves conditionals and wires every layer into the typed [`Graph`], naming each
//! node hierarchically (`layer1.0.conv1`) and keeping the span that produced it.
//!
//! Errors are collected: a failed layer yields a *poisoned* tensor that later layers pass
//! on silently, so one mistake gives one diagnostic and independent mistakes each get theirs.

mod eval;
pub mod value;

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use crate::diagnostics::{Diag, Span, did_you_mean};
use crate::ir::{DType, Dim, Graph, Outlet, ScopeId, ScopeItem, ScopeKind, Shape};
use crate::ops::{self, Op, OpDef};
use crate::program::{ModelSource, Program};
use crate::syntax::ast::*;
use value::{Callable, Value};

/// Most nodes one model may expand to.
pub const MAX_NODES: usize = 5_000_000;
/// Deepest nesting of block calls.
pub const MAX_CALL_DEPTH: usize = 64;

/// An elaborated model: its typed graph and the parameter values it was built with.
#[derive(Debug, Clone)]
pub struct Model {
    /// The model's name.
    pub name: String,
    /// The typed graph.
    pub graph: Graph,
    /// Model parameters as `name = value` text, in declaration order.
    pub params: Vec<(String, String)>,
    /// The `train { }` settings, evaluated, in source order.
    pub train: Vec<TrainSetting>,
}

/// One `name: value` of a `train { }` section.
#[derive(Debug, Clone)]
pub struct TrainSetting {
    /// The setting's name and where it was written.
    pub name: Ident,
    /// Its value.
    pub value: Setting,
    /// Where the value was written.
    pub span: Span,
}

/// A training setting's value: plain data, a name (`fashion_mnist`, `xavier`) or a call
/// (`sgd(lr: 0.1, momentum: 0.9)`). The trainer gives them meaning.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    /// An integer.
    Int(i64),
    /// A number.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
    /// A bare name.
    Name(String),
    /// A list.
    List(Vec<Setting>),
    /// `name(args)`, arguments positional or by keyword.
    Call(String, Vec<(Option<String>, Setting)>),
}

/// A `--set name=value` override, already parsed.
#[derive(Debug, Clone)]
pub struct Override {
    /// The parameter.
    pub name: String,
    /// Where the name was written (in the `--set` pseudo-file).
    pub span: Span,
    /// The value expression.
    pub value: Expr,
}

/// Elaborates the model `name` of `prog`, with overrides. Diagnostics come unattached.
pub fn elaborate(prog: &Program, name: &str, overrides: &[Override]) -> Result<Model, Vec<Diag>> {
    let Some(source) = prog.model(name) else {
        let names: Vec<&str> = prog.models.iter().map(|m| m.name().name.as_str()).collect();
        let mut d = Diag::new("dlc::unknown_model", format!("no model named `{name}`"));
        d = match did_you_mean(name, names.iter().copied()) {
            Some(s) => d.help(format!("did you mean `{s}`? models: {}", names.join(", "))),
            None => d.help(format!("models in this file: {}", names.join(", "))),
        };
        return Err(vec![d]);
    };
    let (def, args) = resolve_variant(prog, source)?;
    let mut e = Elaborator::new(prog, &def.name.name, def.span);
    e.bind_model_params(def, &args, overrides);
    let params: Vec<(String, String)> = def
        .params
        .iter()
        .filter_map(|p| {
            e.lookup(&p.name.name)
                .map(|v| (p.name.name.clone(), v.to_string()))
        })
        .collect();
    if e.diags.is_empty() {
        e.model_body(def);
    }
    if e.diags.is_empty() {
        Ok(Model {
            name: name.to_string(),
            graph: e.g,
            params,
            train: e.train,
        })
    } else {
        Err(e.diags)
    }
}

/// The names of a model's parameters (a variant's are its base's); empty if it cannot be resolved.
pub fn param_names(prog: &Program, name: &str) -> Vec<String> {
    prog.model(name)
        .and_then(|source| resolve_variant(prog, source).ok())
        .map(|(def, _)| def.params.iter().map(|p| p.name.name.clone()).collect())
        .unwrap_or_default()
}

/// The parameters of a model that have no value (no default, not set by a variant): a model
/// with any is a template that only its variants or `--set` can instantiate.
pub fn missing_params(prog: &Program, name: &str) -> Vec<String> {
    let Some(source) = prog.model(name) else {
        return Vec::new();
    };
    // A broken variant counts as complete so that checking it reports the error.
    let Ok((def, args)) = resolve_variant(prog, source) else {
        return Vec::new();
    };
    def.params
        .iter()
        .filter(|p| p.default.is_none() && !args.iter().any(|a| a.0 == p.name.name))
        .map(|p| p.name.name.clone())
        .collect()
}

/// Arguments collected along a chain of variants: parameter name, value, where written.
type VariantArgs<'p> = Vec<(String, &'p Expr, Span)>;

/// Follows `model a = b(...)` to the defining model, collecting arguments (outermost last
/// so that it wins).
fn resolve_variant<'p>(
    prog: &'p Program,
    source: &'p ModelSource,
) -> Result<(&'p Def, VariantArgs<'p>), Vec<Diag>> {
    let mut args: Vec<(String, &'p Expr, Span)> = Vec::new();
    let mut current = source;
    let mut seen: Vec<&str> = Vec::new();
    loop {
        match current {
            ModelSource::Def(def) => {
                // Positional variant arguments follow the base's parameter order.
                for (name, _, span) in &mut args {
                    if let Some(i) = name.strip_prefix('#').and_then(|i| i.parse::<usize>().ok()) {
                        match def.params.get(i) {
                            Some(p) => *name = p.name.name.clone(),
                            None => {
                                return Err(vec![
                                    Diag::new(
                                        "dlc::unknown_arg",
                                        format!(
                                            "model `{}` takes {} parameters",
                                            def.name.name,
                                            def.params.len()
                                        ),
                                    )
                                    .label(*span, "one too many")
                                    .help(format!(
                                        "parameters: {}",
                                        def.params
                                            .iter()
                                            .map(|p| p.name.name.as_str())
                                            .collect::<Vec<_>>()
                                            .join(", ")
                                    )),
                                ]);
                            }
                        }
                    }
                }
                let mut errs = Vec::new();
                for (name, _, span) in &args {
                    if !def.params.iter().any(|p| &p.name.name == name) {
                        let names = def.params.iter().map(|p| p.name.name.as_str());
                        let mut d = Diag::new(
                            "dlc::unknown_arg",
                            format!("model `{}` has no parameter `{name}`", def.name.name),
                        )
                        .label(*span, "unknown parameter");
                        d = match did_you_mean(name, names) {
                            Some(s) => d.help(format!("did you mean `{s}`?")),
                            None => d.help(format!(
                                "parameters: {}",
                                def.params
                                    .iter()
                                    .map(|p| p.name.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )),
                        };
                        errs.push(d);
                    }
                }
                return if errs.is_empty() {
                    Ok((def, args))
                } else {
                    Err(errs)
                };
            }
            ModelSource::Variant {
                name,
                base,
                args: vargs,
                ..
            } => {
                if seen.contains(&name.name.as_str()) {
                    return Err(vec![
                        Diag::new(
                            "dlc::recursive_model",
                            format!("model `{}` is defined in terms of itself", name.name),
                        )
                        .label(name.span, "this variant")
                        .help("a variant must end at a model with a body"),
                    ]);
                }
                seen.push(&name.name);
                // Earlier (outer) arguments win over the base's own variant arguments.
                let mut mine = Vec::new();
                for (i, a) in vargs.iter().enumerate() {
                    let key = match &a.name {
                        Some(n) => n.name.clone(),
                        None => format!("#{i}"),
                    };
                    if !args.iter().any(|(k, _, _)| *k == key) {
                        mine.push((key, &a.value, a.span));
                    }
                }
                args.extend(mine);
                current = match prog.model(&base.name) {
                    Some(m) => m,
                    None => {
                        let names = prog.models.iter().map(|m| m.name().name.as_str());
                        let mut d = Diag::new(
                            "dlc::unknown_model",
                            format!("no model named `{}`", base.name),
                        )
                        .label(base.span, "unknown model");
                        if let Some(s) = did_you_mean(&base.name, names) {
                            d = d.help(format!("did you mean `{s}`?"));
                        } else {
                            d = d.help(
                                "a variant's base must be a model defined here or in a `use`d file",
                            );
                        }
                        return Err(vec![d]);
                    }
                };
            }
        }
    }
}

/// The tensor flowing through a chain: none before the first input.
type Flow = Option<Value>;

/// What a chain term produced.
enum Step {
    /// A new flowing tensor.
    Flow(Flow),
    /// A plain value (only meaningful as a whole `let` right-hand side).
    Value(Value, Span),
}

struct Frame {
    vars: HashMap<String, (Value, Span)>,
    /// Lookups do not see past a barrier: block bodies see only their parameters.
    barrier: bool,
}

#[derive(Default)]
struct ScopeState {
    next_index: usize,
    names: HashMap<String, Span>,
    structural: HashMap<&'static str, usize>,
}

struct Elaborator<'p> {
    prog: &'p Program,
    g: Graph,
    diags: Vec<Diag>,
    frames: Vec<Frame>,
    scope: ScopeId,
    scope_state: Vec<ScopeState>,
    calls: Vec<(Rc<str>, Span)>,
    /// Statements not yet evaluated in each body being evaluated (for use-before-definition).
    pending: Vec<&'p [Stmt]>,
    /// The `let` bindings being evaluated, innermost last.
    lets: Vec<&'p Ident>,
    outputs: Vec<(String, Span)>,
    /// The tensor that entered each block being expanded: what `in` describes there.
    block_inputs: Vec<Flow>,
    /// The model's training settings, and where its `train` section is.
    train: Vec<TrainSetting>,
    train_span: Option<Span>,
    node_limit_hit: bool,
}

impl<'p> Elaborator<'p> {
    fn new(prog: &'p Program, name: &str, span: Span) -> Self {
        Elaborator {
            prog,
            g: Graph::new(name, span),
            diags: Vec::new(),
            frames: vec![Frame {
                vars: HashMap::new(),
                barrier: true,
            }],
            scope: 0,
            scope_state: vec![ScopeState::default()],
            calls: Vec::new(),
            pending: Vec::new(),
            lets: Vec::new(),
            outputs: Vec::new(),
            block_inputs: Vec::new(),
            train: Vec::new(),
            train_span: None,
            node_limit_hit: false,
        }
    }

    /// Records a diagnostic; inside a block, the call being expanded is labelled too.
    fn error(&mut self, mut d: Diag) {
        if let Some((name, span)) = self.calls.last()
            && !d.labels.iter().any(|(s, _)| s == span)
        {
            d = d.label(*span, format!("in this use of `{name}`"));
        }
        self.diags.push(d);
    }

    // ---- model ---------------------------------------------------------------------

    fn bind_model_params(
        &mut self,
        def: &'p Def,
        args: &[(String, &'p Expr, Span)],
        overrides: &[Override],
    ) {
        for o in overrides {
            if !def.params.iter().any(|p| p.name.name == o.name) {
                let names = def.params.iter().map(|p| p.name.name.as_str());
                let mut d = Diag::new(
                    "dlc::unknown_arg",
                    format!("model `{}` has no parameter `{}`", def.name.name, o.name),
                )
                .label(o.span, "unknown parameter");
                let list = def
                    .params
                    .iter()
                    .map(|p| p.name.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                d = match did_you_mean(&o.name, names) {
                    Some(s) => d.help(format!("did you mean `--set {s}=...`? parameters: {list}")),
                    None => d.help(format!(
                        "parameters: {}",
                        if list.is_empty() { "none" } else { &list }
                    )),
                };
                self.error(d);
            }
        }
        for p in &def.params {
            let value = if let Some(o) = overrides.iter().rev().find(|o| o.name == p.name.name) {
                self.eval(&o.value, &None)
            } else if let Some((_, e, _)) = args.iter().find(|(n, _, _)| *n == p.name.name) {
                self.eval(e, &None)
            } else if let Some(e) = &p.default {
                self.eval(e, &None)
            } else {
                self.error(
                    Diag::new("dlc::missing_arg", format!("model `{}` needs a value for `{}`", def.name.name, p.name.name))
                        .label(p.name.span, "no default")
                        .help(format!(
                            "pass `--model` a variant that sets it (`model x = {}({}: ...)`) or `--set {}=...`",
                            def.name.name, p.name.name, p.name.name
                        )),
                );
                Value::Poison
            };
            self.bind(&p.name, value);
        }
    }

    fn model_body(&mut self, def: &'p Def) {
        let flow = self.body(&def.body, None);
        self.finish_outputs(def, flow);
        if self.diags.is_empty() {
            self.check_all_used();
        }
    }

    /// Reports inputs and layers whose results reach no output.
    fn check_all_used(&mut self) {
        use petgraph::visit::{Reversed, Walker};
        let mut live = vec![false; self.g.dag.node_count()];
        for &out in &self.g.outputs {
            for n in
                petgraph::visit::Bfs::new(Reversed(&self.g.dag), out).iter(Reversed(&self.g.dag))
            {
                live[n.index()] = true;
            }
        }
        let dead: Vec<_> = self
            .g
            .dag
            .node_indices()
            .filter(|n| !live[n.index()])
            .collect();
        let (inputs, layers): (Vec<_>, Vec<_>) = dead
            .into_iter()
            .partition(|n| matches!(self.g.dag[*n].op, Op::Input(_)));
        for n in inputs {
            let node = &self.g.dag[n];
            let d = Diag::new(
                "dlc::unused",
                format!("input `{}` is never used", node.name),
            )
            .label(node.span, "no output depends on it")
            .help("use it in a chain (`x linear(10)`), or remove it");
            self.error(d);
        }
        if let Some(&first) = layers.first() {
            let node = &self.g.dag[first];
            let more = match layers.len() - 1 {
                0 => String::new(),
                n => format!(" (nor do {n} layers after it)"),
            };
            let d = Diag::new(
                "dlc::unused",
                format!("the result of `{}` reaches no output{more}", node.name),
            )
            .label(node.span, "computed but never used")
            .help("remove these layers, or declare their result with `output name = ...`");
            self.error(d);
        }
    }

    fn finish_outputs(&mut self, def: &'p Def, flow: Flow) {
        if self.outputs.is_empty() {
            match flow {
                Some(Value::Tensor(t)) => self.add_output("output", t, def.span),
                Some(_) => {}
                None => self.error(
                    Diag::new("dlc::no_output", format!("model `{}` has no output", def.name.name))
                        .label(def.name.span, "produces no tensor")
                        .help("declare an `input` and layers after it, or name a result with `output name`"),
                ),
            }
        }
    }

    fn add_output(&mut self, name: &str, t: Outlet, span: Span) {
        if let Some((_, prev)) = self.outputs.iter().find(|(n, _)| n == name) {
            let prev = *prev;
            self.error(
                Diag::new(
                    "dlc::duplicate_name",
                    format!("output `{name}` is declared twice"),
                )
                .label(span, "second output")
                .label(prev, "first declared here")
                .help("give each output its own name"),
            );
            return;
        }
        self.outputs.push((name.to_string(), span));
        let saved = std::mem::replace(&mut self.scope, 0);
        let local = self.reserve_name(name, span);
        self.scope = saved;
        if let Ok(o) = self.g.wire(0, &local, Op::Output, span, &[t]) {
            self.g.outputs.push(o.node);
        }
    }

    // ---- statements ----------------------------------------------------------------

    /// Evaluates a body's statements in a new (transparent) frame.
    fn body(&mut self, body: &'p Body, flow: Flow) -> Flow {
        self.frames.push(Frame {
            vars: HashMap::new(),
            barrier: false,
        });
        let flow = self.stmts(&body.stmts, flow);
        self.frames.pop();
        flow
    }

    fn stmts(&mut self, stmts: &'p [Stmt], mut flow: Flow) -> Flow {
        for (i, stmt) in stmts.iter().enumerate() {
            if self.node_limit_hit {
                break;
            }
            self.pending.push(&stmts[i + 1..]);
            flow = self.stmt(stmt, flow);
            self.pending.pop();
        }
        flow
    }

    fn stmt(&mut self, stmt: &'p Stmt, flow: Flow) -> Flow {
        match stmt {
            Stmt::Input {
                name,
                dtype,
                dims,
                span,
            } => self.input(name, dtype.as_ref(), dims, *span, flow),
            Stmt::Output { name, chain, span } => {
                if !self.calls.is_empty() {
                    self.error(
                        Diag::new("dlc::misplaced", "`output` inside a block")
                            .label(*span, "outputs belong to the model")
                            .help("declare outputs in the model's body; a block's result is its last tensor"),
                    );
                    return flow;
                }
                let (value, flow) = match chain {
                    Some(c) => {
                        self.lets.push(name);
                        let step = self.chain(c, flow.clone());
                        self.lets.pop();
                        match step {
                            Step::Flow(Some(v)) => {
                                self.bind(name, v.clone());
                                (Some(v.clone()), Some(v))
                            }
                            Step::Flow(None) => (None, None),
                            Step::Value(v, s) => {
                                self.not_a_tensor(&v, s, "an output");
                                (None, flow)
                            }
                        }
                    }
                    None => (Some(self.lookup_var(name)), flow),
                };
                match value {
                    Some(Value::Tensor(t)) => self.add_output(&name.name, t, *span),
                    Some(Value::Poison) | None => {}
                    Some(v) => self.not_a_tensor(&v, name.span, "an output"),
                }
                flow
            }
            Stmt::Let { name, chain, .. } => {
                if let Some(frame) = self.frames.last()
                    && let Some((_, prev)) = frame.vars.get(&name.name)
                {
                    let prev = *prev;
                    self.error(
                        Diag::new(
                            "dlc::duplicate_name",
                            format!("`{}` is already defined", name.name),
                        )
                        .label(name.span, "defined again here")
                        .label(prev, "first defined here")
                        .help("pick another name"),
                    );
                    return flow;
                }
                self.lets.push(name);
                let step = self.chain(chain, flow.clone());
                self.lets.pop();
                match step {
                    Step::Flow(Some(v)) => {
                        self.bind(name, v.clone());
                        Some(v)
                    }
                    Step::Flow(None) => {
                        self.bind(name, Value::Poison);
                        None
                    }
                    Step::Value(v, _) => {
                        self.bind(name, v);
                        flow
                    }
                }
            }
            Stmt::Train { settings, span } => {
                self.train_section(settings, *span);
                flow
            }
            Stmt::Chain(chain) => match self.chain(chain, flow) {
                Step::Flow(f) => f,
                Step::Value(v, s) => {
                    if !matches!(v, Value::Poison) {
                        self.error(
                            Diag::new(
                                "dlc::not_a_layer",
                                format!("{} where a layer was expected", v.type_name()),
                            )
                            .label(s, format!("this is {}, not a layer", v.type_name()))
                            .help("bind values with `let name = ...` or pass them as arguments"),
                        );
                    }
                    Some(Value::Poison)
                }
            },
        }
    }

    fn train_section(&mut self, settings: &'p [(Ident, Expr)], span: Span) {
        let kw = Span {
            end: span.start + "train".len() as u32,
            ..span
        };
        if !self.calls.is_empty() {
            self.error(
                Diag::new("dlc::misplaced", "`train` inside a block")
                    .label(kw, "training settings belong to the model")
                    .help("move the `train { ... }` section into the model's body"),
            );
            return;
        }
        if let Some(prev) = self.train_span {
            self.error(
                Diag::new("dlc::duplicate_name", "the model has two `train` sections")
                    .label(kw, "second section")
                    .label(prev, "first section")
                    .help("merge them into one"),
            );
            return;
        }
        self.train_span = Some(kw);
        for (name, expr) in settings {
            if let Some(prev) = self.train.iter().find(|t| t.name.name == name.name) {
                let prev = prev.name.span;
                self.error(
                    Diag::new(
                        "dlc::duplicate_arg",
                        format!("setting `{}` is given twice", name.name),
                    )
                    .label(name.span, "given again here")
                    .label(prev, "first given here")
                    .help("give each setting once"),
                );
                continue;
            }
            if let Some(value) = self.setting(expr) {
                self.train.push(TrainSetting {
                    name: name.clone(),
                    value,
                    span: expr.span,
                });
            }
        }
    }

    /// Evaluates a training setting: unbound names and calls of unbound names stay symbolic.
    fn setting(&mut self, e: &Expr) -> Option<Setting> {
        match &e.kind {
            ExprKind::Var(n) if self.lookup(n).is_none() => Some(Setting::Name(n.clone())),
            ExprKind::Call(callee, args) => {
                let ExprKind::Var(n) = &callee.kind else {
                    return self.plain_setting(e);
                };
                if self.lookup(n).is_some() {
                    return self.plain_setting(e);
                }
                let mut out = Vec::new();
                for a in args {
                    out.push((
                        a.name.as_ref().map(|k| k.name.clone()),
                        self.setting(&a.value)?,
                    ));
                }
                Some(Setting::Call(n.clone(), out))
            }
            ExprKind::List(xs) => xs
                .iter()
                .map(|x| self.setting(x))
                .collect::<Option<Vec<_>>>()
                .map(Setting::List),
            _ => self.plain_setting(e),
        }
    }

    fn plain_setting(&mut self, e: &Expr) -> Option<Setting> {
        fn convert(v: &Value) -> Option<Setting> {
            Some(match v {
                Value::Int(n) => Setting::Int(*n),
                Value::Float(x) => Setting::Float(*x),
                Value::Bool(b) => Setting::Bool(*b),
                Value::Str(s) => Setting::Str(s.to_string()),
                Value::List(xs) | Value::Tuple(xs) => {
                    Setting::List(xs.iter().map(convert).collect::<Option<_>>()?)
                }
                _ => return None,
            })
        }
        let v = self.eval(e, &None);
        let converted = convert(&v);
        if converted.is_none() && !matches!(v, Value::Poison) {
            self.error(
                Diag::new("dlc::wrong_type", format!("a training setting cannot be {}", v.type_name()))
                    .label(e.span, format!("this is {}", v.type_name()))
                    .help("settings are numbers, booleans, strings, names or calls such as `sgd(lr: 0.1)`"),
            );
        }
        converted
    }

    fn input(
        &mut self,
        name: &'p Ident,
        dtype: Option<&'p Ident>,
        dims: &'p [Expr],
        span: Span,
        flow: Flow,
    ) -> Flow {
        if !self.calls.is_empty() {
            self.error(
                Diag::new("dlc::misplaced", "`input` inside a block")
                    .label(span, "inputs belong to the model")
                    .help("a block receives the flowing tensor; pass other tensors as arguments"),
            );
            return flow;
        }
        let dtype = match dtype {
            None => DType::Float,
            Some(dt) if dt.name == "tokens" => DType::Tokens,
            Some(dt) => {
                self.error(
                    Diag::new(
                        "dlc::unknown_type",
                        format!("unknown input type `{}`", dt.name),
                    )
                    .label(dt.span, "not a known input type")
                    .help("image and feature inputs are written `input x: [c, h, w]`, sequences of token ids `input src: tokens[T]`"),
                );
                return Some(Value::Poison);
            }
        };
        let mut shape = vec![Shape::batch()];
        let mut ok = true;
        for d in dims {
            let v = match &d.kind {
                ExprKind::Var(n) if self.lookup(n).is_none() => Value::Sym(Rc::from(n.as_str())),
                _ => self.eval(d, &None),
            };
            match v {
                Value::Int(n) if n > 0 => shape.push(Dim::Known(n as u64)),
                Value::Int(n) => {
                    ok = false;
                    self.error(
                        Diag::new(
                            "dlc::non_positive",
                            format!("input dimension {n} is not positive"),
                        )
                        .label(d.span, "must be at least 1")
                        .help("shapes are written without the batch dimension, e.g. `[1, 28, 28]`"),
                    );
                }
                Value::Sym(s) => shape.push(Dim::Sym(Arc::from(&*s))),
                Value::Poison => ok = false,
                other => {
                    ok = false;
                    self.error(
                        Diag::new(
                            "dlc::wrong_type",
                            format!(
                                "an input dimension must be an integer, found {}",
                                other.type_name()
                            ),
                        )
                        .label(d.span, "not an integer")
                        .help("write sizes as integers, or a name for a symbolic size"),
                    );
                }
            }
        }
        if shape.len() == 1 {
            ok = false;
            self.error(
                Diag::new(
                    "dlc::non_positive",
                    format!("input `{}` has no dimensions", name.name),
                )
                .label(span, "empty shape")
                .help("give the shape without the batch dimension, e.g. `[1, 28, 28]`"),
            );
        }
        let value = if ok {
            let op = Op::Input(ops::reshape::Input {
                name: name.name.clone(),
                shape: Shape(shape, dtype),
            });
            let local = self.reserve_name(&name.name, name.span);
            match self.g.wire(0, &local, op, span, &[]) {
                Ok(o) => {
                    self.g.inputs.push(o.node);
                    Value::Tensor(o)
                }
                Err(_) => Value::Poison,
            }
        } else {
            Value::Poison
        };
        self.bind(name, value.clone());
        Some(value)
    }

    /// Evaluates a chain from `flow`. A single term that is a plain value yields that value.
    fn chain(&mut self, chain: &'p Chain, mut flow: Flow) -> Step {
        let single = chain.terms.len() == 1;
        for term in &chain.terms {
            match self.term(term, flow) {
                Step::Flow(f) => flow = f,
                Step::Value(v, s) if single => return Step::Value(v, s),
                Step::Value(v, s) => {
                    self.not_a_tensor(&v, s, "a layer");
                    flow = Some(Value::Poison);
                }
            }
        }
        Step::Flow(flow)
    }

    fn not_a_tensor(&mut self, v: &Value, span: Span, what: &str) {
        if matches!(v, Value::Poison) {
            return;
        }
        self.error(
            Diag::new(
                "dlc::not_a_layer",
                format!("expected {what}, found {}", v.type_name()),
            )
            .label(span, format!("this is {}", v.type_name()))
            .help(
                "layers are op or block calls such as `conv(64, kernel: 3)`, or names of tensors",
            ),
        );
    }

    // ---- terms -----------------------------------------------------------------------

    fn term(&mut self, term: &'p Term, flow: Flow) -> Step {
        let label = self.label(term);
        self.term_at(term, label, flow)
    }

    /// A term under its label; a dotted label `a.b` first enters the group `a` of the current
    /// scope (continuing it, or making it) and labels the term `b` there.
    fn term_at(&mut self, term: &'p Term, label: Option<(String, Span)>, flow: Flow) -> Step {
        if let Some((path, span)) = &label
            && let Some((group, rest)) = path.split_once('.')
        {
            let Some(id) = self.group_scope(group, *span) else {
                return Step::Flow(Some(Value::Poison));
            };
            let saved = std::mem::replace(&mut self.scope, id);
            let step = self.term_at(term, Some((rest.to_string(), *span)), flow);
            self.scope = saved;
            return step;
        }
        match &term.kind {
            // A labelled `if` names the layers it chooses, like a labelled group.
            TermKind::Expr(
                e @ Expr {
                    kind: ExprKind::If(_),
                    ..
                },
            ) if label.is_some() => {
                let name = self.unique_name(label, term.span);
                self.in_scope(&name, ScopeKind::Group, term.span, |this| {
                    this.layer_expr(e, None, term.span, flow)
                })
            }
            TermKind::Expr(e) => self.layer_expr(e, label, term.span, flow),
            TermKind::Group(body) => {
                let name = self.unique_name(label, term.span);
                self.in_scope(&name, ScopeKind::Group, term.span, |this| {
                    Step::Flow(this.body(body, flow))
                })
            }
            _ => match label {
                Some(l) => {
                    let name = self.unique_name(Some(l), term.span);
                    self.in_scope(&name, ScopeKind::Group, term.span, |this| {
                        Step::Flow(this.construct(&term.kind, term.span, flow))
                    })
                }
                None => Step::Flow(self.construct(&term.kind, term.span, flow)),
            },
        }
    }

    /// The group `local` of the current scope, for a dotted label: the one already there
    /// (a group or block call), or a new group.
    fn group_scope(&mut self, local: &str, span: Span) -> Option<ScopeId> {
        if !self.scope_state[self.scope].names.contains_key(local) {
            let name = self.unique_name(Some((local.to_string(), span)), span);
            let id = self.g.open_scope(self.scope, &name, ScopeKind::Group, span);
            self.scope_state.push(ScopeState::default());
            return Some(id);
        }
        let found = self.g.scopes[self.scope]
            .items
            .iter()
            .find_map(|item| match item {
                ScopeItem::Scope(id) if self.g.scopes[*id].local == local => Some(*id),
                _ => None,
            });
        if found.is_none() {
            let path = crate::ir::join(&self.g.scopes[self.scope].path, local);
            let first = self.scope_state[self.scope].names[local];
            self.error(
                Diag::new(
                    "dlc::bad_label",
                    format!("`{path}` is a layer or tensor, not a group"),
                )
                .label(span, format!("puts a layer inside `{path}`"))
                .label(first, format!("`{path}` is defined here"))
                .help("a dotted label `a.b` adds to the group or block call labelled `a` in the same body"),
            );
        }
        found
    }

    fn in_scope<T>(
        &mut self,
        local: &str,
        kind: ScopeKind,
        span: Span,
        f: impl FnOnce(&mut Self) -> T,
    ) -> T {
        let id = self.g.open_scope(self.scope, local, kind, span);
        self.scope_state.push(ScopeState::default());
        let saved = std::mem::replace(&mut self.scope, id);
        let out = f(self);
        self.scope = saved;
        out
    }

    /// The term's label, with template holes evaluated.
    fn label(&mut self, term: &'p Term) -> Option<(String, Span)> {
        match term.label.as_ref()? {
            Label::Name(id) => Some((id.name.clone(), id.span)),
            Label::Template(text, span) => {
                let mut out = String::new();
                let mut rest = text.as_str();
                let mut offset = span.start as usize;
                while let Some(open) = rest.find('{') {
                    out.push_str(&rest[..open]);
                    let Some(close) = rest[open..].find('}') else {
                        self.error(
                            Diag::new("dlc::syntax", "unclosed `{` in a layer name")
                                .label(
                                    Span::new(span.file, offset + open, offset + open + 1),
                                    "opened here",
                                )
                                .help("write holes as `{expr}`, e.g. \"layer{i + 1}\""),
                        );
                        return None;
                    };
                    let hole = &rest[open + 1..open + close];
                    match crate::syntax::parse_expr(hole, span.file, offset + open + 1) {
                        Ok(e) => {
                            let v = self.eval(&e, &None);
                            if matches!(v, Value::Poison) {
                                return None;
                            }
                            out.push_str(&v.to_string());
                        }
                        Err(d) => {
                            self.error(d);
                            return None;
                        }
                    }
                    offset += open + close + 1;
                    rest = &rest[open + close + 1..];
                }
                out.push_str(rest);
                let valid = out.split('.').all(|part| {
                    !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                });
                if !valid {
                    self.error(
                        Diag::new(
                            "dlc::bad_name",
                            format!("`{out}` is not a valid layer name"),
                        )
                        .label(*span, "this name")
                        .help("layer names use letters, digits and `_` (and `.` between the parts of a path)"),
                    );
                    return None;
                }
                Some((out, *span))
            }
        }
    }

    /// A name for the next item in the current scope: its label, or its position.
    fn unique_name(&mut self, label: Option<(String, Span)>, span: Span) -> String {
        let st = &mut self.scope_state[self.scope];
        let index = st.next_index;
        st.next_index += 1;
        let (name, at) = match label {
            Some((l, s)) => (l, s),
            None => (index.to_string(), span),
        };
        if let Some(prev) = st.names.get(&name).copied() {
            let path = crate::ir::join(&self.g.scopes[self.scope].path, &name);
            self.error(
                Diag::new("dlc::duplicate_name", format!("two layers are named `{path}`"))
                    .label(at, "this name is taken")
                    .label(prev, "first used here")
                    .help("layer names must be unique within their block; wrap repeated named layers in a block or `{ }`"),
            );
            return format!("{name}#{index}");
        }
        st.names.insert(name.clone(), at);
        name
    }

    /// Claims a model-level name that does not count as a position (inputs, outputs).
    fn reserve_name(&mut self, name: &str, span: Span) -> String {
        let st = &mut self.scope_state[self.scope];
        if let Some(prev) = st.names.get(name).copied() {
            self.error(
                Diag::new(
                    "dlc::duplicate_name",
                    format!("the name `{name}` is used twice"),
                )
                .label(span, "this name is taken")
                .label(prev, "first used here")
                .help("inputs, outputs and layers of a model need distinct names"),
            );
            return format!("{name}#");
        }
        st.names.insert(name.to_string(), span);
        name.to_string()
    }

    /// A name for a node that the language adds (the `add` of a residual): not counted.
    fn structural_name(&mut self, kind: &'static str) -> String {
        let st = &mut self.scope_state[self.scope];
        loop {
            let n = st.structural.entry(kind).or_insert(0);
            let name = if *n == 0 {
                kind.to_string()
            } else {
                format!("{kind}_{n}")
            };
            *n += 1;
            if !st.names.contains_key(&name) {
                st.names.insert(name.clone(), Span::default());
                return name;
            }
        }
    }

    /// A label on something that makes no layer (a tensor name) would silently name nothing.
    fn unused_label(&mut self, label: Option<(String, Span)>, what: &str) {
        if let Some((l, span)) = label {
            self.error(
                Diag::new(
                    "dlc::bad_label",
                    format!("the label `{l}` names no layer: `{what}` is a tensor"),
                )
                .label(span, "this label is not used")
                .help("labels name ops, blocks, groups and constructs; to name a tensor use `let`"),
            );
        }
    }

    fn layer_expr(
        &mut self,
        e: &'p Expr,
        label: Option<(String, Span)>,
        span: Span,
        flow: Flow,
    ) -> Step {
        match &e.kind {
            ExprKind::Var(name) => match self.resolve_layer(name, e.span, true) {
                Some(Value::Tensor(t)) => {
                    self.unused_label(label, name);
                    Step::Flow(Some(Value::Tensor(t)))
                }
                Some(Value::Callable(c)) if !matches!(c, Callable::Builtin(_)) => {
                    Step::Flow(self.apply(&c, &[], span, e.span, label, flow))
                }
                Some(Value::Poison) | None => Step::Flow(Some(Value::Poison)),
                Some(v) => Step::Value(v, e.span),
            },
            ExprKind::Call(callee, args) => {
                let target = match &callee.kind {
                    ExprKind::Var(name) => self.resolve_layer(name, callee.span, true),
                    _ => Some(self.eval(callee, &flow)),
                };
                match target {
                    Some(Value::Callable(Callable::Builtin(_))) => {
                        let v = self.eval(e, &flow);
                        match v {
                            Value::Tensor(_) => Step::Flow(Some(v)),
                            v => Step::Value(v, e.span),
                        }
                    }
                    Some(Value::Callable(c)) => {
                        Step::Flow(self.apply(&c, args, span, callee.span, label, flow))
                    }
                    Some(Value::Poison) | None => Step::Flow(Some(Value::Poison)),
                    Some(v) => {
                        let hidden = match &callee.kind {
                            ExprKind::Var(n)
                                if ops::lookup(n).is_some() || self.prog.blocks.contains_key(n) =>
                            {
                                Some(n)
                            }
                            _ => None,
                        };
                        let help = match hidden {
                            Some(n) => format!(
                                "the variable `{n}` hides the layer `{n}`; rename the variable"
                            ),
                            None => {
                                "only ops, blocks and builtin functions take arguments".to_string()
                            }
                        };
                        self.error(
                            Diag::new(
                                "dlc::not_callable",
                                format!("{} cannot be called", v.type_name()),
                            )
                            .label(callee.span, format!("this is {}", v.type_name()))
                            .help(help),
                        );
                        Step::Flow(Some(Value::Poison))
                    }
                }
            }
            ExprKind::If(i) => match self.condition(&i.cond, &flow) {
                Some(true) => self.branch_body(&i.then, flow),
                Some(false) => match &i.otherwise {
                    Some(b) => self.branch_body(b, flow),
                    None => Step::Flow(flow),
                },
                None => Step::Flow(Some(Value::Poison)),
            },
            _ => match self.eval(e, &flow) {
                Value::Tensor(t) => Step::Flow(Some(Value::Tensor(t))),
                v => Step::Value(v, e.span),
            },
        }
    }

    /// The chosen body of an `if` in layer position: a one-term body may be a value.
    fn branch_body(&mut self, body: &'p Body, flow: Flow) -> Step {
        if let [Stmt::Chain(c)] = body.stmts.as_slice() {
            self.frames.push(Frame {
                vars: HashMap::new(),
                barrier: false,
            });
            let step = self.chain(c, flow);
            self.frames.pop();
            return step;
        }
        Step::Flow(self.body(body, flow))
    }

    /// Applies an op or block to the flowing tensor.
    fn apply(
        &mut self,
        c: &Callable,
        args: &'p [Arg],
        span: Span,
        name_span: Span,
        label: Option<(String, Span)>,
        flow: Flow,
    ) -> Flow {
        match c {
            Callable::Op(def) => self.apply_op(def, args, span, name_span, label, flow),
            Callable::Block(name) => {
                self.call_block(name.clone(), args, span, name_span, label, flow)
            }
            Callable::Builtin(_) => Some(Value::Poison),
        }
    }

    fn no_input(&mut self, what: &str, span: Span) -> Flow {
        self.error(
            Diag::new("dlc::no_input", format!("`{what}` has no input tensor"))
                .label(span, "nothing flows into this layer")
                .help("declare the model's input first: `input image: [1, 28, 28]`"),
        );
        Some(Value::Poison)
    }

    fn apply_op(
        &mut self,
        def: &'static OpDef,
        args: &'p [Arg],
        span: Span,
        name_span: Span,
        label: Option<(String, Span)>,
        flow: Flow,
    ) -> Flow {
        let local = self.unique_name(label, span);
        let mut positional = 0;
        let mut values: Vec<(Option<&'p Ident>, Value, Span)> = Vec::new();
        for a in args {
            let spec = match &a.name {
                Some(k) => def.params.iter().find(|p| p.name == k.name),
                None => {
                    positional += 1;
                    def.params.get(positional - 1)
                }
            };
            let value = match spec {
                Some(spec) if self.unquoted_choice(def, spec, &a.value) => Value::Poison,
                _ => self.eval(&a.value, &flow),
            };
            values.push((a.name.as_ref(), value, a.span));
        }
        let mut extra = Vec::new();
        let mut rest = Vec::new();
        let mut poisoned = false;
        for (kw, v, s) in values {
            poisoned |= matches!(v, Value::Poison);
            match (&v, kw, def.arity) {
                (Value::Tensor(t), None, ops::Arity::Many) if rest.is_empty() => extra.push(*t),
                // A tensor that already failed: reported once, not again as a stray argument.
                (Value::Poison, None, ops::Arity::Many) if rest.is_empty() => {}
                _ => rest.push((kw, v, s)),
            }
        }
        let bound = self.bind_op_args(def, rest, name_span);
        let Some(flow) = flow else {
            return self.no_input(def.name, name_span);
        };
        let (Some(bound), Value::Tensor(input), false) = (bound, flow, poisoned) else {
            return Some(Value::Poison);
        };
        let op = match (def.build)(&bound) {
            Ok(op) => op,
            Err((arg, message)) => {
                let at = arg_span(def, args, arg).unwrap_or(name_span);
                self.error(
                    Diag::new("dlc::bad_arg", format!("`{}`: {message}", def.name))
                        .label(at, format!("invalid `{arg}`"))
                        .help(signature(def)),
                );
                return Some(Value::Poison);
            }
        };
        let mut inputs = vec![input];
        inputs.extend(extra);
        inputs.extend(bound.tensors());
        self.wire(&local, op, span, &inputs)
    }

    /// Reports a choice written without quotes (`mode: bilinear`): an unbound name where a
    /// choice argument expects one of its strings.
    fn unquoted_choice(&mut self, def: &OpDef, spec: &ops::ParamSpec, e: &Expr) -> bool {
        let (ops::ArgKind::Choice(choices), ExprKind::Var(name)) = (spec.kind, &e.kind) else {
            return false;
        };
        if self.lookup(name).is_some() {
            return false;
        }
        let Some(choice) = choices
            .iter()
            .copied()
            .find(|c| *c == name.as_str())
            .or_else(|| did_you_mean(name, choices.iter().copied()))
        else {
            return false;
        };
        self.error(
            Diag::new(
                "dlc::unknown_choice",
                format!(
                    "`{}` of `{}` is a string, but `{name}` is written without quotes",
                    spec.name, def.name
                ),
            )
            .label(e.span, "not a string")
            .help(format!("write `{}: \"{choice}\"`", spec.name)),
        );
        true
    }

    /// Wires a node in the current scope, turning a shape error into a diagnostic at `span`.
    fn wire(&mut self, local: &str, op: Op, span: Span, inputs: &[Outlet]) -> Flow {
        if self.g.dag.node_count() >= MAX_NODES {
            if !self.node_limit_hit {
                self.node_limit_hit = true;
                self.error(
                    Diag::new(
                        "dlc::too_large",
                        format!("the model expands to more than {MAX_NODES} layers"),
                    )
                    .label(span, "stopped here")
                    .help("check the repeat counts"),
                );
            }
            return Some(Value::Poison);
        }
        let kind = op.kind();
        match self.g.wire(self.scope, local, op, span, inputs) {
            Ok(o) => Some(Value::Tensor(o)),
            Err(e) => {
                let shapes: Vec<String> = inputs
                    .iter()
                    .map(|o| self.g.shape(*o).to_string())
                    .collect();
                let label = if shapes.len() == 1 {
                    format!("`{kind}` receives {}", shapes[0])
                } else {
                    format!("`{kind}` receives {}", shapes.join(" and "))
                };
                self.error(Diag::new(e.code, e.message).label(span, label).help(e.help));
                Some(Value::Poison)
            }
        }
    }

    fn bind_op_args(
        &mut self,
        def: &OpDef,
        given: Vec<(Option<&'p Ident>, Value, Span)>,
        name_span: Span,
    ) -> Option<ops::Args> {
        let mut slots: Vec<Option<(Value, Span)>> = vec![None; def.params.len()];
        let mut ok = true;
        let mut positional = 0;
        for (kw, v, s) in given {
            let index = match kw {
                None => {
                    let i = positional;
                    positional += 1;
                    if i >= def.params.len() {
                        ok = false;
                        self.error(
                            Diag::new(
                                "dlc::unknown_arg",
                                format!(
                                    "`{}` takes {} positional argument{}",
                                    def.name,
                                    def.params.len(),
                                    if def.params.len() == 1 { "" } else { "s" }
                                ),
                            )
                            .label(s, "one too many")
                            .help(signature(def)),
                        );
                        continue;
                    }
                    i
                }
                Some(k) => match def.params.iter().position(|p| p.name == k.name) {
                    Some(i) => i,
                    None => {
                        ok = false;
                        let mut d = Diag::new(
                            "dlc::unknown_arg",
                            format!("`{}` has no argument `{}`", def.name, k.name),
                        )
                        .label(k.span, "unknown argument");
                        d = match did_you_mean(&k.name, def.params.iter().map(|p| p.name)) {
                            Some(n) => d.help(format!("did you mean `{n}`? {}", signature(def))),
                            None => d.help(signature(def)),
                        };
                        self.error(d);
                        continue;
                    }
                },
            };
            if let Some((_, prev)) = &slots[index] {
                ok = false;
                let prev = *prev;
                self.error(
                    Diag::new(
                        "dlc::duplicate_arg",
                        format!(
                            "argument `{}` of `{}` is given twice",
                            def.params[index].name, def.name
                        ),
                    )
                    .label(s, "given again here")
                    .label(prev, "first given here")
                    .help("give each argument once"),
                );
                continue;
            }
            slots[index] = Some((v, s));
        }
        let mut out: Vec<(&'static str, ops::ArgValue)> = Vec::new();
        for (spec, slot) in def.params.iter().zip(slots) {
            let value = match slot {
                Some((v, s)) => match self.check_arg(def, spec, &v, s) {
                    Some(a) => a,
                    None => {
                        ok = false;
                        continue;
                    }
                },
                None => match spec.default {
                    // After a misspelt keyword the missing argument is usually that one.
                    ops::ArgDefault::Required if !ok => continue,
                    ops::ArgDefault::Required => {
                        ok = false;
                        self.error(
                            Diag::new(
                                "dlc::missing_arg",
                                format!("`{}` needs the argument `{}`", def.name, spec.name),
                            )
                            .label(name_span, format!("`{}` is missing", spec.name))
                            .help(signature(def)),
                        );
                        continue;
                    }
                    ops::ArgDefault::Int(v) => {
                        if matches!(spec.kind, ops::ArgKind::PosPair | ops::ArgKind::NonNegPair) {
                            ops::ArgValue::Pair(v as u64, v as u64)
                        } else {
                            ops::ArgValue::Int(v)
                        }
                    }
                    ops::ArgDefault::Float(v) => ops::ArgValue::Float(v),
                    ops::ArgDefault::Bool(v) => ops::ArgValue::Bool(v),
                    ops::ArgDefault::Str(v) => ops::ArgValue::Choice(v),
                    ops::ArgDefault::SameAs(other) => match out.iter().find(|(n, _)| *n == other) {
                        Some((_, v)) => v.clone(),
                        None => continue,
                    },
                    ops::ArgDefault::Absent => continue,
                },
            };
            out.push((spec.name, value));
        }
        ok.then_some(ops::Args(out))
    }

    fn check_arg(
        &mut self,
        def: &OpDef,
        spec: &ops::ParamSpec,
        v: &Value,
        span: Span,
    ) -> Option<ops::ArgValue> {
        use ops::{ArgKind::*, ArgValue};
        let int_min = match spec.kind {
            PosInt | PosPair => Some(1),
            NonNegInt | NonNegPair | NonNegSides => Some(0),
            _ => None,
        };
        let checked = |n: i64| -> Result<i64, String> {
            match int_min {
                Some(min) if n < min => Err(format!("{n}")),
                _ => Ok(n),
            }
        };
        let result: Result<ArgValue, Option<String>> = match (spec.kind, v) {
            (PosInt | NonNegInt | Int, Value::Int(n)) => {
                checked(*n).map(ArgValue::Int).map_err(Some)
            }
            (Float, Value::Int(n)) => Ok(ArgValue::Float(*n as f64)),
            (Float, Value::Float(x)) => Ok(ArgValue::Float(*x)),
            (Prob, Value::Int(n)) if *n == 0 => Ok(ArgValue::Float(0.0)),
            (Prob, Value::Float(x)) if (0.0..1.0).contains(x) => Ok(ArgValue::Float(*x)),
            (Prob, Value::Float(_) | Value::Int(_)) => {
                self.error(
                    Diag::new(
                        "dlc::out_of_range",
                        format!(
                            "`{}` of `{}` must be in [0, 1), found {v}",
                            spec.name, def.name
                        ),
                    )
                    .label(span, "out of range")
                    .help("a probability of 0.5 drops half of the elements while training"),
                );
                return None;
            }
            (Bool, Value::Bool(b)) => Ok(ArgValue::Bool(*b)),
            (Tensor, Value::Tensor(t)) => Ok(ArgValue::Tensor(*t)),
            (OpName, Value::Callable(Callable::Op(op))) => Ok(ArgValue::Op(op.name)),
            (PosPair | NonNegPair, Value::Int(n)) => checked(*n)
                .map(|n| ArgValue::Pair(n as u64, n as u64))
                .map_err(Some),
            (PosPair | NonNegPair, Value::Tuple(xs) | Value::List(xs)) if xs.len() == 2 => {
                match (&xs[0], &xs[1]) {
                    (Value::Int(a), Value::Int(b)) => match (checked(*a), checked(*b)) {
                        (Ok(a), Ok(b)) => Ok(ArgValue::Pair(a as u64, b as u64)),
                        (Err(e), _) | (_, Err(e)) => Err(Some(e)),
                    },
                    _ => Err(None),
                }
            }
            (NonNegSides, Value::Int(n)) => checked(*n)
                .map(|n| ArgValue::Sides([n as u64; 4]))
                .map_err(Some),
            (NonNegSides, Value::Tuple(xs) | Value::List(xs)) if matches!(xs.len(), 2 | 4) => {
                let sizes: Option<Vec<i64>> = xs
                    .iter()
                    .map(|x| match x {
                        Value::Int(n) => Some(*n),
                        _ => None,
                    })
                    .collect();
                match sizes {
                    Some(sizes) => match sizes.iter().find_map(|n| checked(*n).err()) {
                        Some(bad) => Err(Some(bad)),
                        None => {
                            let s: Vec<u64> = sizes.iter().map(|n| *n as u64).collect();
                            Ok(ArgValue::Sides(match s.as_slice() {
                                [h, w] => [*h, *h, *w, *w],
                                _ => [s[0], s[1], s[2], s[3]],
                            }))
                        }
                    },
                    None => Err(None),
                }
            }
            (Choice(choices), Value::Str(given)) => {
                match choices.iter().find(|c| **c == &**given) {
                    Some(c) => Ok(ArgValue::Choice(c)),
                    None => {
                        let list = ops::quoted_choices(choices);
                        let help = match did_you_mean(given, choices.iter().copied()) {
                            Some(c) => format!("did you mean \"{c}\"? `{}` is {list}", spec.name),
                            None => format!("`{}` is {list}", spec.name),
                        };
                        self.error(
                            Diag::new(
                                "dlc::unknown_choice",
                                format!(
                                    "`{}` of `{}` must be {list}, found \"{given}\"",
                                    spec.name, def.name
                                ),
                            )
                            .label(span, format!("not a known `{}`", spec.name))
                            .help(help),
                        );
                        return None;
                    }
                }
            }
            (IntList, Value::List(xs) | Value::Tuple(xs)) => {
                let ints: Option<Vec<i64>> = xs
                    .iter()
                    .map(|x| {
                        if let Value::Int(n) = x {
                            Some(*n)
                        } else {
                            None
                        }
                    })
                    .collect();
                ints.map(ArgValue::List).ok_or(None)
            }
            _ => Err(None),
        };
        match result {
            Ok(a) => Some(a),
            Err(Some(bad)) => {
                self.error(
                    Diag::new(
                        "dlc::non_positive",
                        format!(
                            "`{}` of `{}` must be {}, found {bad}",
                            spec.name,
                            def.name,
                            spec.kind.describe()
                        ),
                    )
                    .label(
                        span,
                        if int_min == Some(1) {
                            "must be at least 1"
                        } else {
                            "must not be negative"
                        },
                    )
                    .help(signature(def)),
                );
                None
            }
            Err(None) => {
                if !matches!(v, Value::Poison) {
                    self.error(
                        Diag::new(
                            "dlc::wrong_type",
                            format!(
                                "`{}` of `{}` must be {}, found {}",
                                spec.name,
                                def.name,
                                spec.kind.describe(),
                                v.type_name()
                            ),
                        )
                        .label(span, format!("this is {}", v.type_name()))
                        .help(signature(def)),
                    );
                }
                None
            }
        }
    }

    fn call_block(
        &mut self,
        name: Rc<str>,
        args: &'p [Arg],
        span: Span,
        name_span: Span,
        label: Option<(String, Span)>,
        flow: Flow,
    ) -> Flow {
        let local = self.unique_name(label, span);
        let Some(def) = self.prog.blocks.get(&*name) else {
            return Some(Value::Poison);
        };
        if let Some(pos) = self.calls.iter().position(|(n, _)| *n == name) {
            let chain: Vec<&str> = self.calls[pos..]
                .iter()
                .map(|(n, _)| &**n)
                .chain([&*name])
                .collect();
            self.error(
                Diag::new(
                    "dlc::recursive_block",
                    format!("block `{name}` expands into itself: {}", chain.join(" → ")),
                )
                .label(name_span, "this call recurses")
                .label(def.name.span, "block defined here")
                .help("a block cannot contain itself; use `repeat` or `for` to repeat layers"),
            );
            return Some(Value::Poison);
        }
        if self.calls.len() >= MAX_CALL_DEPTH {
            self.error(
                Diag::new(
                    "dlc::too_deep",
                    format!("blocks nested more than {MAX_CALL_DEPTH} deep"),
                )
                .label(name_span, "this call")
                .help("flatten the block structure"),
            );
            return Some(Value::Poison);
        }
        if flow.is_none() {
            return self.no_input(&name, name_span);
        }
        // Arguments are evaluated in the caller's environment.
        let mut positional = Vec::new();
        let mut keywords: Vec<(&'p Ident, Value, Span)> = Vec::new();
        for a in args {
            let v = self.eval(&a.value, &flow);
            match &a.name {
                Some(k) => keywords.push((k, v, a.span)),
                None => positional.push((v, a.span)),
            }
        }
        let mut frame: HashMap<String, (Value, Span)> = HashMap::new();
        let mut ok = true;
        if positional.len() > def.params.len() {
            ok = false;
            let (_, s) = positional[def.params.len()];
            self.error(
                Diag::new(
                    "dlc::unknown_arg",
                    format!(
                        "block `{name}` takes {} argument{}",
                        def.params.len(),
                        if def.params.len() == 1 { "" } else { "s" }
                    ),
                )
                .label(s, "one too many")
                .help(block_signature(def)),
            );
        }
        for (p, (v, s)) in def.params.iter().zip(positional) {
            frame.insert(p.name.name.clone(), (v, s));
        }
        for (k, v, s) in keywords {
            if !def.params.iter().any(|p| p.name.name == k.name) {
                ok = false;
                let mut d = Diag::new(
                    "dlc::unknown_arg",
                    format!("block `{name}` has no parameter `{}`", k.name),
                )
                .label(k.span, "unknown argument");
                d = match did_you_mean(&k.name, def.params.iter().map(|p| p.name.name.as_str())) {
                    Some(n) => d.help(format!("did you mean `{n}`? {}", block_signature(def))),
                    None => d.help(block_signature(def)),
                };
                self.error(d);
            } else if let Some((_, prev)) = frame.get(&k.name) {
                ok = false;
                let prev = *prev;
                self.error(
                    Diag::new(
                        "dlc::duplicate_arg",
                        format!("argument `{}` of `{name}` is given twice", k.name),
                    )
                    .label(s, "given again here")
                    .label(prev, "first given here")
                    .help("give each argument once"),
                );
            } else {
                frame.insert(k.name.clone(), (v, s));
            }
        }
        // Defaults see the block's earlier parameters, not the caller's variables.
        self.frames.push(Frame {
            vars: HashMap::new(),
            barrier: true,
        });
        self.block_inputs.push(flow.clone());
        for p in &def.params {
            let value = match frame.remove(&p.name.name) {
                Some((v, _)) => v,
                None => match &p.default {
                    Some(e) => self.eval(e, &flow),
                    // After a misspelt keyword the missing argument is usually that one.
                    None if !ok => Value::Poison,
                    None => {
                        ok = false;
                        self.error(
                            Diag::new(
                                "dlc::missing_arg",
                                format!("block `{name}` needs the argument `{}`", p.name.name),
                            )
                            .label(name_span, format!("`{}` is missing", p.name.name))
                            .help(block_signature(def)),
                        );
                        Value::Poison
                    }
                },
            };
            self.bind(&p.name, value);
        }
        let result = if ok {
            self.calls.push((name.clone(), name_span));
            let out = self.in_scope(&local, ScopeKind::Block(name.to_string()), span, |this| {
                this.stmts(&def.body.stmts, flow)
            });
            self.calls.pop();
            out
        } else {
            Some(Value::Poison)
        };
        self.block_inputs.pop();
        self.frames.pop();
        result
    }

    // ---- constructs --------------------------------------------------------------------

    fn construct(&mut self, kind: &'p TermKind, span: Span, flow: Flow) -> Flow {
        match kind {
            TermKind::Repeat { count, body, dense } => {
                let n = match self.eval(count, &flow) {
                    Value::Int(n) if n >= 0 => n as usize,
                    Value::Int(n) => {
                        self.error(
                            Diag::new("dlc::non_positive", format!("cannot repeat {n} times"))
                                .label(count.span, "negative count")
                                .help("a repeat count must be 0 or more"),
                        );
                        return Some(Value::Poison);
                    }
                    Value::Poison => return Some(Value::Poison),
                    v => {
                        self.error(
                            Diag::new(
                                "dlc::wrong_type",
                                format!(
                                    "a repeat count must be an integer, found {}",
                                    v.type_name()
                                ),
                            )
                            .label(count.span, "not an integer")
                            .help("write `repeat 3 { ... }`"),
                        );
                        return Some(Value::Poison);
                    }
                };
                let mut flow = flow;
                for _ in 0..n {
                    if self.node_limit_hit {
                        break;
                    }
                    flow = self.loop_step(body, flow, *dense, span);
                }
                flow
            }
            TermKind::For {
                pattern,
                iter,
                body,
                dense,
            } => {
                let items = match self.eval(iter, &flow) {
                    Value::List(xs) | Value::Tuple(xs) => xs,
                    Value::Poison => return Some(Value::Poison),
                    v => {
                        self.error(
                            Diag::new(
                                "dlc::wrong_type",
                                format!("`for` needs a list, found {}", v.type_name()),
                            )
                            .label(iter.span, "not a list")
                            .help("loop over a list `[64, 128]` or a range `0..n`"),
                        );
                        return Some(Value::Poison);
                    }
                };
                let mut flow = flow;
                for item in items.iter() {
                    if self.node_limit_hit {
                        break;
                    }
                    self.frames.push(Frame {
                        vars: HashMap::new(),
                        barrier: false,
                    });
                    self.bind_pattern(pattern, item.clone());
                    flow = self.loop_step(body, flow, *dense, span);
                    self.frames.pop();
                }
                flow
            }
            TermKind::Residual {
                cond,
                body,
                shortcut,
            } => self.residual(cond.as_deref(), body, shortcut.as_deref(), span, flow),
            TermKind::Concat {
                args,
                branches,
                span: cspan,
            } => self.concat(args, branches, *cspan, flow),
            TermKind::Group(body) => self.body(body, flow),
            TermKind::Expr(_) => flow,
        }
    }

    /// One iteration of a loop; in a `dense` loop the result is concatenated onto the input.
    fn loop_step(&mut self, body: &'p Body, flow: Flow, dense: bool, span: Span) -> Flow {
        if !dense {
            return self.body(body, flow);
        }
        let Some(Value::Tensor(x)) = flow else {
            return if flow.is_none() {
                self.no_input("dense", span)
            } else {
                flow
            };
        };
        let y = self.body(body, flow);
        let Some(Value::Tensor(y)) = y else {
            return Some(Value::Poison);
        };
        let name = self.structural_name("concat");
        let op = Op::Concat(ops::merge::Concat { axis: 1 });
        match self.g.wire(self.scope, &name, op, span, &[x, y]) {
            Ok(o) => Some(Value::Tensor(o)),
            Err(e) => {
                let (sx, sy) = (self.g.shape(x).to_string(), self.g.shape(y).to_string());
                self.error(
                    Diag::new(e.code, e.message)
                        .label(body.span, format!("this step outputs {sy}"))
                        .label(span, format!("its input is {sx}"))
                        .help("a dense step must keep the spatial size so that its output can be concatenated onto its input"),
                );
                Some(Value::Poison)
            }
        }
    }

    fn residual(
        &mut self,
        cond: Option<&'p Expr>,
        body: &'p Body,
        shortcut: Option<&'p Shortcut>,
        span: Span,
        flow: Flow,
    ) -> Flow {
        if let Some(c) = cond {
            match self.condition(c, &flow) {
                Some(true) => {}
                Some(false) => return self.body(body, flow),
                None => return Some(Value::Poison),
            }
        }
        let Some(input) = flow.clone() else {
            return self.no_input("residual", span);
        };
        let main = self.body(body, flow.clone());
        let (short, short_span, short_text) = match shortcut {
            Some(sc) => {
                let active = match &sc.cond {
                    Some(c) => self.condition(c, &flow),
                    None => Some(true),
                };
                match active {
                    Some(true) => (self.body(&sc.body, flow.clone()), sc.span, "shortcut"),
                    Some(false) => (
                        Some(input),
                        sc.span,
                        "shortcut (identity: its condition is false)",
                    ),
                    None => (Some(Value::Poison), sc.span, "shortcut"),
                }
            }
            None => (
                Some(input),
                Span {
                    end: span.start + "residual".len() as u32,
                    ..span
                },
                "identity shortcut",
            ),
        };
        let (Some(Value::Tensor(m)), Some(Value::Tensor(s))) = (main, short) else {
            return Some(Value::Poison);
        };
        let name = self.structural_name("add");
        match self.g.wire(self.scope, &name, Op::Add, span, &[m, s]) {
            Ok(o) => Some(Value::Tensor(o)),
            Err(e) => {
                let (ms, ss) = (self.g.shape(m).clone(), self.g.shape(s).clone());
                let help = projection_hint(&ms, &ss, shortcut.is_some());
                self.error(
                    Diag::new(
                        "dlc::shape_mismatch",
                        format!("residual branches have different shapes: {ms} and {ss}"),
                    )
                    .label(body.span, format!("main branch outputs {ms}"))
                    .label(short_span, format!("{short_text} outputs {ss}"))
                    .help(if e.code == "dlc::shape_mismatch" {
                        help
                    } else {
                        e.help
                    }),
                );
                Some(Value::Poison)
            }
        }
    }

    fn concat(&mut self, args: &'p [Arg], branches: &'p [Body], span: Span, flow: Flow) -> Flow {
        let def = ops::lookup("concat");
        let mut axis = 1;
        if let Some(def) = def {
            let given = args
                .iter()
                .map(|a| (a.name.as_ref(), self.eval(&a.value, &flow), a.span))
                .collect();
            match self.bind_op_args(def, given, span) {
                Some(a) => axis = a.int("axis"),
                None => return Some(Value::Poison),
            }
        }
        if flow.is_none() {
            return self.no_input("concat", span);
        }
        let mut outs = Vec::new();
        for b in branches {
            match self.body(b, flow.clone()) {
                Some(Value::Tensor(t)) => outs.push((t, b.span)),
                _ => return Some(Value::Poison),
            }
        }
        let name = self.structural_name("concat");
        let inputs: Vec<Outlet> = outs.iter().map(|(t, _)| *t).collect();
        match self.g.wire(
            self.scope,
            &name,
            Op::Concat(ops::merge::Concat { axis }),
            span,
            &inputs,
        ) {
            Ok(o) => Some(Value::Tensor(o)),
            Err(e) => {
                let mut d = Diag::new(e.code, e.message).help(e.help);
                let first = self.g.shape(outs[0].0).clone();
                d = d.label(outs[0].1, format!("first branch outputs {first}"));
                for (t, s) in outs.iter().skip(1) {
                    let shape = self.g.shape(*t);
                    if *shape != first {
                        d = d.label(*s, format!("this branch outputs {shape}"));
                    }
                }
                self.error(d);
                Some(Value::Poison)
            }
        }
    }

    // ---- names -------------------------------------------------------------------------

    fn bind(&mut self, name: &Ident, value: Value) {
        if let Some(frame) = self.frames.last_mut() {
            frame.vars.insert(name.name.clone(), (value, name.span));
        }
    }

    fn bind_pattern(&mut self, pattern: &'p Pattern, value: Value) {
        match pattern {
            Pattern::Name(id) => self.bind(id, value),
            Pattern::Tuple(parts, span) => match value.items() {
                Some(items) if items.len() == parts.len() => {
                    let items = items.to_vec();
                    for (p, v) in parts.iter().zip(items) {
                        self.bind_pattern(p, v);
                    }
                }
                _ => {
                    if !matches!(value, Value::Poison) {
                        self.error(
                            Diag::new(
                                "dlc::wrong_type",
                                format!("cannot unpack {value} into {} names", parts.len()),
                            )
                            .label(*span, "this pattern")
                            .help("each element must be a tuple or list with one item per name"),
                        );
                    }
                    for p in parts {
                        self.bind_pattern(p, Value::Poison);
                    }
                }
            },
        }
    }

    /// A variable's value, looking through frames down to the nearest barrier.
    fn lookup(&self, name: &str) -> Option<Value> {
        for frame in self.frames.iter().rev() {
            if let Some((v, _)) = frame.vars.get(name) {
                return Some(v.clone());
            }
            if frame.barrier {
                break;
            }
        }
        None
    }

    fn visible_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for frame in self.frames.iter().rev() {
            out.extend(frame.vars.keys().cloned());
            if frame.barrier {
                break;
            }
        }
        out
    }

    /// A name in layer position: a variable, a block or an op.
    fn resolve_layer(&mut self, name: &str, span: Span, as_layer: bool) -> Option<Value> {
        if let Some(v) = self.lookup(name) {
            return Some(v);
        }
        if self.prog.blocks.contains_key(name) {
            return Some(Value::Callable(Callable::Block(Rc::from(name))));
        }
        if let Some(def) = ops::lookup(name) {
            return Some(Value::Callable(Callable::Op(def)));
        }
        if let Some(b) = value::Builtin::lookup(name) {
            return Some(Value::Callable(Callable::Builtin(b)));
        }
        self.undefined(name, span, as_layer);
        None
    }

    fn lookup_var(&mut self, id: &Ident) -> Value {
        match self.lookup(&id.name) {
            Some(v) => v,
            None => {
                self.undefined(&id.name, id.span, false);
                Value::Poison
            }
        }
    }

    /// Reports an unknown name: a cycle through `let`, a use before definition, or a typo.
    fn undefined(&mut self, name: &str, span: Span, as_layer: bool) {
        let later = self
            .pending
            .iter()
            .rev()
            .flat_map(|stmts| stmts.iter())
            .find_map(|s| match s {
                Stmt::Let { name: n, chain, .. } if n.name == name => Some((n, Some(chain))),
                Stmt::Input { name: n, .. } if n.name == name => Some((n, None)),
                _ => None,
            });
        if let Some((def, chain)) = later {
            let cycle = self
                .lets
                .iter()
                .rev()
                .find(|l| chain.is_some_and(|c| mentions(c, &l.name)));
            let d = match cycle {
                Some(outer) => Diag::new(
                    "dlc::let_cycle",
                    format!(
                        "`{}` and `{name}` are defined in terms of each other",
                        outer.name
                    ),
                )
                .label(span, format!("`{}` uses `{name}`", outer.name))
                .label(def.span, format!("`{name}` uses `{}`", outer.name))
                .help("a `let` can only use names bound before it; break the cycle"),
                None => Diag::new(
                    "dlc::undefined",
                    format!("`{name}` is used before it is defined"),
                )
                .label(span, "used here")
                .label(def.span, "defined later here")
                .help("move the definition above its first use"),
            };
            self.error(d);
            return;
        }
        let mut candidates = self.visible_names();
        if as_layer {
            candidates.extend(self.prog.blocks.keys().cloned());
            candidates.extend(ops::names().map(String::from));
        }
        let suggestion =
            did_you_mean(name, candidates.iter().map(String::as_str)).map(String::from);
        let d = if as_layer {
            let d = Diag::new(
                "dlc::unknown_op",
                format!("unknown layer or block `{name}`"),
            )
            .label(span, "not an op, a block or a tensor");
            match suggestion {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None => d.help("see `docs/language.md` for the list of ops; blocks must be defined or imported with `use`"),
            }
        } else {
            let d = Diag::new("dlc::undefined", format!("undefined variable `{name}`"))
                .label(span, "not defined here");
            match suggestion {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None => {
                    d.help("define it with `let`, or make it a parameter of the block or model")
                }
            }
        };
        self.error(d);
    }

    fn condition(&mut self, e: &Expr, flow: &Flow) -> Option<bool> {
        match self.eval(e, flow) {
            Value::Bool(b) => Some(b),
            Value::Poison => None,
            v => {
                self.error(
                    Diag::new(
                        "dlc::wrong_type",
                        format!(
                            "a condition must be `true` or `false`, found {}",
                            v.type_name()
                        ),
                    )
                    .label(e.span, format!("this is {}", v.type_name()))
                    .help("compare values: `stride != 1 or in.c != out`"),
                );
                None
            }
        }
    }
}

/// Whether a chain mentions `name` anywhere.
fn mentions(chain: &Chain, name: &str) -> bool {
    fn expr(e: &Expr, n: &str) -> bool {
        match &e.kind {
            ExprKind::Var(v) => v == n,
            ExprKind::List(xs) | ExprKind::Tuple(xs) => xs.iter().any(|x| expr(x, n)),
            ExprKind::Field(x, _) | ExprKind::Unary(_, x) => expr(x, n),
            ExprKind::Index(a, b) | ExprKind::Binary(_, a, b) => expr(a, n) || expr(b, n),
            ExprKind::Call(f, args) => expr(f, n) || args.iter().any(|a| expr(&a.value, n)),
            ExprKind::If(i) => {
                expr(&i.cond, n)
                    || body(&i.then, n)
                    || i.otherwise.as_ref().is_some_and(|b| body(b, n))
            }
            _ => false,
        }
    }
    fn body(b: &Body, n: &str) -> bool {
        b.stmts.iter().any(|s| match s {
            Stmt::Chain(c) | Stmt::Let { chain: c, .. } => terms(c, n),
            Stmt::Output { chain: Some(c), .. } => terms(c, n),
            _ => false,
        })
    }
    fn terms(c: &Chain, n: &str) -> bool {
        c.terms.iter().any(|t| match &t.kind {
            TermKind::Expr(e) => expr(e, n),
            TermKind::Repeat { count, body: b, .. } => expr(count, n) || body(b, n),
            TermKind::For { iter, body: b, .. } => expr(iter, n) || body(b, n),
            TermKind::Residual {
                cond,
                body: b,
                shortcut,
            } => {
                cond.as_ref().is_some_and(|c| expr(c, n))
                    || body(b, n)
                    || shortcut.as_ref().is_some_and(|s| body(&s.body, n))
            }
            TermKind::Concat { branches, .. } => branches.iter().any(|b| body(b, n)),
            TermKind::Group(b) => body(b, n),
        })
    }
    terms(chain, name)
}

/// Where argument `name` of a call was written: by keyword, or by position.
fn arg_span(def: &OpDef, args: &[Arg], name: &str) -> Option<Span> {
    if let Some(a) = args
        .iter()
        .find(|a| a.name.as_ref().is_some_and(|n| n.name == name))
    {
        return Some(a.span);
    }
    let index = def.params.iter().position(|p| p.name == name)?;
    args.iter()
        .filter(|a| a.name.is_none())
        .nth(index)
        .map(|a| a.span)
}

/// `conv(out, kernel, stride = 1, ...)`: the signature for help lines.
fn signature(def: &OpDef) -> String {
    let params: Vec<String> = def
        .params
        .iter()
        .map(|p| match p.default {
            ops::ArgDefault::Required => p.name.to_string(),
            ops::ArgDefault::Int(v) => format!("{} = {v}", p.name),
            ops::ArgDefault::Float(v) => format!("{} = {v}", p.name),
            ops::ArgDefault::Bool(v) => format!("{} = {v}", p.name),
            ops::ArgDefault::Str(v) => format!("{} = \"{v}\"", p.name),
            ops::ArgDefault::SameAs(o) => format!("{} = {o}", p.name),
            ops::ArgDefault::Absent => format!("{}?", p.name),
        })
        .collect();
    let mut all = Vec::new();
    if def.arity == ops::Arity::Many {
        all.push("tensors...".to_string());
    }
    all.extend(params);
    format!("usage: {}({})", def.name, all.join(", "))
}

fn block_signature(def: &Def) -> String {
    let params: Vec<String> = def
        .params
        .iter()
        .map(|p| {
            if p.default.is_some() {
                format!("{} = ...", p.name.name)
            } else {
                p.name.name.clone()
            }
        })
        .collect();
    format!("usage: {}({})", def.name.name, params.join(", "))
}

/// Suggests the projection that makes a residual's shortcut match its main branch.
fn projection_hint(main: &Shape, short: &Shape, has_shortcut: bool) -> String {
    let (Some(mc), Some(mh), Some(sh)) = (
        main.0.get(1).and_then(Dim::known),
        main.0.get(2).and_then(Dim::known),
        short.0.get(2).and_then(Dim::known),
    ) else {
        return "both branches of a residual must output the same shape".to_string();
    };
    let stride = if mh > 0 && sh % mh == 0 { sh / mh } else { 1 };
    let stride_arg = if stride > 1 {
        format!(", stride: {stride}")
    } else {
        String::new()
    };
    let proj = format!("conv({mc}, kernel: 1{stride_arg}, bias: false) bn");
    if has_shortcut {
        format!("make the shortcut output {main}, e.g. `shortcut {{ {proj} }}`")
    } else {
        format!("add a projection: `shortcut {{ {proj} }}`")
    }
}
