//! The torchinfo/Keras-style parameter table of `dlc params`.

use std::fmt::Write as _;

use super::{BYTES_PER_PARAM, bytes, endpoints, scope_cost, scope_output, si};
use crate::diagnostics::thousands;
use crate::elaborate::Model;
use crate::ir::{Graph, ScopeId, ScopeItem, ScopeKind};
use crate::ops::{Cost, Op};

/// One row of the table.
struct Row {
    tree: String,
    name: String,
    kind: String,
    shape: String,
    cost: Cost,
}

/// Renders the table. Scopes deeper than `depth` are folded into their parent's row, and
/// runs of identical sibling blocks at the deepest level shown are folded as `×N`.
pub fn render(model: &Model, depth: usize) -> String {
    let g = &model.graph;
    let mut rows = Vec::new();
    collect(g, 0, 1, depth.max(1), "", &mut rows);

    let name_width = rows
        .iter()
        .map(|r| r.tree.chars().count() + r.name.len() + r.kind.len() + 3)
        .max()
        .unwrap_or(20)
        .max(24);
    let shape_width = rows
        .iter()
        .map(|r| r.shape.len())
        .max()
        .unwrap_or(12)
        .max(14);
    let width = name_width + shape_width + 14 + 12 + 6;
    let rule = "─".repeat(width);
    let thick = "═".repeat(width);

    let mut out = String::new();
    let params: Vec<String> = model
        .params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let _ = writeln!(
        out,
        "Model: {}{}",
        model.name,
        if params.is_empty() {
            String::new()
        } else {
            format!("({})", params.join(", "))
        }
    );
    let _ = writeln!(out, "{thick}");
    let _ = writeln!(
        out,
        "{:<name_width$}  {:<shape_width$}  {:>14}  {:>12}",
        "Layer (type)", "Output Shape", "Param #", "MACs"
    );
    let _ = writeln!(out, "{rule}");
    for r in &rows {
        let label = format!("{}{} ({})", r.tree, r.name, r.kind);
        let pad = name_width.saturating_sub(label.chars().count());
        let params = if r.cost.params == 0 {
            "-".to_string()
        } else {
            thousands(r.cost.params)
        };
        let macs = match r.cost.macs {
            Some(0) => "-".to_string(),
            Some(m) => si(m),
            None => "?".to_string(),
        };
        let _ = writeln!(
            out,
            "{label}{:pad$}  {:<shape_width$}  {params:>14}  {macs:>12}",
            "", r.shape
        );
    }
    let total = g.total_cost();
    let _ = writeln!(out, "{thick}");
    let _ = writeln!(out, "Total params: {}", thousands(total.params));
    let _ = writeln!(out, "Trainable params: {}", thousands(total.params));
    let _ = writeln!(out, "Non-trainable params: 0");
    if total.buffers > 0 {
        let _ = writeln!(
            out,
            "Buffers: {} (BatchNorm running statistics)",
            thousands(total.buffers)
        );
    }
    let _ = match total.macs {
        Some(m) => writeln!(out, "MACs: {} ({})", si(m), thousands(m)),
        None => writeln!(out, "MACs: unknown (symbolic sizes)"),
    };
    let _ = writeln!(out, "Input: {}", endpoints(g, &g.inputs));
    let _ = writeln!(out, "Output: {}", endpoints(g, &g.outputs));
    let _ = writeln!(
        out,
        "Params size: {}",
        bytes(total.params * BYTES_PER_PARAM)
    );
    if total.buffers > 0 {
        let _ = writeln!(
            out,
            "Buffers size: {}",
            bytes(total.buffers * BYTES_PER_PARAM)
        );
    }
    let _ = write!(out, "{thick}");
    out
}

fn kind_of(g: &Graph, scope: ScopeId) -> String {
    match &g.scopes[scope].kind {
        ScopeKind::Block(b) => b.clone(),
        ScopeKind::Group => "group".to_string(),
        ScopeKind::Model(m) => m.clone(),
    }
}

/// Rows for the items of `scope` at `level` (1 = the model's own items).
fn collect(
    g: &Graph,
    scope: ScopeId,
    level: usize,
    depth: usize,
    indent: &str,
    rows: &mut Vec<Row>,
) {
    let items: Vec<ScopeItem> = g.scopes[scope]
        .items
        .iter()
        .copied()
        .filter(|item| !matches!(item, ScopeItem::Node(n) if matches!(g.dag[*n].op, Op::Output)))
        .collect();
    // Group identical consecutive scopes when their insides are not shown.
    let mut groups: Vec<Vec<ScopeItem>> = Vec::new();
    for item in items {
        let same = match (groups.last().and_then(|grp| grp.last()), item) {
            (Some(ScopeItem::Scope(a)), ScopeItem::Scope(b)) if level >= depth => {
                signature(g, *a) == signature(g, b)
            }
            _ => false,
        };
        match groups.last_mut() {
            Some(grp) if same => grp.push(item),
            _ => groups.push(vec![item]),
        }
    }
    let count = groups.len();
    for (i, grp) in groups.into_iter().enumerate() {
        let last = i + 1 == count;
        let tree = if level == 1 {
            String::new()
        } else {
            format!("{indent}{}", if last { "└─ " } else { "├─ " })
        };
        let child_indent = if level == 1 {
            String::new()
        } else {
            format!("{indent}{}", if last { "   " } else { "│  " })
        };
        match grp.as_slice() {
            [ScopeItem::Node(n)] => {
                let node = &g.dag[*n];
                let local = node
                    .name
                    .rsplit('.')
                    .next()
                    .unwrap_or(&node.name)
                    .to_string();
                rows.push(Row {
                    tree,
                    name: local,
                    kind: node.op.kind().to_string(),
                    shape: node.outputs[0].to_string(),
                    cost: node.cost,
                });
            }
            [ScopeItem::Scope(s)] => {
                let sc = &g.scopes[*s];
                let shape = scope_output(g, *s)
                    .map(|x| x.to_string())
                    .unwrap_or_default();
                rows.push(Row {
                    tree,
                    name: sc.local.clone(),
                    kind: kind_of(g, *s),
                    shape,
                    cost: scope_cost(g, *s),
                });
                if level < depth {
                    collect(g, *s, level + 1, depth, &child_indent, rows);
                }
            }
            many => {
                let ids: Vec<ScopeId> = many
                    .iter()
                    .filter_map(|it| {
                        if let ScopeItem::Scope(s) = it {
                            Some(*s)
                        } else {
                            None
                        }
                    })
                    .collect();
                let (first, last) = (ids[0], ids[ids.len() - 1]);
                let cost = ids
                    .iter()
                    .fold(Cost::default(), |acc, s| acc + scope_cost(g, *s));
                let shape = scope_output(g, last)
                    .map(|x| x.to_string())
                    .unwrap_or_default();
                rows.push(Row {
                    tree,
                    name: format!("{}..{}", g.scopes[first].local, g.scopes[last].local),
                    kind: format!("{} ×{}", kind_of(g, first), ids.len()),
                    shape,
                    cost,
                });
            }
        }
    }
}

/// What makes two sibling scopes the same for folding: kind, cost and output shape.
fn signature(g: &Graph, s: ScopeId) -> (String, Cost, Option<String>) {
    (
        kind_of(g, s),
        scope_cost(g, s),
        scope_output(g, s).map(|x| x.to_string()),
    )
}
