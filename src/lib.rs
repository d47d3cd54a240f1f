//! dlc: a compiler for neural networks written as text.
//!
//! The pipeline, one module per stage, data flowing one way:
//! [`syntax`] (pest grammar → AST) → [`program`] (files and imports) → [`elaborate`]
//! (blocks expanded, loops unrolled, shapes inferred by the [`ops`] rules as each node is
//! wired into the [`ir`] graph) → [`report`] (tables, JSON, DOT). [`diagnostics`] is shared
//! by every stage; the `dlc` binary is a thin CLI over this library.

pub mod data;
pub mod diagnostics;
pub mod elaborate;
pub mod ir;
pub mod lower;
pub mod ops;
pub mod program;
pub mod report;
pub mod session;
pub mod syntax;
pub mod train;
