//! Checkpoints as safetensors files: every parameter and buffer under its node's name, with
//! the spec's hash, the model and the epoch in the metadata. Files are written to a temporary
//! file and renamed, so a crash never leaves a half-written checkpoint in place.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::diagnostics::Diag;

/// Metadata keys written into every checkpoint.
pub const SPEC_HASH: &str = "dlc.spec_hash";
/// The model's name.
pub const MODEL: &str = "dlc.model";
/// The last completed epoch (1-based).
pub const EPOCH: &str = "dlc.epoch";

fn io_error(path: &Path, what: &str, e: impl std::fmt::Display) -> Diag {
    Diag::new(
        "dlc::checkpoint",
        format!("cannot {what} `{}`: {e}", path.display()),
    )
    .help("check the path and the permissions of its folder")
}

/// Writes `tensors` (as f32) with `metadata` to `path` atomically.
pub fn save(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<(), Diag> {
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let values: Vec<f32> = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| io_error(path, "convert a tensor for", e))?;
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        bytes.push((name.clone(), t.dims().to_vec(), raw));
    }
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, shape, raw)| {
            TensorView::new(Dtype::F32, shape.clone(), raw).map(|v| (n.clone(), v))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| io_error(path, "serialise", e))?;
    let data = safetensors::serialize(views, Some(metadata))
        .map_err(|e| io_error(path, "serialise", e))?;
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, &data).map_err(|e| io_error(&tmp, "write", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_error(path, "move into place", e))
}

/// A loaded checkpoint: tensors by name and the metadata.
pub struct Loaded {
    /// Tensors by name (f32 on the CPU).
    pub tensors: HashMap<String, Tensor>,
    /// Metadata (empty for files written by other tools).
    pub metadata: HashMap<String, String>,
}

/// Reads a safetensors file (f32, f64 or f16/bf16 tensors).
pub fn load(path: &Path) -> Result<Loaded, Diag> {
    let bytes = std::fs::read(path).map_err(|e| {
        Diag::new(
            "dlc::checkpoint",
            format!("cannot read `{}`: {e}", path.display()),
        )
        .help("pass the `model.safetensors` written by `dlc train` (see its --out folder)")
    })?;
    let corrupt = |e: &dyn std::fmt::Display| {
        Diag::new(
            "dlc::checkpoint",
            format!("`{}` is not a valid safetensors file: {e}", path.display()),
        )
        .help(
            "the file may be truncated or of another format; train again or use another checkpoint",
        )
    };
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(&e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(&e))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F64 => DType::F64,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::I64 => DType::I64,
            other => {
                return Err(corrupt(&format!(
                    "tensor `{name}` has unsupported type {other:?}"
                )));
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
            .map_err(|e| corrupt(&e))?;
        tensors.insert(name, t);
    }
    Ok(Loaded {
        tensors,
        metadata: meta.metadata().clone().unwrap_or_default(),
    })
}

/// Copies loaded tensors into the network's variables by name. Every variable must be present
/// with its shape; extra entries such as PyTorch's `num_batches_tracked` are ignored unless
/// `strict` (then they are errors too).
pub fn restore(
    path: &Path,
    loaded: &Loaded,
    vars: &BTreeMap<String, Var>,
    strict: bool,
) -> Result<(), Diag> {
    let mut problems = Vec::new();
    for (name, var) in vars {
        match loaded.tensors.get(name) {
            None => problems.push(format!("missing `{name}`")),
            Some(t) if t.dims() != var.dims() => problems.push(format!(
                "`{name}` has shape {:?}, the model needs {:?}",
                t.dims(),
                var.dims()
            )),
            Some(t) => {
                let t = t
                    .to_dtype(var.dtype())
                    .and_then(|t| t.to_device(var.device()));
                if let Err(e) = t.and_then(|t| var.set(&t)) {
                    problems.push(format!("`{name}`: {e}"));
                }
            }
        }
    }
    if strict {
        for name in loaded.tensors.keys() {
            if !vars.contains_key(name) && !name.ends_with("num_batches_tracked") {
                problems.push(format!("unexpected `{name}`"));
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = problems.iter().take(8).cloned().collect();
    let more = if problems.len() > 8 {
        format!(" and {} more", problems.len() - 8)
    } else {
        String::new()
    };
    Err(Diag::new(
        "dlc::checkpoint",
        format!("`{}` does not fit this model: {}{more}", path.display(), shown.join("; ")),
    )
    .help("weights load by layer name: use a checkpoint of the same spec and model (and the same --set values)"))
}

/// Copies the loaded tensors whose name and shape match one of the network's variables into
/// it, for fine-tuning from another model's weights (a new classifier keeps its fresh
/// initialisation). Returns the names loaded and the names skipped for another shape; an
/// error when nothing matches.
pub fn restore_matching(
    path: &Path,
    loaded: &Loaded,
    vars: &BTreeMap<String, Var>,
) -> Result<(Vec<String>, Vec<String>), Diag> {
    let (mut matched, mut skipped) = (Vec::new(), Vec::new());
    for (name, var) in vars {
        match loaded.tensors.get(name) {
            None => {}
            Some(t) if t.dims() != var.dims() => skipped.push(name.clone()),
            Some(t) => {
                t.to_dtype(var.dtype())
                    .and_then(|t| t.to_device(var.device()))
                    .and_then(|t| var.set(&t))
                    .map_err(|e| {
                        Diag::new(
                            "dlc::checkpoint",
                            format!("`{}`: cannot load `{name}`: {e}", path.display()),
                        )
                        .help("the file may be damaged; write it again")
                    })?;
                matched.push(name.clone());
            }
        }
    }
    if matched.is_empty() {
        return Err(Diag::new(
            "dlc::checkpoint",
            format!("`{}` has no tensor that fits this model", path.display()),
        )
        .help("weights load by layer name and shape: use weights of a model whose layers have the same names"));
    }
    Ok((matched, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_values_and_metadata_and_rejects_corruption() {
        let dir = std::env::temp_dir().join(format!("dlc-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        let w = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let tensors = BTreeMap::from([("fc.weight".to_string(), w.clone())]);
        let meta = HashMap::from([(EPOCH.to_string(), "3".to_string())]);
        save(&path, &tensors, meta).unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.metadata[EPOCH], "3");
        let var =
            Var::from_tensor(&Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let vars = BTreeMap::from([("fc.weight".to_string(), var.clone())]);
        restore(&path, &loaded, &vars, true).unwrap();
        assert_eq!(
            var.as_tensor().to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
        // A wrong shape and a missing name are reported, not panicked on.
        let other = BTreeMap::from([("fc.bias".to_string(), var)]);
        let err = restore(&path, &loaded, &other, true).unwrap_err();
        assert!(err.message.contains("missing `fc.bias`"), "{}", err.message);
        // Fine-tuning: what fits loads, another shape is skipped, nothing fitting is an error.
        let bias = Var::from_tensor(&Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()).unwrap();
        let wide =
            Var::from_tensor(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let fresh =
            Var::from_tensor(&Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let head = BTreeMap::from([
            ("fc.weight".to_string(), fresh.clone()),
            ("head.bias".to_string(), bias),
        ]);
        let (matched, skipped) = restore_matching(&path, &loaded, &head).unwrap();
        assert_eq!((matched, skipped), (vec!["fc.weight".to_string()], vec![]));
        assert_eq!(
            fresh.as_tensor().to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
        let other_shape = BTreeMap::from([("fc.weight".to_string(), wide)]);
        let err = restore_matching(&path, &loaded, &other_shape).unwrap_err();
        assert!(
            err.message.contains("no tensor that fits"),
            "{}",
            err.message
        );
        // Truncated file.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(load(&path).err().map(|d| d.code), Some("dlc::checkpoint"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
