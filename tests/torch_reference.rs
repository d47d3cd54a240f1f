//! PyTorch reference fixtures: every `tests/fixtures/torch/*.safetensors` (made by
//! `scripts/torch_fixtures.py`) is replayed through dlc's candle lowering in float64, forward
//! and backward, and compared with what PyTorch computed.
//!
//! * `op_<case>`: a one-layer spec is written from the file's `config` metadata (named `layer`,
//!   so its parameters are `layer.weight`, ...), lowered, loaded with the fixture's
//!   parameters and buffers and run in the file's `mode`; `output`, `grad.input`, every
//!   `grad.layer.*` and (train mode) `after.layer.running_*` are compared.
//! * `op_cross_entropy`: `candle_nn::loss::cross_entropy` (the training loss), value and
//!   gradient with respect to the logits.
//! * `lenet`: `specs/lenet.dlc` model `lenet`, train mode, output and every gradient.
//! * `basic_block`: `tests/fixtures/torch/basic_block.dlc`, eval-mode output, then on a fresh
//!   network the train-mode output, running statistics after the step and every gradient.
//!   Token-id inputs (`op_embedding`, `op_one_hot`) are declared `tokens[…]` and have no
//!   input gradient.
//! * `seq_<case>`: a recurrent layer `layer` with the fixture's initial state and cell as
//!   extra model inputs and its sequence, state and cell as outputs; every output, and the
//!   gradients of the input, the initial state and cell and every parameter.
//! * `seq2seq`, `seq2seq_attention`: `specs/seq2seq.dlc` at the fixture's sizes (`--set`),
//!   eval mode, teacher forcing; output and every parameter gradient, d2l's keys loaded by
//!   name (`decoder.attention.*` renamed to dlc's `decoder.rnn.attention.*`).
//! * `attn_<case>`: the model named by the file's `spec`, `model` and `set` metadata, fed one
//!   `input.<name>` per model input (token ids as integers); output and every gradient,
//!   `grad.input.<name>` for the inputs the output depends on.
//!
//! Dispatch is by file name and an unknown file fails the test, so a new fixture cannot be
//! skipped silently. Every tensor comparison is recorded; the failure message (and the
//! summary printed with `--nocapture`) gives the worst absolute and relative error of each.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use dlc::lower::{Init, Network};
use dlc::session::{Select, compile};

/// Allowed error, relative to the reference's scale `max(1, max |reference|)`. Float64
/// throughout, so agreement is at rounding level (~1e-15); this leaves room for different
/// summation orders only.
const TOL: f64 = 1e-9;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch")
}

/// One fixture file: its tensors and its metadata.
struct Fixture {
    name: String,
    tensors: HashMap<String, Tensor>,
    meta: HashMap<String, String>,
}

impl Fixture {
    fn load(path: &Path) -> Fixture {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let meta = metadata.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        Fixture {
            name,
            tensors,
            meta,
        }
    }

    fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tensor `{key}`", self.name))
    }

    fn mode_train(&self) -> bool {
        match self.meta.get("mode").map(String::as_str) {
            Some("train") | None => true,
            Some("eval") => false,
            Some(m) => panic!("{}: unknown mode `{m}`", self.name),
        }
    }
}

/// One comparison's outcome.
struct Check {
    what: String,
    abs: f64,
    rel: f64,
    ok: bool,
    note: Option<String>,
}

/// Every comparison of one fixture.
#[derive(Default)]
struct Report {
    checks: Vec<Check>,
}

impl Report {
    /// Compares `got` with the reference `want`: same shape, max |got - want| within
    /// `TOL * max(1, max |want|)`.
    fn compare(&mut self, what: impl Into<String>, got: &Tensor, want: &Tensor) {
        let what = what.into();
        if got.dims() != want.dims() {
            self.fail(
                what,
                format!("shape {:?}, reference {:?}", got.dims(), want.dims()),
            );
            return;
        }
        let flat = |t: &Tensor| {
            t.to_dtype(DType::F64)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f64>())
        };
        let (g, w) = match (flat(got), flat(want)) {
            (Ok(g), Ok(w)) => (g, w),
            (Err(e), _) | (_, Err(e)) => return self.fail(what, format!("cannot read: {e}")),
        };
        let scale = w.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let mut abs = 0.0f64;
        let mut at = 0;
        let mut nan = false;
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            let d = (a - b).abs();
            if d.is_nan() {
                nan = true;
            }
            if d > abs {
                abs = d;
                at = i;
            }
        }
        let rel = abs / scale;
        let ok = !nan && rel <= TOL;
        let note = (!ok).then(|| {
            if nan {
                "NaN".to_string()
            } else {
                format!(
                    "worst at flat index {at} of {:?}: got {:e}, reference {:e}",
                    want.dims(),
                    g[at],
                    w[at]
                )
            }
        });
        self.checks.push(Check {
            what,
            abs,
            rel,
            ok,
            note,
        });
    }

    fn fail(&mut self, what: impl Into<String>, note: impl Into<String>) {
        self.checks.push(Check {
            what: what.into(),
            abs: f64::NAN,
            rel: f64::NAN,
            ok: false,
            note: Some(note.into()),
        });
    }

    fn worst(&self) -> (f64, f64) {
        self.checks
            .iter()
            .filter(|c| c.ok)
            .fold((0.0, 0.0), |(a, r), c| {
                (f64::max(a, c.abs), f64::max(r, c.rel))
            })
    }
}

/// Runs a candle step; an error becomes a failed check and ends the case.
macro_rules! try_or_fail {
    ($report:expr, $what:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(err) => {
                $report.fail($what, format!("{err}"));
                return;
            }
        }
    };
}

/// Compiles `path` (model `model`, with `--set` overrides `sets`) and lowers it in float64;
/// also returns the names of the model's inputs, in order.
fn lower_with_inputs(
    path: &Path,
    model: Option<&str>,
    sets: &[String],
) -> Result<(Network, Vec<String>), String> {
    let compiled = compile(path, Select::One(model), sets).map_err(|diags| {
        diags
            .iter()
            .map(|d| d.render_plain(100))
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    let model = compiled.models.first().ok_or("no model compiled")?;
    let inputs = model
        .graph
        .inputs
        .iter()
        .map(|i| model.graph.dag[*i].name.clone())
        .collect();
    let net =
        Network::new(model, &Device::Cpu, DType::F64, Init::Torch, 0).map_err(|e| e.to_string())?;
    Ok((net, inputs))
}

/// Compiles `path` (model `model`, with `--set` overrides `sets`) and lowers it in float64.
fn lower(path: &Path, model: Option<&str>, sets: &[String]) -> Result<Network, String> {
    lower_with_inputs(path, model, sets).map(|(net, _)| net)
}

/// Keys that are not parameters or buffers.
fn is_data_key(key: &str) -> bool {
    matches!(key, "input" | "target" | "output" | "grad_output")
        || [
            "input.",
            "output.",
            "grad_output.",
            "grad.",
            "after.",
            "initial.",
        ]
        .iter()
        .any(|p| key.starts_with(p))
}

/// Loads every parameter and buffer of the fixture into the network by name; the two sets of
/// names must agree.
fn load_state(net: &Network, fx: &Fixture, report: &mut Report) {
    let fixture_keys: BTreeSet<&str> = fx
        .tensors
        .keys()
        .map(String::as_str)
        .filter(|k| !is_data_key(k))
        .collect();
    let net_keys: BTreeSet<&str> = net
        .state
        .params
        .keys()
        .chain(net.state.buffers.keys())
        .map(String::as_str)
        .collect();
    for k in fixture_keys.difference(&net_keys) {
        report.fail(
            format!("state {k}"),
            "in the fixture, not in the lowered network",
        );
    }
    for k in net_keys.difference(&fixture_keys) {
        report.fail(
            format!("state {k}"),
            "in the lowered network, not in the fixture",
        );
    }
    for (k, var) in net.state.params.iter().chain(net.state.buffers.iter()) {
        if let Some(t) = fx.tensors.get(k) {
            if var.dims() != t.dims() {
                report.fail(
                    format!("state {k}"),
                    format!("network shape {:?}, fixture {:?}", var.dims(), t.dims()),
                );
            } else if let Err(e) = var.set(t) {
                report.fail(format!("state {k}"), format!("cannot set: {e}"));
            }
        }
    }
}

/// Snapshot of the buffers (values, not Vars that share storage).
fn buffers_now(net: &Network) -> BTreeMap<String, Tensor> {
    net.state
        .buffers
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect()
}

/// Forward in `train` mode on the fixture's inputs (the keys `input_keys`, one per model
/// input), compare with `output_key`; then (if `backward`) gradients of
/// `sum(output * grad_output)` for every parameter and every float input that has a reference
/// gradient `grad.<input key>`; then the buffers: in train mode against `after.<name>`, in eval
/// mode unchanged.
fn forward_backward(
    net: &mut Network,
    fx: &Fixture,
    input_keys: &[String],
    output_key: &str,
    train: bool,
    backward: bool,
    report: &mut Report,
) {
    let tag = if train { "train" } else { "eval" };
    let before = buffers_now(net);
    // Float inputs become variables (to take gradients); token ids stay as they are.
    let mut inputs = Vec::new();
    let mut vars = Vec::new();
    for key in input_keys {
        let t = fx.get(key);
        if t.dtype().is_float() {
            let var = try_or_fail!(report, key.clone(), Var::from_tensor(t));
            inputs.push(var.as_tensor().clone());
            vars.push((key, var));
        } else {
            inputs.push(t.clone());
        }
    }
    let outs = try_or_fail!(
        report,
        format!("forward ({tag})"),
        net.forward(&inputs, train)
    );
    if outs.len() != 1 {
        report.fail("outputs", format!("{} outputs, expected 1", outs.len()));
        return;
    }
    let out = &outs[0];
    report.compare(format!("{output_key} ({tag})"), out, fx.get(output_key));

    // Running statistics.
    for (k, var) in &net.state.buffers {
        let after = format!("after.{k}");
        if train {
            match fx.tensors.get(&after) {
                Some(want) => report.compare(after, var.as_tensor(), want),
                None => report.fail(
                    after,
                    "buffer updated in train mode but the fixture has no value after",
                ),
            }
        } else {
            report.compare(format!("{k} unchanged (eval)"), var.as_tensor(), &before[k]);
        }
    }

    if !backward {
        return;
    }
    let loss = try_or_fail!(
        report,
        "loss",
        out.mul(fx.get("grad_output")).and_then(|t| t.sum_all())
    );
    let grads = try_or_fail!(report, "backward", loss.backward());
    for (key, var) in &vars {
        let key = format!("grad.{key}");
        let Some(want) = fx.tensors.get(&key) else {
            continue;
        };
        match grads.get(var.as_tensor()) {
            Some(g) => report.compare(key, g, want),
            None => report.fail(key, "no gradient"),
        }
    }
    compare_param_grads(net, fx, &grads, report);
}

/// Every parameter's gradient against `grad.<name>`, and no reference gradient left over.
fn compare_param_grads(
    net: &Network,
    fx: &Fixture,
    grads: &candle_core::backprop::GradStore,
    report: &mut Report,
) {
    for (k, var) in &net.state.params {
        let key = format!("grad.{k}");
        let Some(want) = fx.tensors.get(&key) else {
            report.fail(key, "parameter without a reference gradient");
            continue;
        };
        match grads.get(var.as_tensor()) {
            Some(g) => report.compare(key, g, want),
            None => report.fail(key, "no gradient"),
        }
    }
    for key in fx.tensors.keys().filter(|k| {
        k.starts_with("grad.") && !k.starts_with("grad.input") && !k.starts_with("grad.initial.")
    }) {
        if !net.state.params.contains_key(&key["grad.".len()..]) {
            report.fail(key.clone(), "reference gradient of no network parameter");
        }
    }
}

/// A dlc argument `key: value` from a JSON config entry: strings are quoted choices
/// (`mode: "bilinear"`), except `nonlinearity`, which names an op (`nonlinearity: relu`).
fn dlc_arg(key: &str, v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(op) if key == "nonlinearity" => format!("{key}: {op}"),
        v => format!("{key}: {}", dlc_value(v)),
    }
}

/// A dlc argument value from a JSON config value.
fn dlc_value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => i.to_string(),
            None => format!("{:?}", n.as_f64().unwrap()),
        },
        serde_json::Value::String(s) => format!("{s:?}"),
        serde_json::Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(dlc_value).collect();
            format!("({})", parts.join(", "))
        }
        other => panic!("config value {other} has no dlc form"),
    }
}

/// The fixture's `config` metadata (a JSON object).
fn config(fx: &Fixture) -> serde_json::Map<String, serde_json::Value> {
    let config: serde_json::Value = serde_json::from_str(
        fx.meta
            .get("config")
            .unwrap_or_else(|| panic!("{}: no config metadata", fx.name)),
    )
    .unwrap_or_else(|e| panic!("{}: config: {e}", fx.name));
    match config {
        serde_json::Value::Object(map) => map,
        _ => panic!("{}: config is not an object", fx.name),
    }
}

/// The one-layer spec(s) for a per-op fixture: the op written from the config, and for
/// `adaptive_avgpool` to 1x1 also `global_avgpool`, which must be the same.
fn op_specs(fx: &Fixture) -> Vec<String> {
    let map = config(fx);
    let op = map["op"].as_str().unwrap();
    let args: Vec<String> = map
        .iter()
        .filter(|(k, _)| *k != "op")
        .map(|(k, v)| dlc_arg(k, v))
        .collect();
    let call = if args.is_empty() {
        op.to_string()
    } else {
        format!("{op}({})", args.join(", "))
    };
    let mut calls = vec![call];
    if op == "adaptive_avgpool" && map.get("size") == Some(&serde_json::json!([1, 1])) {
        calls.push("global_avgpool".to_string());
    }
    let input = fx.get("input");
    let dims: Vec<String> = input.dims()[1..].iter().map(usize::to_string).collect();
    let ty = if input.dtype().is_int() { "tokens" } else { "" };
    calls
        .into_iter()
        .map(|call| {
            format!(
                "model m {{\n    input x: {ty}[{}]\n    layer: {call}\n}}\n",
                dims.join(", ")
            )
        })
        .collect()
}

/// The input key of a one-input fixture.
fn one_input() -> Vec<String> {
    vec!["input".to_string()]
}

fn run_op(fx: &Fixture, report: &mut Report) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("torch_reference");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, spec) in op_specs(fx).into_iter().enumerate() {
        let path = dir.join(format!("{}_{i}.dlc", fx.name));
        std::fs::write(&path, &spec).unwrap();
        let first_line = spec.lines().nth(2).unwrap().trim().to_string();
        let mut sub = Report::default();
        match lower(&path, Some("m"), &[]) {
            Ok(mut net) => {
                load_state(&net, fx, &mut sub);
                forward_backward(
                    &mut net,
                    fx,
                    &one_input(),
                    "output",
                    fx.mode_train(),
                    true,
                    &mut sub,
                );
            }
            Err(e) => sub.fail("compile/lower", format!("{spec}\n{e}")),
        }
        for mut c in sub.checks {
            c.what = format!("[{first_line}] {}", c.what);
            report.checks.push(c);
        }
    }
}

/// The spec of a recurrent fixture: the layer `layer` on input `x`, with the initial state
/// (`h0`) and cell (`c0`) the fixture gives, and every output of the layer as a model output.
fn recurrent_spec(fx: &Fixture) -> String {
    let map = config(fx);
    let op = map["op"].as_str().unwrap();
    let mut args = vec![dlc_value(&map["hidden"])];
    args.extend(
        map.iter()
            .filter(|(k, _)| !matches!(k.as_str(), "op" | "hidden"))
            .map(|(k, v)| dlc_arg(k, v)),
    );
    let dims = |key: &str| {
        let d: Vec<String> = fx.get(key).dims()[1..]
            .iter()
            .map(usize::to_string)
            .collect();
        d.join(", ")
    };
    let mut inputs = format!("    input x: [{}]\n", dims("input"));
    for (key, var, arg) in [
        ("initial.state", "h0", "state"),
        ("initial.cell", "c0", "cell"),
    ] {
        if fx.tensors.contains_key(key) {
            inputs += &format!("    input {var}: [{}]\n", dims(key));
            args.push(format!("{arg}: {var}"));
        }
    }
    let mut outputs = String::from("    output seq = y\n    output state = y.state\n");
    if op == "lstm" {
        outputs += "    output cell = y.cell\n";
    }
    format!(
        "model m {{\n{inputs}    let y = x layer: {op}({})\n{outputs}}}\n",
        args.join(", ")
    )
}

/// `seq_*`: a recurrent layer with its initial state and cell; every output and the gradients
/// of the input, the initial state and cell and every parameter.
fn run_recurrent(fx: &Fixture, report: &mut Report) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("torch_reference");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = recurrent_spec(fx);
    let path = dir.join(format!("{}.dlc", fx.name));
    std::fs::write(&path, &spec).unwrap();
    let mut net = try_or_fail!(report, "compile/lower", lower(&path, Some("m"), &[]));
    load_state(&net, fx, report);
    let keys: Vec<&str> = ["input", "initial.state", "initial.cell"]
        .into_iter()
        .filter(|k| fx.tensors.contains_key(*k))
        .collect();
    let vars: Vec<Var> = try_or_fail!(
        report,
        "inputs",
        keys.iter()
            .map(|k| Var::from_tensor(fx.get(k)))
            .collect::<candle_core::Result<Vec<_>>>()
    );
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let outs = try_or_fail!(report, "forward", net.forward(&xs, true));
    let names = ["output", "output.state", "output.cell"];
    let mut loss = try_or_fail!(report, "loss", Tensor::zeros((), DType::F64, &Device::Cpu));
    for (out, name) in outs.iter().zip(names) {
        report.compare(name, out, fx.get(name));
        let grad_output = fx.get(&name.replacen("output", "grad_output", 1)).clone();
        loss = try_or_fail!(
            report,
            "loss",
            out.mul(&grad_output)
                .and_then(|t| t.sum_all())
                .and_then(|t| loss + t)
        );
    }
    if outs.len()
        != names
            .iter()
            .filter(|n| fx.tensors.contains_key(**n))
            .count()
    {
        report.fail("outputs", format!("{} outputs", outs.len()));
    }
    let grads = try_or_fail!(report, "backward", loss.backward());
    for (key, var) in keys.iter().zip(&vars) {
        let want = format!("grad.{key}");
        match grads.get(var.as_tensor()) {
            Some(g) => report.compare(&want, g, fx.get(&want)),
            None => report.fail(want, "no gradient"),
        }
    }
    compare_param_grads(&net, fx, &grads, report);
}

/// `seq2seq*`: `specs/seq2seq.dlc` at the fixture's sizes, teacher-forced forward and every
/// gradient, in eval mode. The fixture holds d2l's keys; its attention's `decoder.attention.*`
/// is dlc's `decoder.rnn.attention.*`.
fn run_seq2seq(fx: &Fixture, report: &mut Report) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/seq2seq.dlc");
    let sets: Vec<String> = config(fx)
        .iter()
        .map(|(k, v)| format!("{k}={}", dlc_value(v)))
        .collect();
    let mut net = try_or_fail!(report, "compile/lower", lower(&path, Some(&fx.name), &sets));
    let renamed = Fixture {
        name: fx.name.clone(),
        tensors: fx
            .tensors
            .iter()
            .map(|(k, v)| {
                (
                    k.replace("decoder.attention.", "decoder.rnn.attention."),
                    v.clone(),
                )
            })
            .collect(),
        meta: fx.meta.clone(),
    };
    load_state(&net, &renamed, report);
    let xs = [fx.get("input.src").clone(), fx.get("input.tgt").clone()];
    let outs = try_or_fail!(report, "forward", net.forward(&xs, false));
    report.compare("output", &outs[0], fx.get("output"));
    let loss = try_or_fail!(
        report,
        "loss",
        outs[0].mul(fx.get("grad_output")).and_then(|t| t.sum_all())
    );
    let grads = try_or_fail!(report, "backward", loss.backward());
    compare_param_grads(&net, &renamed, &grads, report);
}

fn run_cross_entropy(fx: &Fixture, report: &mut Report) {
    let logits = try_or_fail!(report, "input", Var::from_tensor(fx.get("input")));
    let target = try_or_fail!(report, "target", fx.get("target").to_dtype(DType::U32));
    let loss = try_or_fail!(
        report,
        "cross_entropy",
        candle_nn::loss::cross_entropy(logits.as_tensor(), &target)
    );
    report.compare("output", &loss, fx.get("output"));
    let scaled = try_or_fail!(report, "loss", loss.mul(fx.get("grad_output")));
    let grads = try_or_fail!(report, "backward", scaled.backward());
    match grads.get(logits.as_tensor()) {
        Some(g) => report.compare("grad.input", g, fx.get("grad.input")),
        None => report.fail("grad.input", "no gradient"),
    }
}

fn run_lenet(fx: &Fixture, report: &mut Report) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/lenet.dlc");
    let mut net = try_or_fail!(report, "compile/lower", lower(&path, Some("lenet"), &[]));
    load_state(&net, fx, report);
    forward_backward(&mut net, fx, &one_input(), "output", true, true, report);
}

fn run_basic_block(fx: &Fixture, report: &mut Report) {
    let path = fixtures_dir().join("basic_block.dlc");
    // Eval mode: running statistics used and left alone.
    let mut net = try_or_fail!(
        report,
        "compile/lower",
        lower(&path, Some("basic_block"), &[])
    );
    load_state(&net, fx, report);
    forward_backward(
        &mut net,
        fx,
        &one_input(),
        "output.eval",
        false,
        false,
        report,
    );
    // A fresh network: one train-mode step.
    let mut net = try_or_fail!(
        report,
        "compile/lower",
        lower(&path, Some("basic_block"), &[])
    );
    load_state(&net, fx, report);
    forward_backward(
        &mut net,
        fx,
        &one_input(),
        "output.train",
        true,
        true,
        report,
    );
}

/// A fixture of a spec model: the spec, model and `--set` values its metadata names, one
/// `input.<name>` per model input, train mode (dropout 0), forward and backward.
fn run_spec_model(fx: &Fixture, report: &mut Report) {
    let meta = |key: &str| {
        fx.meta
            .get(key)
            .unwrap_or_else(|| panic!("{}: no `{key}` metadata", fx.name))
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(meta("spec"));
    let sets: Vec<String> = fx
        .meta
        .get("set")
        .map(|s| serde_json::from_str(s).unwrap_or_else(|e| panic!("{}: set: {e}", fx.name)))
        .unwrap_or_default();
    let (mut net, names) = try_or_fail!(
        report,
        "compile/lower",
        lower_with_inputs(&path, Some(meta("model")), &sets)
    );
    let keys: Vec<String> = names.iter().map(|n| format!("input.{n}")).collect();
    load_state(&net, fx, report);
    forward_backward(&mut net, fx, &keys, "output", fx.mode_train(), true, report);
}

#[test]
fn lowering_matches_pytorch() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no fixtures in {}",
        fixtures_dir().display()
    );

    let mut failures = Vec::new();
    let mut summary = Vec::new();
    let (mut worst_abs, mut worst_rel) = (0.0f64, 0.0f64);
    for path in &files {
        let fx = Fixture::load(path);
        let mut report = Report::default();
        match fx.name.as_str() {
            "op_cross_entropy" => run_cross_entropy(&fx, &mut report),
            "lenet" => run_lenet(&fx, &mut report),
            "basic_block" => run_basic_block(&fx, &mut report),
            "seq2seq" | "seq2seq_attention" => run_seq2seq(&fx, &mut report),
            n if n.starts_with("seq_") => run_recurrent(&fx, &mut report),
            n if n.starts_with("attn_") => run_spec_model(&fx, &mut report),
            n if n.starts_with("op_") => run_op(&fx, &mut report),
            n => report.fail(
                "dispatch",
                format!("no test handles fixture `{n}`: add it to tests/torch_reference.rs"),
            ),
        }
        if report.checks.is_empty() {
            report.fail("dispatch", "no comparison made");
        }
        let (a, r) = report.worst();
        worst_abs = worst_abs.max(a);
        worst_rel = worst_rel.max(r);
        let bad: Vec<&Check> = report.checks.iter().filter(|c| !c.ok).collect();
        summary.push(format!(
            "{:<28} {:>4} {:>3} checks, worst passing abs {a:.2e} rel {r:.2e}",
            fx.name,
            if bad.is_empty() { "ok" } else { "FAIL" },
            report.checks.len(),
        ));
        for c in bad {
            failures.push(format!(
                "{}: {}: abs {:.3e}, rel {:.3e}{}",
                fx.name,
                c.what,
                c.abs,
                c.rel,
                c.note
                    .as_ref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            ));
        }
    }
    summary.push(format!("{} fixtures; worst passing error abs {worst_abs:.2e}, rel {worst_rel:.2e} (tolerance {TOL:e})", files.len()));
    println!("{}", summary.join("\n"));
    assert!(
        failures.is_empty(),
        "{} comparison(s) with PyTorch failed:\n{}\n\nsummary:\n{}",
        failures.len(),
        failures.join("\n"),
        summary.join("\n")
    );
}
