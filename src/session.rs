//! One compilation from a path: load, pick models, apply `--set` overrides, elaborate.
//! This is the library's entry point; the CLI and the tests both go through it.

use std::path::Path;

use crate::diagnostics::{Diag, Span, did_you_mean};
use crate::elaborate::{self, Model, Override};
use crate::program::Program;
use crate::syntax;

/// Which models of the file to elaborate.
#[derive(Debug, Clone, Copy)]
pub enum Select<'a> {
    /// The named model, or the file's only model.
    One(Option<&'a str>),
    /// The named model, or every model of the file whose parameters all have values.
    All(Option<&'a str>),
}

/// A compiled file: the program (for its sources) and the elaborated models.
#[derive(Debug)]
pub struct Compiled {
    /// The loaded files.
    pub program: Program,
    /// The elaborated models, in file order.
    pub models: Vec<Model>,
    /// Models skipped by [`Select::All`] because parameters lack values, with those parameters.
    pub templates: Vec<(String, Vec<String>)>,
}

/// Compiles `path`. On failure, every diagnostic found, with its source attached.
pub fn compile(path: &Path, select: Select, sets: &[String]) -> Result<Compiled, Vec<Diag>> {
    let (mut program, diags) = Program::load(path);
    if !diags.is_empty() {
        return Err(diags);
    }
    let mut diags = Vec::new();
    let overrides = parse_overrides(&mut program, sets, &mut diags);
    let names = match pick(&program, path, select) {
        Ok(names) => names,
        Err(d) => return Err(vec![d]),
    };
    // Checking several models, an override applies to those that declare the parameter.
    let several = names.len() > 1;
    if several {
        for o in &overrides {
            if !names
                .iter()
                .any(|n| elaborate::param_names(&program, n).contains(&o.name))
            {
                diags.push(
                    Diag::new(
                        "dlc::unknown_arg",
                        format!(
                            "no model in `{}` has a parameter `{}`",
                            path.display(),
                            o.name
                        ),
                    )
                    .label(o.span, "unknown parameter")
                    .help(format!("models: {}", names.join(", "))),
                );
            }
        }
    }
    let mut models = Vec::new();
    if diags.is_empty() {
        for name in names {
            let declared = elaborate::param_names(&program, &name);
            let mine: Vec<Override> = overrides
                .iter()
                .filter(|o| !several || declared.contains(&o.name))
                .cloned()
                .collect();
            match elaborate::elaborate(&program, &name, &mine) {
                Ok(m) => models.push(m),
                Err(ds) => diags.extend(ds),
            }
        }
    }
    if diags.is_empty() {
        let templates = match select {
            Select::All(None) => program
                .root_models()
                .into_iter()
                .map(|m| (m.to_string(), elaborate::missing_params(&program, m)))
                .filter(|(_, missing)| !missing.is_empty())
                .collect(),
            _ => Vec::new(),
        };
        Ok(Compiled {
            program,
            models,
            templates,
        })
    } else {
        Err(diags
            .into_iter()
            .map(|d| program.sources.attach(d))
            .collect())
    }
}

fn pick(program: &Program, path: &Path, select: Select) -> Result<Vec<String>, Diag> {
    let own = program.root_models();
    let (Select::One(Some(name)) | Select::All(Some(name))) = select else {
        return match (select, own.as_slice()) {
            (_, [one]) => Ok(vec![one.to_string()]),
            (Select::All(_), _) => Ok(own
                .iter()
                .filter(|m| elaborate::missing_params(program, m).is_empty())
                .map(|m| m.to_string())
                .collect()),
            (_, []) => Err(Diag::new(
                "dlc::no_model",
                format!("`{}` defines no model", path.display()),
            )
            .help("define one: `model name { input x: [1, 28, 28] ... }`")),
            (_, many) => Err(Diag::new(
                "dlc::ambiguous_model",
                format!(
                    "`{}` defines {} models; choose one with `--model NAME`",
                    path.display(),
                    many.len()
                ),
            )
            .help(format!("models: {}", many.join(", ")))),
        };
    };
    if program.model(name).is_some() {
        return Ok(vec![name.to_string()]);
    }
    let all: Vec<&str> = program
        .models
        .iter()
        .map(|m| m.name().name.as_str())
        .collect();
    let d = Diag::new(
        "dlc::unknown_model",
        format!("no model named `{name}` in `{}`", path.display()),
    );
    Err(match did_you_mean(name, all.iter().copied()) {
        Some(s) => d.help(format!("did you mean `{s}`? models: {}", own.join(", "))),
        None => d.help(format!("models: {}", own.join(", "))),
    })
}

/// Parses `name=value` overrides; each value is a dlc expression in its own pseudo-file.
fn parse_overrides(program: &mut Program, sets: &[String], diags: &mut Vec<Diag>) -> Vec<Override> {
    let mut out = Vec::new();
    for set in sets {
        let file = program.sources.add("--set", set.clone());
        let Some((name, value)) = set.split_once('=') else {
            diags.push(
                Diag::new(
                    "dlc::bad_set",
                    format!("`--set {set}` is not of the form name=value"),
                )
                .label(Span::new(file, 0, set.len()), "no `=`")
                .help("for example `--set classes=5`"),
            );
            continue;
        };
        let start = name.len() - name.trim_start().len();
        let span = Span::new(file, start, start + name.trim().len());
        match syntax::parse_expr(value, file, name.len() + 1) {
            Ok(e) => out.push(Override {
                name: name.trim().to_string(),
                span,
                value: e,
            }),
            Err(d) => diags.push(d),
        }
    }
    out
}
