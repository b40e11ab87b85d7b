//! GGUF files: metadata and memory-mapped tensor data.
//!
//! The header, metadata and tensor descriptors are parsed by `gguf-rs-lib`; tensor
//! data is never copied: the file is memory-mapped and every tensor is a bounds-checked
//! byte slice of the map. Everything read from the file is validated before use, so a
//! damaged or hostile file yields a [`GgufError`] naming the problem, never a panic or
//! an out-of-bounds read.
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use gguf_rs_lib::prelude::{GGUFError, GGUFFileReader, Metadata, MetadataValue};
use gguf_rs_lib::reader::GGUFReaderConfig;
use memmap2::Mmap;

use crate::kernels::GgmlType;

/// Largest element count we accept for one tensor (2^40): anything beyond is corrupt.
const MAX_TENSOR_ELEMENTS: u64 = 1 << 40;

/// What can go wrong reading a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF file (bad magic number); is it a model file in GGUF format?")]
    BadMagic { path: PathBuf },
    #[error("{path}: unsupported GGUF version {version} (supported: 2 and 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path} is truncated: the file ends before the data its header describes (re-download or re-convert it)")]
    Truncated { path: PathBuf },
    #[error("{path}: malformed GGUF: {detail}")]
    Malformed { path: PathBuf, detail: String },
    #[error("{path}: tensor '{name}' ({bytes} bytes at offset {offset}) lies outside the file ({file_len} bytes); the file is truncated or corrupt")]
    TensorOutOfBounds {
        path: PathBuf,
        name: String,
        offset: u64,
        bytes: u64,
        file_len: u64,
    },
    #[error("{path}: tensor '{name}' has absurd dimensions {dims:?}")]
    BadDimensions {
        path: PathBuf,
        name: String,
        dims: Vec<u64>,
    },
    #[error("{path}: tensor '{name}' has unsupported type id {type_id}")]
    UnsupportedType {
        path: PathBuf,
        name: String,
        type_id: u32,
    },
    #[error("missing required metadata key '{key}'")]
    MissingKey { key: String },
    #[error("metadata key '{key}' has the wrong type: expected {expected}")]
    WrongType { key: String, expected: &'static str },
}

/// One tensor's descriptor: name, ggml type, shape (ggml order: `dims[0]` is the
/// contiguous row length) and where its bytes lie in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub ty: GgmlType,
    pub dims: Vec<usize>,
    /// Absolute offset of the data in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }
    /// Number of rows: all dimensions but the first.
    pub fn n_rows(&self) -> usize {
        self.dims.iter().skip(1).product()
    }
}

/// A view of one tensor's raw bytes, borrowed from the memory map.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub info: &'a TensorInfo,
    pub data: &'a [u8],
}

/// An open GGUF file: parsed metadata and the mapped tensor data.
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    map: Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Open and validate a GGUF file. Tensor data stays on disk, mapped.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let open_err = |source| GgufError::Open {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if meta.is_dir() {
            return Err(open_err(std::io::Error::other(
                "it is a directory, not a file",
            )));
        }
        let file_len = meta.len();
        let version = check_header(&path, &file)?;

        // Descriptor ranges are checked below, by us, so errors can name the tensor.
        let config = GGUFReaderConfig {
            validate_integrity: false,
            ..Default::default()
        };
        let reader = GGUFFileReader::with_config(AsVersion3(BufReader::new(&file)), config)
            .map_err(|e| map_parse_error(&path, e))?;
        let data_start = reader.tensor_data_offset();
        let mut tensors = Vec::with_capacity(reader.tensor_count());
        for t in reader.tensor_infos() {
            let dims: Vec<u64> = t.shape().dims().to_vec();
            let elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n > 0 && n <= MAX_TENSOR_ELEMENTS);
            let bad_dims = || GgufError::BadDimensions {
                path: path.clone(),
                name: t.name().to_string(),
                dims: dims.clone(),
            };
            if elements.is_none() {
                return Err(bad_dims());
            }
            let type_id = t.tensor_type() as u32;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnsupportedType {
                path: path.clone(),
                name: t.name().to_string(),
                type_id,
            })?;
            if !(dims[0] as usize).is_multiple_of(ty.block_size()) {
                return Err(bad_dims());
            }
            let n_rows: u64 = dims[1..].iter().product();
            let n_bytes = ty.row_bytes(dims[0] as usize) as u64 * n_rows;
            let offset = data_start.checked_add(t.data_offset());
            let end = offset.and_then(|o| o.checked_add(n_bytes));
            match (offset, end) {
                (Some(offset), Some(end)) if end <= file_len => tensors.push(TensorInfo {
                    name: t.name().to_string(),
                    ty,
                    dims: dims.iter().map(|&d| d as usize).collect(),
                    offset: offset as usize,
                    n_bytes: n_bytes as usize,
                }),
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        path: path.clone(),
                        name: t.name().to_string(),
                        offset: offset.unwrap_or(u64::MAX),
                        bytes: n_bytes,
                        file_len,
                    })
                }
            }
        }
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let metadata = reader.metadata().clone();
        // SAFETY: the map is read-only and lives as long as `self`; we never hand out
        // mutable access. Modifying the file while it is mapped is outside our contract
        // (as for every mmap-based model loader).
        let map = unsafe { Mmap::map(&file) }.map_err(open_err)?;
        if (map.len() as u64) < file_len {
            return Err(GgufError::Truncated { path });
        }
        Ok(Self {
            path,
            version,
            metadata,
            tensors,
            index,
            map,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn file_len(&self) -> usize {
        self.map.len()
    }
    /// A 64-bit fingerprint of the model: the tensor table (names, types, shapes,
    /// offsets) and, per tensor, its first and last 4 KiB of data, so that two
    /// fine-tunes of one architecture differ. Saved contexts and gate files record
    /// it to refuse being used with another model. Reads two pages per tensor.
    pub fn fingerprint(&self) -> u64 {
        const SAMPLE: usize = 4096;
        let mut h = xxhash_rust::xxh3::Xxh3Default::new();
        for t in &self.tensors {
            h.update(t.name.as_bytes());
            h.update(&[0]);
            h.update(t.ty.name().as_bytes());
            for &d in &t.dims {
                h.update(&(d as u64).to_le_bytes());
            }
            h.update(&(t.offset as u64).to_le_bytes());
            if let Some(data) = self.tensor_bytes(t.offset, t.n_bytes) {
                h.update(&data[..data.len().min(SAMPLE)]);
                h.update(&data[data.len().saturating_sub(SAMPLE)..]);
            }
        }
        h.digest()
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// A tensor by its GGUF name, if present.
    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let info = &self.tensors[*self.index.get(name)?];
        // Bounds were checked against the file length at open time.
        let data = &self.map[info.offset..info.offset + info.n_bytes];
        Some(TensorView { info, data })
    }

    /// `n` bytes of the file at `offset`, if they lie inside it.
    pub fn tensor_bytes(&self, offset: usize, n: usize) -> Option<&[u8]> {
        self.map.get(offset..offset.checked_add(n)?)
    }

    /// All metadata keys, sorted.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self.metadata.keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }

    pub fn value(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.value(key).and_then(MetadataValue::as_str)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        match self.value(key)? {
            MetadataValue::I8(v) => u64::try_from(*v).ok(),
            MetadataValue::I16(v) => u64::try_from(*v).ok(),
            MetadataValue::I32(v) => u64::try_from(*v).ok(),
            MetadataValue::I64(v) => u64::try_from(*v).ok(),
            v => v.as_u64(),
        }
    }

    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.value(key)
            .and_then(MetadataValue::as_f64)
            .map(|v| v as f32)
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.value(key).and_then(MetadataValue::as_bool)
    }

    pub fn require_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.value(key) {
            None => Err(missing(key)),
            Some(v) => v.as_str().ok_or_else(|| wrong(key, "string")),
        }
    }

    pub fn require_u64(&self, key: &str) -> Result<u64, GgufError> {
        match self.value(key) {
            None => Err(missing(key)),
            Some(_) => self
                .get_u64(key)
                .ok_or_else(|| wrong(key, "unsigned integer")),
        }
    }

    pub fn require_f32(&self, key: &str) -> Result<f32, GgufError> {
        match self.value(key) {
            None => Err(missing(key)),
            Some(_) => self.get_f32(key).ok_or_else(|| wrong(key, "number")),
        }
    }

    /// The elements of an array value, if `key` holds an array.
    pub fn get_array(&self, key: &str) -> Option<&[MetadataValue]> {
        match self.value(key)? {
            MetadataValue::Array(a) => Some(&a.values),
            _ => None,
        }
    }

    pub fn require_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let arr = self.get_array(key).ok_or_else(|| match self.value(key) {
            None => missing(key),
            Some(_) => wrong(key, "array of strings"),
        })?;
        arr.iter()
            .map(|v| v.as_str().ok_or_else(|| wrong(key, "array of strings")))
            .collect()
    }

    /// An array of numbers as f32 (scores) or i64 (token types), if present.
    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>, GgufError> {
        let Some(arr) = self.get_array(key) else {
            return Ok(None);
        };
        arr.iter()
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| wrong(key, "array of numbers"))
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    pub fn get_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>, GgufError> {
        let Some(arr) = self.get_array(key) else {
            return Ok(None);
        };
        arr.iter()
            .map(|v| match v {
                MetadataValue::U32(x) => Some(*x as i64),
                MetadataValue::U64(x) => i64::try_from(*x).ok(),
                v => v.as_i64(),
            })
            .map(|x| x.ok_or_else(|| wrong(key, "array of integers")))
            .collect::<Result<_, _>>()
            .map(Some)
    }
}

fn missing(key: &str) -> GgufError {
    GgufError::MissingKey {
        key: key.to_string(),
    }
}

fn wrong(key: &str, expected: &'static str) -> GgufError {
    GgufError::WrongType {
        key: key.to_string(),
        expected,
    }
}

/// Check magic number and version ourselves, so "not a GGUF file" and "unsupported
/// version" get their own clear messages. Returns the version.
fn check_header(path: &Path, file: &File) -> Result<u32, GgufError> {
    use std::io::{Read, Seek};
    let mut head = [0u8; 8];
    let mut n = 0;
    let mut f = file;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(GgufError::Open {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    f.rewind().map_err(|source| GgufError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let path = path.to_path_buf();
    let magic_len = n.min(4);
    if head[..magic_len] != b"GGUF"[..magic_len] {
        return Err(GgufError::BadMagic { path });
    }
    if n < head.len() {
        return Err(GgufError::Truncated { path });
    }
    match u32::from_le_bytes([head[4], head[5], head[6], head[7]]) {
        version @ (2 | 3) => Ok(version),
        version => Err(GgufError::UnsupportedVersion { path, version }),
    }
}

/// GGUF versions 2 and 3 share one little-endian layout (3 only allows big-endian
/// files, which carry their own version bytes). gguf-rs-lib accepts only 3, so files
/// are read through this wrapper, which reports version 3 for a checked v2 file.
struct AsVersion3<R>(R);

impl<R: std::io::Read + std::io::Seek> std::io::Read for AsVersion3<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let start = self.0.stream_position()?;
        let n = self.0.read(buf)?;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            let p = start + i as u64;
            if (4..8).contains(&p) {
                *b = 3u32.to_le_bytes()[(p - 4) as usize];
            }
        }
        Ok(n)
    }
}

impl<R: std::io::Seek> std::io::Seek for AsVersion3<R> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.0.seek(pos)
    }
}

fn map_parse_error(path: &Path, e: GGUFError) -> GgufError {
    let path = path.to_path_buf();
    match e {
        GGUFError::UnsupportedVersion(version) => GgufError::UnsupportedVersion { path, version },
        GGUFError::UnexpectedEof => GgufError::Truncated { path },
        GGUFError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            GgufError::Truncated { path }
        }
        GGUFError::InvalidMagic { .. } => GgufError::BadMagic { path },
        other => GgufError::Malformed {
            path,
            detail: other.to_string(),
        },
    }
}
