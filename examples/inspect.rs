//! Using dlc as a library: compile a spec and walk its typed graph.
//!
//! ```sh
//! cargo run --example inspect -- specs/resnet.dlc resnet18
//! ```

use std::path::PathBuf;

use dlc::session::{Select, compile};

fn main() {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().unwrap_or_else(|| "specs/lenet.dlc".to_string()));
    let model = args.next();
    let compiled = match compile(&path, Select::One(model.as_deref()), &[]) {
        Ok(c) => c,
        Err(diags) => {
            for d in diags {
                eprintln!("{:?}", miette::Report::new(d));
            }
            std::process::exit(1);
        }
    };
    for m in &compiled.models {
        let g = &m.graph;
        println!(
            "{}: {} nodes, {} trainable parameters",
            m.name,
            g.dag.node_count(),
            g.total_cost().params
        );
        // Nodes are created in topological order; parameters live at `<name>.weight`.
        for n in g.dag.node_indices() {
            let node = &g.dag[n];
            if node.cost.params > 0 {
                println!(
                    "  {:<28} {:<8} {:<20} {:>10}",
                    node.name,
                    node.op.kind(),
                    node.outputs[0].to_string(),
                    node.cost.params
                );
            }
        }
    }
}
