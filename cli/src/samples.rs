//! Sample requests for `tidalctl profile --samples DIR`, one sample each, as users already
//! have them:
//!
//! - `NAME.json`: a V2 inference request body (`{"inputs": [{"name", "shape", "datatype",
//!   "data"}, …]}`, data as JSON values, without the binary extension);
//! - `NAME.npy`: a NumPy array, the one input of a model of one input;
//! - `NAME/`: a directory of `<input>.npy` files, one per input of the model.
//!
//! A sample has a leading batch dimension of 1 or none; the agent checks it against the model.

use std::path::Path;

use anyhow::{bail, Context};
use npyz::{DType, NpyFile, TypeChar};
use tidal_common::onnx_signature::ElementType;
use tidal_common::tensor::NamedTensor;
use tidal_proto::v1::ProfileSample;

/// Most samples read from a directory.
pub const MAX_SAMPLES: usize = 256;
/// Most bytes of tensor data read in all (a profile request carries them to the agent).
pub const MAX_SAMPLE_BYTES: usize = 48 << 20;

/// Every sample in `dir`, in file name order.
pub fn read_dir(dir: &Path) -> anyhow::Result<Vec<ProfileSample>> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading samples from {}", dir.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading samples from {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    let mut samples = Vec::new();
    let mut bytes = 0usize;
    for entry in entries {
        let path = entry.path();
        let inputs = match path.extension().and_then(|e| e.to_str()) {
            _ if path.is_dir() => read_named_arrays(&path)?,
            Some("json") => read_v2_json(&path)?,
            Some("npy") => vec![read_npy(&path, "")?],
            _ => continue,
        };
        bytes += inputs.iter().map(|t| t.data.len()).sum::<usize>();
        if bytes > MAX_SAMPLE_BYTES {
            bail!("the samples in {} exceed {} MiB; give fewer", dir.display(), MAX_SAMPLE_BYTES >> 20);
        }
        samples.push(ProfileSample { inputs: inputs.into_iter().map(NamedTensor::into_proto).collect() });
        if samples.len() > MAX_SAMPLES {
            bail!("{} holds more than {MAX_SAMPLES} samples", dir.display());
        }
    }
    if samples.is_empty() {
        bail!(
            "{} holds no samples (NAME.json V2 requests, NAME.npy arrays, or directories of INPUT.npy)",
            dir.display()
        );
    }
    Ok(samples)
}

/// One input per `<input>.npy` file of `dir`.
fn read_named_arrays(dir: &Path) -> anyhow::Result<Vec<NamedTensor>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "npy"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{} holds no <input>.npy files", dir.display());
    }
    files
        .iter()
        .map(|p| {
            let name = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            read_npy(p, &name)
        })
        .collect()
}

/// A NumPy array as a tensor named `name` (empty: the model's one input).
fn read_npy(path: &Path, name: &str) -> anyhow::Result<NamedTensor> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let npy = NpyFile::new(&bytes[..]).with_context(|| format!("{} is not a NumPy array", path.display()))?;
    if npy.order() == npyz::Order::Fortran {
        bail!("{}: a Fortran-ordered array; save it C-ordered (np.ascontiguousarray)", path.display());
    }
    let shape: Vec<i64> = npy.shape().iter().map(|&d| d as i64).collect();
    let DType::Plain(ty) = npy.dtype() else { bail!("{}: a structured array; save a plain one", path.display()) };
    let element = match (ty.type_char(), ty.size_field()) {
        (TypeChar::Float, 4) => ElementType::Fp32,
        (TypeChar::Float, 8) => ElementType::Fp64,
        (TypeChar::Float, 2) => ElementType::Fp16,
        (TypeChar::Int, 1) => ElementType::Int8,
        (TypeChar::Int, 2) => ElementType::Int16,
        (TypeChar::Int, 4) => ElementType::Int32,
        (TypeChar::Int, 8) => ElementType::Int64,
        (TypeChar::Uint, 1) => ElementType::Uint8,
        (TypeChar::Uint, 2) => ElementType::Uint16,
        (TypeChar::Uint, 4) => ElementType::Uint32,
        (TypeChar::Uint, 8) => ElementType::Uint64,
        (TypeChar::Bool, 1) => ElementType::Bool,
        _ => bail!("{}: NumPy type {ty} is not a tensor type Tidal serves", path.display()),
    };
    let context = || format!("reading the values of {}", path.display());
    fn le<T: npyz::Deserialize, const N: usize>(npy: NpyFile<&[u8]>, to: fn(T) -> [u8; N]) -> std::io::Result<Vec<u8>> {
        Ok(npy.into_vec::<T>()?.into_iter().flat_map(to).collect())
    }
    let data = match element {
        ElementType::Fp32 => le(npy, f32::to_le_bytes),
        ElementType::Fp64 => le(npy, f64::to_le_bytes),
        ElementType::Fp16 => le(npy, half::f16::to_le_bytes),
        ElementType::Int8 => le(npy, i8::to_le_bytes),
        ElementType::Int16 => le(npy, i16::to_le_bytes),
        ElementType::Int32 => le(npy, i32::to_le_bytes),
        ElementType::Int64 => le(npy, i64::to_le_bytes),
        ElementType::Uint8 => le(npy, u8::to_le_bytes),
        ElementType::Uint16 => le(npy, u16::to_le_bytes),
        ElementType::Uint32 => le(npy, u32::to_le_bytes),
        ElementType::Uint64 => le(npy, u64::to_le_bytes),
        _ => le(npy, |b: bool| [u8::from(b)]),
    }
    .with_context(context)?;
    let tensor = NamedTensor { name: name.to_string(), element, shape, data };
    tensor.check_length().with_context(|| path.display().to_string())?;
    Ok(tensor)
}

#[derive(serde::Deserialize)]
struct V2Request {
    inputs: Vec<V2Input>,
}

#[derive(serde::Deserialize)]
struct V2Input {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: serde_json::Value,
}

/// A V2 inference request body's inputs.
fn read_v2_json(path: &Path) -> anyhow::Result<Vec<NamedTensor>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let request: V2Request = serde_json::from_str(&text).with_context(|| {
        format!("{} is not a V2 inference request (inputs of name, shape, datatype, data)", path.display())
    })?;
    request
        .inputs
        .into_iter()
        .map(|input| {
            let at = || format!("{}: input {:?}", path.display(), input.name);
            let element = tidal_common::v2_tensor::element(&input.name, &input.datatype)
                .map_err(anyhow::Error::msg)
                .with_context(at)?;
            let data = tidal_common::v2_tensor::json_bytes(element, &input.data)
                .map_err(anyhow::Error::msg)
                .with_context(at)?;
            let tensor = NamedTensor { name: input.name.clone(), element, shape: input.shape, data };
            tensor.check_length().with_context(at)?;
            Ok(tensor)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version-1 .npy file of little-endian values with `descr`.
    fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
        let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
        let tuple = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn samples_are_read_from_v2_json_npy_files_and_directories_of_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let floats: Vec<u8> = [0.5f32, 1.5, 2.5, 3.5, 4.5, 5.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.path().join("a.npy"), npy("<f4", &[1, 2, 3], &floats)).unwrap();
        let body = r#"{"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [[101, 7, 102]]},
                                  {"name": "mask", "shape": [1, 3], "datatype": "BOOL", "data": [true, true, false]}]}"#;
        std::fs::write(dir.path().join("b.json"), body).unwrap();
        std::fs::create_dir(dir.path().join("c")).unwrap();
        let ints: Vec<u8> = [4i64, 5].iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.path().join("c/scale.npy"), npy("<i8", &[2], &ints)).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let samples = read_dir(dir.path()).unwrap();
        assert_eq!(samples.len(), 3);
        let a = NamedTensor::from_proto(samples[0].inputs[0].clone()).unwrap();
        assert_eq!((a.name.as_str(), a.shape.clone(), a.f32_values().unwrap()[5]), ("", vec![1, 2, 3], 5.5));
        let ids = NamedTensor::from_proto(samples[1].inputs[0].clone()).unwrap();
        assert_eq!((ids.element, ids.data.len()), (ElementType::Int64, 24));
        assert_eq!(NamedTensor::from_proto(samples[1].inputs[1].clone()).unwrap().data, vec![1, 1, 0]);
        let scale = NamedTensor::from_proto(samples[2].inputs[0].clone()).unwrap();
        assert_eq!((scale.name.as_str(), scale.data), ("scale", ints));

        // What cannot be read says so.
        std::fs::write(dir.path().join("d.npy"), npy("<c8", &[1], &[0; 8])).unwrap();
        assert!(read_dir(dir.path()).unwrap_err().to_string().contains("not a tensor type"));
        std::fs::write(dir.path().join("d.npy"), b"not numpy").unwrap();
        assert!(format!("{:#}", read_dir(dir.path()).unwrap_err()).contains("not a NumPy array"));
        std::fs::remove_file(dir.path().join("d.npy")).unwrap();
        std::fs::write(
            dir.path().join("e.json"),
            r#"{"inputs": [{"name": "x", "shape": [2], "datatype": "INT8", "data": [1, 300]}]}"#,
        )
        .unwrap();
        assert!(format!("{:#}", read_dir(dir.path()).unwrap_err()).contains("input \"x\""));
        let empty = tempfile::tempdir().unwrap();
        assert!(read_dir(empty.path()).unwrap_err().to_string().contains("holds no samples"));
    }
}
