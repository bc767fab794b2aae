//! A V2 tensor's values in each form the Open Inference Protocol carries them — typed
//! contents (gRPC), JSON numbers and booleans (REST), raw little-endian bytes (both) — to and
//! from the raw bytes Tidal's request path carries. Every value is checked against its
//! element type's range; nothing is converted silently.

use crate::onnx_signature::ElementType;
use serde_json::Value;
use tidal_proto::inference::InferTensorContents;

/// An element type by its V2 name.
pub fn element(name: &str, datatype: &str) -> Result<ElementType, String> {
    ElementType::from_v2_name(datatype).ok_or_else(|| format!("input {name:?}: unknown datatype {datatype:?}"))
}

fn narrow<T: TryFrom<i64> + bytemuck::Pod>(values: impl Iterator<Item = i64>, what: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for v in values {
        let v = T::try_from(v).map_err(|_| format!("{v} is out of range for {what}"))?;
        out.extend_from_slice(bytemuck::bytes_of(&v));
    }
    Ok(out)
}

/// Typed contents (gRPC) as raw bytes: the field V2 assigns to the type, and only it.
pub fn contents_bytes(element: ElementType, c: &InferTensorContents) -> Result<Vec<u8>, String> {
    let used = [
        !c.bool_contents.is_empty(),
        !c.int_contents.is_empty(),
        !c.int64_contents.is_empty(),
        !c.uint_contents.is_empty(),
        !c.uint64_contents.is_empty(),
        !c.fp32_contents.is_empty(),
        !c.fp64_contents.is_empty(),
        !c.bytes_contents.is_empty(),
    ];
    let field = match element {
        ElementType::Bool => 0,
        ElementType::Int8 | ElementType::Int16 | ElementType::Int32 => 1,
        ElementType::Int64 => 2,
        ElementType::Uint8 | ElementType::Uint16 | ElementType::Uint32 => 3,
        ElementType::Uint64 => 4,
        ElementType::Fp32 => 5,
        ElementType::Fp64 => 6,
        ElementType::Bytes => 7,
        ElementType::Fp16 | ElementType::Bf16 => {
            return Err(format!("{} has no typed contents in V2; send raw_input_contents", element.v2_name()))
        }
    };
    if used.iter().enumerate().any(|(i, &u)| u && i != field) {
        return Err(format!("{} values are in the contents field of another type", element.v2_name()));
    }
    let ints = |v: &[i32]| v.iter().map(|&x| i64::from(x)).collect::<Vec<_>>();
    let uints = |v: &[u32]| v.iter().map(|&x| i64::from(x)).collect::<Vec<_>>();
    let what = element.v2_name();
    Ok(match element {
        ElementType::Bool => c.bool_contents.iter().map(|&b| u8::from(b)).collect(),
        ElementType::Int8 => narrow::<i8>(ints(&c.int_contents).into_iter(), what)?,
        ElementType::Int16 => narrow::<i16>(ints(&c.int_contents).into_iter(), what)?,
        ElementType::Int32 => bytemuck::cast_slice(&c.int_contents).to_vec(),
        ElementType::Int64 => bytemuck::cast_slice(&c.int64_contents).to_vec(),
        ElementType::Uint8 => narrow::<u8>(uints(&c.uint_contents).into_iter(), what)?,
        ElementType::Uint16 => narrow::<u16>(uints(&c.uint_contents).into_iter(), what)?,
        ElementType::Uint32 => bytemuck::cast_slice(&c.uint_contents).to_vec(),
        ElementType::Uint64 => bytemuck::cast_slice(&c.uint64_contents).to_vec(),
        ElementType::Fp32 => bytemuck::cast_slice(&c.fp32_contents).to_vec(),
        ElementType::Fp64 => bytemuck::cast_slice(&c.fp64_contents).to_vec(),
        ElementType::Bytes => crate::tensor::encode_strings(&c.bytes_contents),
        ElementType::Fp16 | ElementType::Bf16 => unreachable!("refused above"),
    })
}

/// The elements of a JSON tensor, flat or nested, row-major, as raw bytes of `element`
/// (their count is checked later against the shape).
pub fn json_bytes(element: ElementType, data: &Value) -> Result<Vec<u8>, String> {
    fn walk(v: &Value, out: &mut Vec<Value>) -> bool {
        match v {
            Value::Array(items) => items.iter().all(|item| walk(item, out)),
            Value::Number(_) | Value::Bool(_) | Value::String(_) => {
                out.push(v.clone());
                true
            }
            _ => false,
        }
    }
    let mut flat = Vec::new();
    if !walk(data, &mut flat) {
        return Err("an input's data is numbers, booleans or strings, in a flat or nested array".into());
    }
    if element == ElementType::Bytes {
        // V2's JSON carries BYTES elements as strings.
        let strings: Vec<&str> = flat
            .iter()
            .map(|v| v.as_str().ok_or_else(|| format!("{v} is not a BYTES value (a string)")))
            .collect::<Result<_, _>>()?;
        return Ok(crate::tensor::encode_strings(&strings));
    }
    if let Some(v) = flat.iter().find(|v| v.is_string()) {
        return Err(format!("{v} is not a {} value", element.v2_name()));
    }
    let what = element.v2_name();
    let int = |v: &Value| v.as_i64().ok_or_else(|| format!("{v} is not a {what} value"));
    let uint =
        |v: &Value| v.as_u64().and_then(|x| i64::try_from(x).ok()).ok_or_else(|| format!("{v} is not a {what} value"));
    let float = |v: &Value| v.as_f64().ok_or_else(|| format!("{v} is not a {what} value"));
    let ints = || flat.iter().map(int).collect::<Result<Vec<i64>, String>>();
    let uints = || flat.iter().map(uint).collect::<Result<Vec<i64>, String>>();
    let floats = || flat.iter().map(float).collect::<Result<Vec<f64>, String>>();
    Ok(match element {
        ElementType::Bool => flat
            .iter()
            .map(|v| v.as_bool().map(u8::from).ok_or_else(|| format!("{v} is not a BOOL value (true or false)")))
            .collect::<Result<_, _>>()?,
        ElementType::Int8 => narrow::<i8>(ints()?.into_iter(), what)?,
        ElementType::Int16 => narrow::<i16>(ints()?.into_iter(), what)?,
        ElementType::Int32 => narrow::<i32>(ints()?.into_iter(), what)?,
        ElementType::Int64 => bytemuck::cast_slice(&ints()?).to_vec(),
        ElementType::Uint8 => narrow::<u8>(uints()?.into_iter(), what)?,
        ElementType::Uint16 => narrow::<u16>(uints()?.into_iter(), what)?,
        ElementType::Uint32 => narrow::<u32>(uints()?.into_iter(), what)?,
        ElementType::Uint64 => {
            let v: Vec<u64> = flat
                .iter()
                .map(|v| v.as_u64().ok_or_else(|| format!("{v} is not a {what} value")))
                .collect::<Result<_, _>>()?;
            bytemuck::cast_slice(&v).to_vec()
        }
        ElementType::Fp32 => floats()?.into_iter().flat_map(|x| (x as f32).to_le_bytes()).collect(),
        ElementType::Fp64 => floats()?.into_iter().flat_map(f64::to_le_bytes).collect(),
        ElementType::Fp16 => floats()?.into_iter().flat_map(|x| half::f16::from_f64(x).to_le_bytes()).collect(),
        ElementType::Bf16 => floats()?.into_iter().flat_map(|x| half::bf16::from_f64(x).to_le_bytes()).collect(),
        ElementType::Bytes => unreachable!("taken above"),
    })
}

/// Raw bytes of `element` as a flat JSON array (an output's `data`).
pub fn bytes_json(element: ElementType, data: &[u8]) -> Value {
    fn each<T: bytemuck::Pod>(data: &[u8], f: impl Fn(T) -> Value) -> Value {
        let size = std::mem::size_of::<T>();
        Value::Array(data.chunks_exact(size).map(|c| f(bytemuck::pod_read_unaligned(c))).collect())
    }
    let float = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    match element {
        ElementType::Bool => Value::Array(data.iter().map(|&b| Value::Bool(b != 0)).collect()),
        ElementType::Int8 => each(data, |x: i8| x.into()),
        ElementType::Int16 => each(data, |x: i16| x.into()),
        ElementType::Int32 => each(data, |x: i32| x.into()),
        ElementType::Int64 => each(data, |x: i64| x.into()),
        ElementType::Uint8 => each(data, |x: u8| x.into()),
        ElementType::Uint16 => each(data, |x: u16| x.into()),
        ElementType::Uint32 => each(data, |x: u32| x.into()),
        ElementType::Uint64 => each(data, |x: u64| x.into()),
        ElementType::Fp32 => each(data, |x: f32| float(f64::from(x))),
        ElementType::Fp64 => each(data, float),
        ElementType::Fp16 => each(data, |x: u16| float(half::f16::from_bits(x).to_f64())),
        ElementType::Bf16 => each(data, |x: u16| float(half::bf16::from_bits(x).to_f64())),
        // Text as a JSON string; bytes that are not UTF-8 with U+FFFD in their place (V2's
        // JSON has no other form for them; its binary extension carries them exactly).
        ElementType::Bytes => match crate::tensor::decode_strings(data) {
            Ok(items) => Value::Array(
                items.into_iter().map(|b| Value::String(String::from_utf8_lossy(b).into_owned())).collect(),
            ),
            Err(_) => Value::Null,
        },
    }
}

/// Raw bytes of a numeric `element` as f64 values (`None` for BYTES).
pub fn numbers(element: ElementType, data: &[u8]) -> Option<Vec<f64>> {
    fn each<T: bytemuck::Pod>(data: &[u8], f: impl Fn(T) -> f64) -> Vec<f64> {
        data.chunks_exact(std::mem::size_of::<T>()).map(|c| f(bytemuck::pod_read_unaligned(c))).collect()
    }
    Some(match element {
        ElementType::Bool => data.iter().map(|&b| f64::from(u8::from(b != 0))).collect(),
        ElementType::Int8 => each(data, |x: i8| x.into()),
        ElementType::Int16 => each(data, |x: i16| x.into()),
        ElementType::Int32 => each(data, |x: i32| x.into()),
        ElementType::Int64 => each(data, |x: i64| x as f64),
        ElementType::Uint8 => each(data, |x: u8| x.into()),
        ElementType::Uint16 => each(data, |x: u16| x.into()),
        ElementType::Uint32 => each(data, |x: u32| x.into()),
        ElementType::Uint64 => each(data, |x: u64| x as f64),
        ElementType::Fp32 => each(data, |x: f32| x.into()),
        ElementType::Fp64 => each(data, |x: f64| x),
        ElementType::Fp16 => each(data, |x: u16| half::f16::from_bits(x).to_f64()),
        ElementType::Bf16 => each(data, |x: u16| half::bf16::from_bits(x).to_f64()),
        ElementType::Bytes => return None,
    })
}

/// Triton's classification extension: of each of the `rows` equal rows of `values`, the `k`
/// highest (at most the row's length), highest first and the lower index first among
/// equals, as `"value:index"` (the value as Triton prints it: six decimals for a float, an
/// integer as is). A NaN ranks below every number.
pub fn top_classes(values: &[f64], rows: usize, k: usize, integer: bool) -> Vec<String> {
    let cols = values.len().checked_div(rows).unwrap_or(0);
    let rank = |v: f64| if v.is_nan() { f64::NEG_INFINITY } else { v };
    let mut out = Vec::with_capacity(rows * k.min(cols));
    for row in values.chunks_exact(cols.max(1)).take(rows) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| rank(row[b]).total_cmp(&rank(row[a])).then(a.cmp(&b)));
        for &i in order.iter().take(k) {
            out.push(if integer { format!("{}:{i}", row[i] as i64) } else { format!("{:.6}:{i}", row[i]) });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_type_crosses_json_and_back() {
        let cases = [
            (ElementType::Fp32, json!([[1.5, -2.0], [0.25, 8.0]])),
            (ElementType::Fp64, json!([1e-300, 2.5])),
            (ElementType::Fp16, json!([0.5, -1.0, 2048.0])),
            (ElementType::Bf16, json!([1.0, -256.0])),
            (ElementType::Int8, json!([-128, 127])),
            (ElementType::Int16, json!([-32768, 7])),
            (ElementType::Int32, json!([-5, 2147483647])),
            (ElementType::Int64, json!([-9007199254740993_i64, 3])),
            (ElementType::Uint8, json!([0, 255])),
            (ElementType::Uint16, json!([65535])),
            (ElementType::Uint32, json!([4294967295_u64])),
            (ElementType::Uint64, json!([18446744073709551615_u64])),
            (ElementType::Bool, json!([true, false, true])),
        ];
        for (element, data) in cases {
            let bytes = json_bytes(element, &data).unwrap();
            let flat: Vec<Value> = match &data {
                Value::Array(a) => {
                    a.iter().flat_map(|v| v.as_array().cloned().unwrap_or_else(|| vec![v.clone()])).collect()
                }
                _ => unreachable!(),
            };
            assert_eq!(bytes.len(), flat.len() * element.size().unwrap(), "{element:?}");
            let back = bytes_json(element, &bytes);
            let back: Vec<f64> = back
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap_or(v.as_bool().map_or(f64::NAN, f64::from)))
                .collect();
            let want: Vec<f64> =
                flat.iter().map(|v| v.as_f64().unwrap_or(v.as_bool().map_or(f64::NAN, f64::from))).collect();
            assert_eq!(back, want, "{element:?}");
        }
    }

    #[test]
    fn text_crosses_json_and_grpc_contents_as_bytes_elements() {
        let raw = json_bytes(ElementType::Bytes, &json!([["héllo", ""], ["a b", "ünï"]])).unwrap();
        let t =
            crate::tensor::NamedTensor { name: "t".into(), element: ElementType::Bytes, shape: vec![2, 2], data: raw };
        t.check_length().unwrap();
        assert_eq!(t.string_values().unwrap(), vec![&b"h\xc3\xa9llo"[..], b"", b"a b", "ünï".as_bytes()]);
        assert_eq!(bytes_json(ElementType::Bytes, &t.data), json!(["héllo", "", "a b", "ünï"]));
        let contents = InferTensorContents { bytes_contents: vec![b"x".to_vec(), vec![0xff]], ..Default::default() };
        assert_eq!(contents_bytes(ElementType::Bytes, &contents).unwrap(), [1, 0, 0, 0, b'x', 1, 0, 0, 0, 0xff]);
        // Not UTF-8: JSON shows the replacement character, nothing is dropped.
        assert_eq!(bytes_json(ElementType::Bytes, &[1, 0, 0, 0, 0xff]), json!(["\u{fffd}"]));
        assert!(json_bytes(ElementType::Bytes, &json!([1])).is_err());
        assert!(json_bytes(ElementType::Fp32, &json!(["1.0"])).is_err());
        let strings_for_ints = InferTensorContents { bytes_contents: vec![b"1".to_vec()], ..Default::default() };
        assert!(contents_bytes(ElementType::Int64, &strings_for_ints).is_err());
    }

    #[test]
    fn values_out_of_range_or_of_the_wrong_kind_are_refused() {
        assert!(json_bytes(ElementType::Int8, &json!([128])).is_err());
        assert!(json_bytes(ElementType::Uint8, &json!([-1])).is_err());
        assert!(json_bytes(ElementType::Int64, &json!([1.5])).is_err());
        assert!(json_bytes(ElementType::Bool, &json!([1])).is_err());
        assert!(json_bytes(ElementType::Fp32, &json!(["1"])).is_err());
        assert!(json_bytes(ElementType::Fp32, &json!({"a": 1})).is_err());
        let ints = InferTensorContents { int_contents: vec![1, 300], ..Default::default() };
        assert!(contents_bytes(ElementType::Int8, &ints).is_err());
        assert_eq!(contents_bytes(ElementType::Int16, &ints).unwrap(), [1, 0, 44, 1]);
        let wrong_field = InferTensorContents { fp32_contents: vec![1.0], ..Default::default() };
        assert!(contents_bytes(ElementType::Int64, &wrong_field).is_err());
        assert!(contents_bytes(ElementType::Fp16, &InferTensorContents::default()).is_err());
        assert!(element("x", "BYTES").is_ok() && element("x", "FLOAT").is_err());
    }

    #[test]
    fn classes_are_the_highest_values_of_each_row_highest_first() {
        let values = [0.1, 2.5, -1.0, 2.5, f64::NAN, 7.0, 3.0, 1.0];
        assert_eq!(
            top_classes(&values, 2, 3, false),
            ["2.500000:1", "2.500000:3", "0.100000:0", "7.000000:1", "3.000000:2", "1.000000:3"]
        );
        assert_eq!(top_classes(&[5.0, 9.0], 1, 10, true), ["9:1", "5:0"], "at most the row's length");
        let ints = numbers(ElementType::Int32, &[3i32, -4].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>());
        assert_eq!(ints, Some(vec![3.0, -4.0]));
        assert_eq!(numbers(ElementType::Bytes, &[]), None);
    }
}
