//! Intel AMX tiles: asking Linux for them, configuring them on a thread, and the one tile multiply the
//! [`super::block_sums`] kernels use. Rust has no stable AMX intrinsics, so the instructions are inline assembly.
//!
//! Linux hands out the tile registers only to a process that asks (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), which
//! [`available`] does once. A thread configures them for the duration of [`with_tiles`], whose [`Configured`]
//! token is what [`multiply`] takes, so no tile instruction can run unconfigured.

/// Rows of activations and columns of weights per tile multiply.
pub const TILE_ROWS: usize = 16;

/// Whether this CPU and kernel give us AMX-INT8 tiles (asked once; the permission is per process).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            simd::request_tiles()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// Proof that this thread's tile registers are configured: only [`with_tiles`] makes one, and its lifetime (the
/// closure's) and the raw pointer (not `Send`) keep it inside that call on that thread.
#[derive(Clone, Copy)]
pub(super) struct Configured<'a>(std::marker::PhantomData<&'a *const ()>);

/// Releases the tiles when dropped, so a panic inside [`with_tiles`] does not leave them configured.
struct Release;

impl Drop for Release {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        simd::release();
    }
}

/// Runs `f` with the tile registers configured on this thread (`None` where AMX is not [`available`]).
pub(super) fn with_tiles<R>(f: impl for<'a> FnOnce(Option<Configured<'a>>) -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if available() {
        simd::configure();
        let _release = Release;
        return f(Some(Configured(std::marker::PhantomData)));
    }
    f(None)
}

/// A tile multiply's integer sums: `[activation row][weight row]`.
#[repr(C, align(64))]
pub(super) struct Sums(pub [[i32; TILE_ROWS]; TILE_ROWS]);

/// Weights in the tiles' layout: `[k / 4][4 · column + k % 4]` for 32 values `k` of 16 weight rows (columns).
#[repr(C, align(64))]
pub(super) struct Weights(pub [[u8; 64]; 8]);

/// `sums[r][j]` = Σ_k activations[r][k] · weights of row `j` at `k` (signed × unsigned bytes, exact).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(super) fn multiply(
    _configured: Configured<'_>,
    activations: &[[i8; 32]; TILE_ROWS],
    weights: &[[u8; 64]; 8],
    sums: &mut Sums,
) {
    // SAFETY: `Configured` proves this thread configured the tiles (tmm0 16 × 64 bytes, tmm1 16 × 32, tmm2 8 × 64),
    // so the loads read exactly the 16 × 32 bytes of `activations` and the 8 × 64 bytes of `weights`, and the
    // store writes exactly the 16 × 16 integers of `sums`.
    #[allow(unsafe_code)]
    unsafe {
        std::arch::asm!(
            "tileloadd tmm1, [{a} + {s32}*1]",
            "tileloadd tmm2, [{w} + {s64}*1]",
            "tilezero tmm0",
            "tdpbsud tmm0, tmm1, tmm2",
            "tilestored [{c} + {s64}*1], tmm0",
            a = in(reg) activations.as_ptr(),
            w = in(reg) weights.as_ptr(),
            c = in(reg) sums.0.as_mut_ptr(),
            s32 = in(reg) 32usize,
            s64 = in(reg) 64usize,
            options(nostack),
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    //! The tile state: requested from Linux, configured and released per thread.
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// `arch_prctl` asks for the tile data state (`XFEATURE_XTILEDATA`).
    const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_ulong = 18;

    /// Checks CPUID for AMX-TILE and AMX-INT8 (and the AVX-512 the scaling needs), then asks Linux for the tiles.
    #[cfg(target_os = "linux")]
    pub fn request_tiles() -> bool {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx512f") && has!("avx512bw")) {
            return false;
        }
        let leaf7 = __cpuid_count(7, 0);
        let (tile, int8) = (leaf7.edx >> 24 & 1 == 1, leaf7.edx >> 25 & 1 == 1);
        if !(tile && int8) {
            return false;
        }
        // SAFETY: a plain system call with integer arguments; it fails cleanly where unsupported.
        let granted = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        granted == 0
    }

    /// The tile shapes: tmm0 16 × 16 integer sums (activation row × weight row), tmm1 16 activation rows × 32
    /// bytes, tmm2 8 rows of 64 weight bytes (four of each of 16 weight rows).
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row: [64, 32, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// Loads the tile shapes on this thread.
    pub fn configure() {
        // SAFETY: loads the 64-byte configuration above; `available()` was granted the tiles.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
    }

    /// Returns the tiles to their initial state (cheaper context switches).
    pub fn release() {
        // SAFETY: valid whether or not tiles are configured.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}
