//! `dlc train`: train an image classifier spec on Fashion-MNIST.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use dlc::train::{self, RunOptions, config};

use super::ModelArgs;

/// Arguments of `dlc train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The spec file; its `train { }` section gives the recipe.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Passes over the training set (overrides the spec's `epochs`).
    #[arg(long)]
    epochs: Option<usize>,
    /// Examples per step (overrides `batch`).
    #[arg(long)]
    batch: Option<usize>,
    /// Base learning rate (overrides the optimiser's `lr`).
    #[arg(long)]
    lr: Option<f64>,
    /// Seed for initialisation, shuffling and dropout (overrides `seed`).
    #[arg(long)]
    seed: Option<u64>,
    /// Folder with the Fashion-MNIST IDX files [default: /usr/share/datasets/fashion-mnist
    /// (Debian package dataset-fashion-mnist), else the subset shipped in data/].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Threads for the tensor kernels [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Folder for metrics.csv, metrics.json, curves.png and model.safetensors
    /// [default: runs/<model>-<date>-<time>].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long, requires = "out")]
    resume: bool,
    /// Start from these weights (a checkpoint, or a state dict saved as safetensors): every
    /// tensor whose name and shape fit loads, the rest of the model starts fresh.
    #[arg(long, value_name = "WEIGHTS")]
    init: Option<PathBuf>,
    /// Freeze the parameters whose names match (`*`: any run of characters, as in
    /// `layer1.*`): they keep their values and get no gradient. Repeatable.
    #[arg(long, value_name = "PATTERN")]
    freeze: Vec<String>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

/// Trains and prints one line per epoch.
pub fn run(args: TrainArgs) -> ExitCode {
    if let Some(n) = args.threads {
        super::set_threads(n);
    }
    let compiled = match super::compile_one(&args.file, &args.model) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let model = &compiled.models[0];
    let overrides = config::Overrides {
        epochs: args.epochs,
        batch: args.batch,
        lr: args.lr,
        seed: args.seed,
    };
    let recipe = match config::recipe(model, &overrides) {
        Ok(r) => r,
        Err(diags) => {
            return super::report(
                diags
                    .into_iter()
                    .map(|d| compiled.program.sources.attach(d))
                    .collect(),
            );
        }
    };
    let out = args.out.unwrap_or_else(|| {
        PathBuf::from("runs").join(format!("{}-{}", model.name, super::timestamp()))
    });
    let opts = RunOptions {
        out: out.clone(),
        data: args.data,
        resume: args.resume,
        progress: !args.quiet,
        spec_hash: super::spec_hash(&compiled, &args.model),
        init: args.init,
        freeze: args.freeze,
    };
    eprintln!(
        "training {} ({} params) → {}",
        model.name,
        dlc::diagnostics::thousands(model.graph.total_cost().params),
        out.display()
    );
    match train::train(model, &recipe, &opts) {
        Ok(history) => {
            if let Some(last) = history
                .last()
                .filter(|_| dlc::train::translation::is_translator(model))
            {
                super::emit(&format!(
                    "{}: loss {:.3}, probe bleu {:.3} after {} epochs; wrote {}",
                    model.name,
                    last.train_loss,
                    last.test_acc,
                    last.epoch,
                    out.display()
                ));
            } else if let Some(last) = history
                .last()
                .filter(|_| dlc::train::language::reads_tokens(model))
            {
                super::emit(&format!(
                    "{}: perplexity {:.2}, held-out {:.2} after {} epochs; wrote {}",
                    model.name,
                    last.train_loss.exp(),
                    last.test_loss.exp(),
                    last.epoch,
                    out.display()
                ));
            } else if let Some(last) = history.last() {
                super::emit(&format!(
                    "{}: test acc {:.3}, train acc {:.3}, loss {:.3} after {} epochs; wrote {}",
                    model.name,
                    last.test_acc,
                    last.train_acc,
                    last.train_loss,
                    last.epoch,
                    out.display()
                ));
            }
            ExitCode::SUCCESS
        }
        Err(d) => super::report(vec![d]),
    }
}
