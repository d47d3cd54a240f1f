//! `dlc eval`: accuracy, per-class accuracy and the confusion matrix of a checkpoint.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use dlc::data;
use dlc::train::{self, config};

use super::ModelArgs;

/// Arguments of `dlc eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The spec file the checkpoint was trained from.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// The weights: a `model.safetensors` from `dlc train`, or any safetensors file whose
    /// names match the spec's layers.
    #[arg(long, value_name = "CKPT")]
    weights: PathBuf,
    /// Folder with the Fashion-MNIST IDX files [default: as `dlc train`].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Examples per batch.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Threads for the tensor kernels [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
}

/// Evaluates on the test set and prints the accuracy table.
pub fn run(args: EvalArgs) -> ExitCode {
    if let Some(n) = args.threads {
        super::set_threads(n);
    }
    let compiled = match super::compile_one(&args.file, &args.model) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let model = &compiled.models[0];
    let result = (|| {
        let (shape, classes) = train::classifier_shape(model)?;
        let recipe =
            config::recipe(model, &config::Overrides::default()).map_err(|mut d| d.remove(0))?;
        let (mut net, _) = train::inference_network(model, &args.weights)?;
        let (_, test, source) = data::fashion_mnist(args.data.as_deref())?;
        eprintln!("data: {source}");
        let eval = train::evaluate(
            &mut net,
            &test,
            &train::transform(shape, &recipe),
            args.batch.max(1),
            classes,
        )?;
        Ok::<_, dlc::diagnostics::Diag>((eval, test.classes().to_vec()))
    })();
    let (eval, names) = match result {
        Ok(r) => r,
        Err(d) => return super::report(vec![compiled.program.sources.attach(d)]),
    };
    let total: u64 = eval.confusion.iter().flatten().sum();
    let mut out = format!(
        "{}: test accuracy {:.4} ({} images), loss {:.4}\n\n",
        model.name, eval.accuracy, total, eval.loss
    );
    out.push_str(&format!(
        "{:<14} {:>8}   confusion (rows: true class, columns: predicted)\n",
        "class", "accuracy"
    ));
    for (i, (acc, row)) in eval.per_class().iter().zip(&eval.confusion).enumerate() {
        let name = names.get(i).map(String::as_str).unwrap_or("?");
        let cells: Vec<String> = row.iter().map(|c| format!("{c:>5}")).collect();
        out.push_str(&format!("{name:<14} {acc:>8.3}   {}\n", cells.join("")));
    }
    super::emit(out.trim_end());
    ExitCode::SUCCESS
}
