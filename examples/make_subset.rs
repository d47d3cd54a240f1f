//! Writes the Fashion-MNIST subset shipped in `data/fashion-mnist-subset/`: the first 500
//! training and the first 100 test images of each class, in file order, as gzipped IDX files
//! with the standard names.
//!
//! ```sh
//! apt-get install dataset-fashion-mnist
//! cargo run --release --example make_subset -- [SOURCE_DIR] [OUT_DIR]
//! ```
//!
//! `SOURCE_DIR` defaults to `/usr/share/datasets/fashion-mnist`, `OUT_DIR` to
//! `data/fashion-mnist-subset`. The output is byte-for-byte reproducible.

use std::path::PathBuf;

use dlc::data::{self, FILES, SUBSET_DIR, SYSTEM_DIR};
use dlc::diagnostics::Diag;

fn main() {
    let mut args = std::env::args().skip(1);
    let src = PathBuf::from(args.next().unwrap_or_else(|| SYSTEM_DIR.to_string()));
    let out = PathBuf::from(args.next().unwrap_or_else(|| SUBSET_DIR.to_string()));
    if let Err(d) = run(&src, &out) {
        eprintln!("{:?}", miette::Report::new(d));
        std::process::exit(1);
    }
}

fn run(src: &std::path::Path, out: &std::path::Path) -> Result<(), Diag> {
    let (train, test, _) = data::fashion_mnist(Some(src))?;
    std::fs::create_dir_all(out).map_err(|e| {
        Diag::new(
            data::CODE,
            format!("cannot create `{}`: {e}", out.display()),
        )
    })?;
    for (set, per_class, images, labels) in [
        (&train, 500, FILES[0], FILES[1]),
        (&test, 100, FILES[2], FILES[3]),
    ] {
        let subset = set.select(&set.first_per_class(per_class));
        let ip = out.join(format!("{images}.gz"));
        let lp = out.join(format!("{labels}.gz"));
        subset.save(&ip, &lp)?;
        println!(
            "{}: {} images, per class {:?}",
            ip.display(),
            subset.len(),
            subset.class_counts()
        );
    }
    Ok(())
}
