//! Loading a spec: the root file and every file it `use`s, parsed, with the tables of
//! blocks and models they define.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::diagnostics::{Diag, FileId, Sources, Span};
use crate::syntax::{self, ast};

/// A model as written: a definition, or a variant of another model.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// `model name(params) { ... }`
    Def(ast::Def),
    /// `model name = base(args)`
    Variant {
        name: ast::Ident,
        base: ast::Ident,
        args: Vec<ast::Arg>,
        span: Span,
    },
}

impl ModelSource {
    /// The model's name.
    pub fn name(&self) -> &ast::Ident {
        match self {
            ModelSource::Def(d) => &d.name,
            ModelSource::Variant { name, .. } => name,
        }
    }
}

/// Every file of a spec with the definitions they hold.
#[derive(Debug, Default)]
pub struct Program {
    /// Source text of every loaded file.
    pub sources: Sources,
    /// Blocks by name.
    pub blocks: HashMap<String, ast::Def>,
    /// Models in definition order (imported files first).
    pub models: Vec<ModelSource>,
    /// The file the user named.
    pub root: FileId,
}

impl Program {
    /// Loads `path` and its imports. Diagnostics come with their sources attached.
    pub fn load(path: &Path) -> (Program, Vec<Diag>) {
        let mut prog = Program::default();
        let mut diags = Vec::new();
        match read(path) {
            Ok(text) => {
                prog.root = prog.sources.add(path.display().to_string(), text);
                prog.parse_tree(prog.root, &mut diags);
            }
            Err(message) => diags.push(
                Diag::new(
                    "dlc::io",
                    format!("cannot read `{}`: {message}", path.display()),
                )
                .help("check the path; specs live in `specs/`"),
            ),
        }
        let diags = diags.into_iter().map(|d| prog.sources.attach(d)).collect();
        (prog, diags)
    }

    /// Parses `file` and, depth first, every file it imports.
    fn parse_tree(&mut self, root: FileId, diags: &mut Vec<Diag>) {
        let mut stack = vec![root];
        let mut loaded: Vec<PathBuf> = vec![normalise(Path::new(&self.sources.file(root).path))];
        let mut parsed = Vec::new();
        while let Some(file) = stack.pop() {
            let text = self.sources.file(file).text.clone();
            let ast = match syntax::parse_file(&text, file) {
                Ok(ast) => ast,
                Err(d) => {
                    diags.push(d);
                    continue;
                }
            };
            let dir = Path::new(&self.sources.file(file).path)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            for item in &ast.items {
                if let ast::Item::Use { path, span } = item {
                    let target = dir.join(path);
                    let key = normalise(&target);
                    if loaded.contains(&key) {
                        continue;
                    }
                    match read(&target) {
                        Ok(text) => {
                            loaded.push(key);
                            let id = self.sources.add(target.display().to_string(), text);
                            stack.push(id);
                        }
                        Err(message) => diags.push(
                            Diag::new(
                                "dlc::import_not_found",
                                format!("cannot import `{path}`: {message}"),
                            )
                            .label(*span, format!("looked for {}", target.display()))
                            .help(
                                "paths in `use` are relative to the file that contains the `use`",
                            ),
                        ),
                    }
                }
            }
            parsed.push((file, ast));
        }
        // Imported files define first so that the root file's own models come last, in order.
        parsed.sort_by_key(|(file, _)| std::cmp::Reverse(*file == root));
        for (_, ast) in parsed {
            self.define(ast, diags);
        }
    }

    fn define(&mut self, file: ast::File, diags: &mut Vec<Diag>) {
        for item in file.items {
            match item {
                ast::Item::Use { .. } => {}
                ast::Item::Block(def) => {
                    if let Some(prev) = self.blocks.get(&def.name.name) {
                        diags.push(duplicate("block", &def.name, prev.name.span));
                    } else if let Some(prev) =
                        self.models.iter().find(|m| m.name().name == def.name.name)
                    {
                        diags.push(duplicate("name", &def.name, prev.name().span));
                    } else {
                        self.blocks.insert(def.name.name.clone(), def);
                    }
                }
                ast::Item::Model(def) => self.add_model(ModelSource::Def(def), diags),
                ast::Item::Variant {
                    name,
                    base,
                    args,
                    span,
                } => self.add_model(
                    ModelSource::Variant {
                        name,
                        base,
                        args,
                        span,
                    },
                    diags,
                ),
            }
        }
    }

    fn add_model(&mut self, model: ModelSource, diags: &mut Vec<Diag>) {
        let name = model.name();
        if let Some(prev) = self.models.iter().find(|m| m.name().name == name.name) {
            diags.push(duplicate("model", name, prev.name().span));
        } else if let Some(prev) = self.blocks.get(&name.name) {
            diags.push(duplicate("name", name, prev.name.span));
        } else {
            self.models.push(model);
        }
    }

    /// Looks a model up by name.
    pub fn model(&self, name: &str) -> Option<&ModelSource> {
        self.models.iter().find(|m| m.name().name == name)
    }

    /// Names of the models defined in the root file, in order.
    pub fn root_models(&self) -> Vec<&str> {
        self.models
            .iter()
            .filter(|m| m.name().span.file == self.root)
            .map(|m| m.name().name.as_str())
            .collect()
    }
}

fn duplicate(what: &str, name: &ast::Ident, prev: Span) -> Diag {
    Diag::new(
        "dlc::duplicate_definition",
        format!("`{}` is defined twice", name.name),
    )
    .label(name.span, format!("this {what} is already defined"))
    .label(prev, "first defined here")
    .help("rename one of them")
}

fn read(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    match String::from_utf8(bytes) {
        Ok(text) => Ok(text),
        // Keep going with replacement characters: the parser then points at them.
        Err(e) => Ok(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

fn normalise(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}
