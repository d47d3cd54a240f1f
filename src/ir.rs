//! The typed graph: a petgraph DAG whose nodes are ops with their attributes, output shapes,
//! parameter and MAC counts, hierarchical names and source spans, and whose edges carry
//! tensors from an output slot to an input slot.
//!
//! Shapes are inferred as each node is wired in ([`Graph::wire`]), so a bad node is caught
//! where it is built and every node in a finished graph is well typed.

use std::fmt;
use std::sync::Arc;

use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;

use crate::diagnostics::Span;
use crate::ops::{Cost, Op, ShapeError};

/// One dimension: a known size or a symbol (the batch `N`, a sequence length `T`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A known size.
    Known(u64),
    /// A symbolic size.
    Sym(Arc<str>),
}

impl Dim {
    /// The size, if known.
    pub fn known(&self) -> Option<u64> {
        match self {
            Dim::Known(n) => Some(*n),
            Dim::Sym(_) => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Known(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
        }
    }
}

/// What a tensor's elements are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DType {
    /// Real numbers (activations, images, features).
    #[default]
    Float,
    /// Token ids (`input src: tokens[T]`): only `embedding`, `one_hot` and layout ops take them.
    Tokens,
}

/// A tensor shape, batch dimension first, and its element type.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shape(pub Vec<Dim>, pub DType);

impl Shape {
    /// A float tensor of these dimensions.
    pub fn new(dims: Vec<Dim>) -> Self {
        Shape(dims, DType::Float)
    }

    /// Whether the elements are token ids.
    pub fn is_tokens(&self) -> bool {
        self.1 == DType::Tokens
    }

    /// The symbolic batch dimension.
    pub fn batch() -> Dim {
        Dim::Sym(Arc::from("N"))
    }

    /// Number of dimensions, batch included.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Elements per example (all but the batch dimension), if every one is known.
    pub fn per_example(&self) -> Option<u64> {
        self.0
            .iter()
            .skip(1)
            .try_fold(1u64, |acc, d| d.known().and_then(|n| acc.checked_mul(n)))
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_tokens() {
            f.write_str("tokens")?;
        }
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// A tensor: output `slot` of `node`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Outlet {
    /// The producing node.
    pub node: NodeIndex,
    /// Which of its outputs.
    pub slot: usize,
}

/// An edge: the producer's output slot feeds the consumer's input slot.
#[derive(Clone, Copy, Debug)]
pub struct Edge {
    /// Output slot of the producer.
    pub from_slot: usize,
    /// Input slot of the consumer.
    pub to_slot: usize,
}

/// A node of the graph.
#[derive(Clone, Debug)]
pub struct Node {
    /// Hierarchical name (`layer1.0.conv1`); parameters live at `<name>.weight` etc.
    pub name: String,
    /// The op and its attributes.
    pub op: Op,
    /// The source that produced the node.
    pub span: Span,
    /// The naming scope the node belongs to.
    pub scope: ScopeId,
    /// Inferred output shapes.
    pub outputs: Vec<Shape>,
    /// Parameters, buffers and MACs.
    pub cost: Cost,
}

/// Index of a scope in [`Graph::scopes`].
pub type ScopeId = usize;

/// What made a naming scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScopeKind {
    /// The model itself (the root).
    Model(String),
    /// A block call; the block's name.
    Block(String),
    /// A `{ ... }` group or a labelled construct.
    Group,
}

/// An entry of a scope, in creation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeItem {
    /// A nested scope.
    Scope(ScopeId),
    /// A node.
    Node(NodeIndex),
}

/// A naming scope: `layer1`, `layer1.0`, ... Its children's names extend its path.
#[derive(Clone, Debug)]
pub struct Scope {
    /// Full dotted path ("" for the root).
    pub path: String,
    /// The last component of the path.
    pub local: String,
    /// What made it.
    pub kind: ScopeKind,
    /// The enclosing scope (none for the root).
    pub parent: Option<ScopeId>,
    /// Nested scopes and nodes, in creation order.
    pub items: Vec<ScopeItem>,
    /// The source that made it.
    pub span: Span,
}

/// A model's typed graph and its naming tree.
#[derive(Clone, Debug)]
pub struct Graph {
    /// The DAG.
    pub dag: DiGraph<Node, Edge>,
    /// Scopes; index 0 is the model's root.
    pub scopes: Vec<Scope>,
    /// Input nodes, in declaration order.
    pub inputs: Vec<NodeIndex>,
    /// Output nodes, in declaration order.
    pub outputs: Vec<NodeIndex>,
}

impl Graph {
    /// An empty graph for the model `name`.
    pub fn new(name: &str, span: Span) -> Self {
        let root = Scope {
            path: String::new(),
            local: name.to_string(),
            kind: ScopeKind::Model(name.to_string()),
            parent: None,
            items: Vec::new(),
            span,
        };
        Graph {
            dag: DiGraph::new(),
            scopes: vec![root],
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }

    /// Opens a scope named `local` inside `parent`.
    pub fn open_scope(
        &mut self,
        parent: ScopeId,
        local: &str,
        kind: ScopeKind,
        span: Span,
    ) -> ScopeId {
        let path = join(&self.scopes[parent].path, local);
        let id = self.scopes.len();
        self.scopes.push(Scope {
            path,
            local: local.to_string(),
            kind,
            parent: Some(parent),
            items: Vec::new(),
            span,
        });
        self.scopes[parent].items.push(ScopeItem::Scope(id));
        id
    }

    /// Adds a node named `local` in `scope`, fed by `inputs`: infers its output shapes and
    /// cost from the op's rule, or returns the rule's error and adds nothing.
    pub fn wire(
        &mut self,
        scope: ScopeId,
        local: &str,
        op: Op,
        span: Span,
        inputs: &[Outlet],
    ) -> Result<Outlet, ShapeError> {
        let shapes: Vec<&Shape> = inputs.iter().map(|o| self.shape(*o)).collect();
        let outputs = op.infer(&shapes)?;
        let cost = op.cost(&shapes, &outputs);
        let name = join(&self.scopes[scope].path, local);
        let node = self.dag.add_node(Node {
            name,
            op,
            span,
            scope,
            outputs,
            cost,
        });
        for (to_slot, o) in inputs.iter().enumerate() {
            self.dag.add_edge(
                o.node,
                node,
                Edge {
                    from_slot: o.slot,
                    to_slot,
                },
            );
        }
        self.scopes[scope].items.push(ScopeItem::Node(node));
        Ok(Outlet { node, slot: 0 })
    }

    /// The shape of a tensor.
    pub fn shape(&self, o: Outlet) -> &Shape {
        &self.dag[o.node].outputs[o.slot]
    }

    /// A node's inputs, ordered by input slot.
    pub fn inputs_of(&self, node: NodeIndex) -> Vec<Outlet> {
        let mut edges: Vec<_> = self
            .dag
            .edges_directed(node, Direction::Incoming)
            .map(|e| {
                (
                    e.weight().to_slot,
                    Outlet {
                        node: e.source(),
                        slot: e.weight().from_slot,
                    },
                )
            })
            .collect();
        edges.sort_by_key(|(slot, _)| *slot);
        edges.into_iter().map(|(_, o)| o).collect()
    }

    /// Sum of the cost of every node.
    pub fn total_cost(&self) -> Cost {
        self.dag
            .node_weights()
            .fold(Cost::default(), |acc, n| acc + n.cost)
    }
}

/// Joins a scope path and a local name with a dot.
pub fn join(path: &str, local: &str) -> String {
    if path.is_empty() {
        local.to_string()
    } else {
        format!("{path}.{local}")
    }
}
