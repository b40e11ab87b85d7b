//! Safe access to ggml's tensor types and their CPU kernels.
use std::sync::Once;

use ggml_sys as sys;

/// A ggml tensor type (`GGML_TYPE_*`), known to be valid: it has a block size, a
/// block byte size and a conversion to f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(u32);

static INIT: Once = Once::new();

pub(super) fn init() {
    // SAFETY: ggml_cpu_init only fills global lookup tables; it is idempotent and
    // `Once` makes sure it runs before any kernel is used.
    INIT.call_once(|| unsafe { sys::ggml_cpu_init() });
}

impl GgmlType {
    pub const F32: Self = Self(sys::GGML_TYPE_F32);
    pub const F16: Self = Self(sys::GGML_TYPE_F16);
    pub const Q4_0: Self = Self(sys::GGML_TYPE_Q4_0);
    pub const Q4_1: Self = Self(sys::GGML_TYPE_Q4_1);
    pub const Q5_0: Self = Self(sys::GGML_TYPE_Q5_0);
    pub const Q5_1: Self = Self(sys::GGML_TYPE_Q5_1);
    pub const Q8_0: Self = Self(sys::GGML_TYPE_Q8_0);
    pub const Q4_K: Self = Self(sys::GGML_TYPE_Q4_K);
    pub const Q5_K: Self = Self(sys::GGML_TYPE_Q5_K);
    pub const Q6_K: Self = Self(sys::GGML_TYPE_Q6_K);

    /// The type with this id, if ggml knows it and can compute with it on the CPU.
    pub fn from_id(id: u32) -> Option<Self> {
        init();
        if id >= sys::GGML_TYPE_COUNT {
            return None;
        }
        // SAFETY: id < GGML_TYPE_COUNT, so the traits tables are in bounds; the
        // returned pointers are to static tables (or null, checked).
        unsafe {
            let t = sys::ggml_get_type_traits(id);
            let c = sys::ggml_get_type_traits_cpu(id);
            if t.is_null() || c.is_null() {
                return None;
            }
            let (t, c) = (&*t, &*c);
            let dot_ty = c.vec_dot_type;
            let usable = t.blck_size > 0
                && t.type_size > 0
                && t.to_float.is_some()
                && c.vec_dot.is_some()
                && dot_ty < sys::GGML_TYPE_COUNT
                && (dot_ty == sys::GGML_TYPE_F32
                    || (*sys::ggml_get_type_traits_cpu(dot_ty))
                        .from_float
                        .is_some());
            (usable || id == sys::GGML_TYPE_F32).then_some(Self(id))
        }
    }

    pub fn id(self) -> u32 {
        self.0
    }

    fn traits(self) -> &'static sys::ggml_type_traits {
        // SAFETY: self.0 was validated in from_id (or is a known constant); the
        // table is static.
        unsafe { &*sys::ggml_get_type_traits(self.0) }
    }

    fn cpu_traits(self) -> &'static sys::ggml_type_traits_cpu {
        init();
        // SAFETY: as above, for the CPU backend's static table.
        unsafe { &*sys::ggml_get_type_traits_cpu(self.0) }
    }

    /// ggml's name for the type, e.g. "q4_K".
    pub fn name(self) -> &'static str {
        // SAFETY: ggml returns a static NUL-terminated string for every valid type.
        unsafe { std::ffi::CStr::from_ptr(self.traits().type_name) }
            .to_str()
            .unwrap_or("?")
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        self.traits().blck_size as usize
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.traits().type_size
    }

    /// Bytes of a row of `n` values (`n` must be a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.type_size()
    }

    pub fn is_quantized(self) -> bool {
        self.traits().is_quantized
    }

    /// The type the other operand of `vec_dot` must have.
    pub fn vec_dot_type(self) -> Self {
        Self(self.cpu_traits().vec_dot_type)
    }

    pub(super) fn vec_dot(
        self,
    ) -> unsafe extern "C" fn(
        i32,
        *mut f32,
        usize,
        *const std::ffi::c_void,
        usize,
        *const std::ffi::c_void,
        usize,
        i32,
    ) {
        self.cpu_traits()
            .vec_dot
            .expect("validated in from_id: every usable type has vec_dot")
    }

    /// Convert one row of f32 into this type (`dst` is `row_bytes(src.len())`).
    pub fn from_f32(self, src: &[f32], dst: &mut [u8]) {
        assert_eq!(
            dst.len(),
            self.row_bytes(src.len()),
            "from_f32: size mismatch"
        );
        if self == Self::F32 {
            dst.copy_from_slice(super::bytes_of(src));
            return;
        }
        let f = self
            .cpu_traits()
            .from_float
            .or(self.traits().from_float_ref)
            .expect("no conversion from f32 for this type");
        // SAFETY: src holds src.len() floats, dst exactly the bytes of that many
        // values in this type, as asserted above.
        unsafe { f(src.as_ptr(), dst.as_mut_ptr().cast(), src.len() as i64) }
    }

    /// Convert one row of this type into f32 (`src` is `row_bytes(dst.len())`).
    pub fn to_f32(self, src: &[u8], dst: &mut [f32]) {
        assert_eq!(
            src.len(),
            self.row_bytes(dst.len()),
            "to_f32: size mismatch"
        );
        if self == Self::F32 {
            // Bytes from a file need not be 4-aligned: read them one value at a time.
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            return;
        }
        let f = self.traits().to_float.expect("validated in from_id");
        // SAFETY: sizes asserted above.
        unsafe { f(src.as_ptr().cast(), dst.as_mut_ptr(), dst.len() as i64) }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
