//! `dlc graph`: Graphviz DOT with every block and group as a cluster.

use std::fmt::Write as _;

use petgraph::visit::EdgeRef;

use super::macs_text;
use crate::diagnostics::thousands;
use crate::elaborate::Model;
use crate::ir::{Graph, ScopeId, ScopeItem, ScopeKind};
use crate::ops::Op;

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Renders the model as a DOT digraph.
pub fn render(model: &Model) -> String {
    let g = &model.graph;
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{", escape(&model.name));
    let _ = writeln!(out, "  rankdir=TB;");
    let _ = writeln!(
        out,
        "  node [shape=box, style=\"rounded,filled\", fillcolor=\"#f4f4f4\", fontname=\"Helvetica\", fontsize=10];"
    );
    let _ = writeln!(out, "  edge [fontname=\"Helvetica\", fontsize=9];");
    scope(g, 0, 1, &mut out);
    for e in g.dag.edge_references() {
        // An edge from a named output (`enc.state`) carries the output's name.
        let names = g.dag[e.source()].op.output_names();
        match e
            .weight()
            .from_slot
            .checked_sub(1)
            .and_then(|i| names.get(i))
        {
            Some(name) => {
                let _ = writeln!(
                    out,
                    "  n{} -> n{} [label=\"{name}\"];",
                    e.source().index(),
                    e.target().index()
                );
            }
            None => {
                let _ = writeln!(out, "  n{} -> n{};", e.source().index(), e.target().index());
            }
        }
    }
    out.push_str("}\n");
    out
}

fn scope(g: &Graph, id: ScopeId, depth: usize, out: &mut String) {
    let pad = "  ".repeat(depth);
    for item in &g.scopes[id].items {
        match item {
            ScopeItem::Node(n) => {
                let node = &g.dag[*n];
                let (label, fill) = match &node.op {
                    Op::Input(i) => (
                        format!("{}\\ninput {}", escape(&i.name), node.outputs[0]),
                        "#d8ecff",
                    ),
                    Op::Output => (
                        format!("{}\\noutput {}", escape(&node.name), node.outputs[0]),
                        "#d8f5d8",
                    ),
                    op => {
                        let local = node.name.rsplit('.').next().unwrap_or(&node.name);
                        let mut l =
                            format!("{}: {}\\n{}", escape(local), op.kind(), node.outputs[0]);
                        if node.cost.params > 0 {
                            let _ = write!(l, "\\n{} params", thousands(node.cost.params));
                        }
                        if let Some(m) = node.cost.macs.filter(|m| *m > 0) {
                            let _ = write!(l, ", {}", macs_text(m));
                        }
                        (l, "#f4f4f4")
                    }
                };
                let _ = writeln!(
                    out,
                    "{pad}n{} [label=\"{label}\", fillcolor=\"{fill}\", tooltip=\"{}\"];",
                    n.index(),
                    escape(&node.name)
                );
            }
            ScopeItem::Scope(s) => {
                let sc = &g.scopes[*s];
                let kind = match &sc.kind {
                    ScopeKind::Block(b) => b.as_str(),
                    _ => "group",
                };
                let _ = writeln!(out, "{pad}subgraph \"cluster_{}\" {{", escape(&sc.path));
                let _ = writeln!(
                    out,
                    "{pad}  label=\"{} ({kind})\"; style=\"rounded\"; color=\"#999999\";",
                    escape(&sc.path)
                );
                scope(g, *s, depth + 1, out);
                let _ = writeln!(out, "{pad}}}");
            }
        }
    }
}
