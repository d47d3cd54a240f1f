//! Reports on an elaborated model: the one-line `check` summary, the layer table, JSON and
//! Graphviz DOT. Everything here reads the typed graph; nothing recomputes shapes or counts.

pub mod dot;
pub mod json;
pub mod table;

use crate::diagnostics::thousands;
use crate::elaborate::Model;
use crate::ir::{Graph, ScopeId, ScopeItem, Shape};
use crate::ops::{Cost, Op};

/// Bytes per parameter (f32).
pub const BYTES_PER_PARAM: u64 = 4;

/// `1.814 G`, `118.01 M`, `2.30 K`, `512`.
pub fn si(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.3} G", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.2} K", x / 1e3)
    } else {
        n.to_string()
    }
}

/// MACs as `4.089 GMACs`, `840 MACs`.
pub fn macs_text(m: u64) -> String {
    if m < 1000 {
        format!("{m} MACs")
    } else {
        format!("{}MACs", si(m))
    }
}

/// Bytes as `97.49 MB` (decimal units, as torchinfo).
pub fn bytes(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2} GB", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2} MB", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.2} KB", x / 1e3)
    } else {
        format!("{n} B")
    }
}

/// `name [shape]` for each input or output node.
pub fn endpoints(g: &Graph, nodes: &[petgraph::graph::NodeIndex]) -> String {
    nodes
        .iter()
        .map(|n| {
            let node = &g.dag[*n];
            let name = match &node.op {
                Op::Input(i) => i.name.as_str(),
                _ => node.name.as_str(),
            };
            format!("{name} {}", node.outputs[0])
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `dlc check` line: `lenet: image [N, 1, 28, 28] → output [N, 10]  61,706 params  0.000 GMACs`.
pub fn check_line(model: &Model) -> String {
    let g = &model.graph;
    let cost = g.total_cost();
    let macs = match cost.macs {
        Some(m) => macs_text(m),
        None => "MACs depend on symbolic sizes".to_string(),
    };
    format!(
        "{}: {} → {}  {} params  {macs}",
        model.name,
        endpoints(g, &g.inputs),
        endpoints(g, &g.outputs),
        thousands(cost.params)
    )
}

/// Cost of everything under a scope.
pub fn scope_cost(g: &Graph, scope: ScopeId) -> Cost {
    g.scopes[scope]
        .items
        .iter()
        .fold(Cost::default(), |acc, item| {
            acc + match item {
                ScopeItem::Node(n) => g.dag[*n].cost,
                ScopeItem::Scope(s) => scope_cost(g, *s),
            }
        })
}

/// The output shape of a scope: that of the last node created under it.
pub fn scope_output(g: &Graph, scope: ScopeId) -> Option<&Shape> {
    g.scopes[scope]
        .items
        .iter()
        .rev()
        .find_map(|item| match item {
            ScopeItem::Node(n) => g.dag[*n].outputs.first(),
            ScopeItem::Scope(s) => scope_output(g, *s),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn si_units() {
        assert_eq!(si(4_089_184_256), "4.089 G");
        assert_eq!(si(118_013_952), "118.01 M");
        assert_eq!(si(2_304), "2.30 K");
        assert_eq!(si(512), "512");
        assert_eq!(bytes(102_228_128), "102.23 MB");
    }
}
