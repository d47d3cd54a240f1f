//! `dlc params --format json`: the model's totals and every layer, machine-readable.

use serde_json::{Value, json};

use super::BYTES_PER_PARAM;
use crate::elaborate::Model;
use crate::ir::{Dim, Shape};
use crate::ops::Op;

fn shape_json(s: &Shape) -> Value {
    Value::Array(
        s.0.iter()
            .map(|d| match d {
                Dim::Known(n) => json!(n),
                Dim::Sym(s) => json!(&**s),
            })
            .collect(),
    )
}

/// The JSON report: `model`, `params`, totals, `inputs`, `outputs` and `layers`.
pub fn render(model: &Model) -> Value {
    let g = &model.graph;
    let total = g.total_cost();
    let endpoint = |n: &petgraph::graph::NodeIndex| {
        let node = &g.dag[*n];
        let name = match &node.op {
            Op::Input(i) => i.name.clone(),
            _ => node.name.clone(),
        };
        json!({ "name": name, "shape": shape_json(&node.outputs[0]) })
    };
    let layers: Vec<Value> = g
        .dag
        .node_indices()
        .map(|n| &g.dag[n])
        .filter(|node| !matches!(node.op, Op::Input(_) | Op::Output))
        .map(|node| {
            json!({
                "name": node.name,
                "op": node.op.kind(),
                "output_shape": shape_json(&node.outputs[0]),
                "params": node.cost.params,
                "buffers": node.cost.buffers,
                "macs": node.cost.macs,
            })
        })
        .collect();
    let params: serde_json::Map<String, Value> = model
        .params
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    json!({
        "model": model.name,
        "params": params,
        "inputs": g.inputs.iter().map(endpoint).collect::<Vec<_>>(),
        "outputs": g.outputs.iter().map(endpoint).collect::<Vec<_>>(),
        "total_params": total.params,
        "trainable_params": total.params,
        "non_trainable_params": 0,
        "buffers": total.buffers,
        "macs": total.macs,
        "param_bytes": total.params * BYTES_PER_PARAM,
        "layers": layers,
    })
}
