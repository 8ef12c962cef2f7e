//! The SIMD path, chosen at run time: which paths this CPU supports (`is_x86_feature_detected!`,
//! once per process), which one the process runs ([`SimdPath::selected`]: the fastest, or the one
//! the `TRAIL_SIMD` environment variable names), and [`simd_dispatch!`](crate::simd_dispatch),
//! which compiles a function once per path with that path's target features and calls the copy
//! for a given path.
//!
//! The crate is built for the baseline of its target (no `-C target-cpu`), so one binary runs on
//! every x86-64 machine; the paths only change speed, never a bit (see [`crate::kernel`]).

use std::str::FromStr;
use std::sync::OnceLock;

use crate::KernelError;

/// The environment variable that forces a path: `scalar` (or `portable`), `avx2`, `avx512vnni`
/// (or `avx512`). Unset or empty: the fastest path this CPU supports.
pub const SIMD_ENV: &str = "TRAIL_SIMD";

/// A SIMD code path. Every path is compiled into every x86-64 build; which ones run is decided
/// at run time ([`SimdPath::is_supported`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimdPath {
    /// Portable Rust, no intrinsics, the target's baseline features.
    Scalar,
    /// AVX2 + FMA + F16C (`vpmaddubsw`).
    Avx2,
    /// AVX-512 F/BW/VNNI (`vpdpbusd`), with AVX2 + FMA + F16C.
    Avx512Vnni,
}

impl SimdPath {
    /// Every path, slowest first.
    pub const ALL: [SimdPath; 3] = [SimdPath::Scalar, SimdPath::Avx2, SimdPath::Avx512Vnni];

    /// Whether this CPU has every feature the path uses (detected once per process).
    pub fn is_supported(self) -> bool {
        static SUPPORTED: OnceLock<[bool; 3]> = OnceLock::new();
        SUPPORTED.get_or_init(|| SimdPath::ALL.map(detect))[self as usize]
    }

    /// The paths this CPU supports, slowest first (always starts with [`SimdPath::Scalar`]).
    pub fn available() -> Vec<SimdPath> {
        SimdPath::ALL
            .into_iter()
            .filter(|p| p.is_supported())
            .collect()
    }

    /// The fastest path this CPU supports.
    pub fn best() -> SimdPath {
        *Self::available()
            .last()
            .expect("scalar is always available")
    }

    /// The path this process runs: the one `TRAIL_SIMD` names, else [`SimdPath::best`]. Read
    /// once and kept. Panics if the variable names an unknown path or one this CPU lacks; call
    /// [`SimdPath::from_env`] first to report that as an error.
    pub fn selected() -> SimdPath {
        static SELECTED: OnceLock<SimdPath> = OnceLock::new();
        *SELECTED.get_or_init(|| Self::from_env().unwrap_or_else(|e| panic!("{e}")))
    }

    /// The path `TRAIL_SIMD` asks for (read now), else [`SimdPath::best`].
    pub fn from_env() -> Result<SimdPath, KernelError> {
        match std::env::var(SIMD_ENV) {
            Ok(v) if !v.is_empty() => v.parse::<SimdPath>()?.supported(),
            _ => Ok(Self::best()),
        }
    }

    /// `self`, or an error naming it when this CPU cannot run it.
    pub fn supported(self) -> Result<SimdPath, KernelError> {
        if self.is_supported() {
            Ok(self)
        } else {
            Err(KernelError::UnsupportedSimdPath(self.name()))
        }
    }

    /// Short name, as in [`crate::kernel_id`] and `TRAIL_SIMD`.
    pub fn name(self) -> &'static str {
        match self {
            SimdPath::Scalar => "scalar",
            SimdPath::Avx2 => "avx2",
            SimdPath::Avx512Vnni => "avx512vnni",
        }
    }

    /// Panics unless this CPU supports the path (the safety check of the dispatched copies).
    #[doc(hidden)]
    #[track_caller]
    pub fn assert_supported(self) {
        assert!(
            self.is_supported(),
            "SIMD path {} is not supported by this CPU",
            self.name()
        );
    }
}

impl std::fmt::Display for SimdPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SimdPath {
    type Err = KernelError;

    /// A [`SimdPath::name`], or the aliases `portable` (scalar) and `avx512` (avx512vnni).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "scalar" | "portable" => Ok(SimdPath::Scalar),
            "avx2" => Ok(SimdPath::Avx2),
            "avx512vnni" | "avx512" => Ok(SimdPath::Avx512Vnni),
            other => Err(KernelError::UnknownSimdPath(other.to_string())),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect(path: SimdPath) -> bool {
    use std::arch::is_x86_feature_detected as has;
    let avx2 = has!("avx2") && has!("fma") && has!("f16c");
    match path {
        SimdPath::Scalar => true,
        SimdPath::Avx2 => avx2,
        SimdPath::Avx512Vnni => avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect(path: SimdPath) -> bool {
    path == SimdPath::Scalar
}

/// A SIMD path this CPU supports: the proof that code may use the path's instructions. Made
/// only after a check ([`SimdPath::isa`]), or as [`Isa::SCALAR`]; the copies of
/// [`simd_dispatch!`](crate::simd_dispatch) hand their body a constant one, so a branch on it
/// costs nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Isa(SimdPath);

impl Isa {
    /// The portable path, supported everywhere.
    pub const SCALAR: Isa = Isa(SimdPath::Scalar);

    /// # Safety
    /// This CPU must support `path`.
    #[doc(hidden)]
    pub const unsafe fn new_unchecked(path: SimdPath) -> Isa {
        Isa(path)
    }

    /// The path.
    pub fn path(self) -> SimdPath {
        self.0
    }

    /// Whether the CPU has AVX and AVX2 (every x86 path but the scalar one).
    #[inline(always)]
    pub fn has_avx2(self) -> bool {
        self.0 != SimdPath::Scalar
    }
}

impl SimdPath {
    /// The proof that this CPU supports the path; panics if it does not.
    #[track_caller]
    pub fn isa(self) -> Isa {
        self.assert_supported();
        Isa(self)
    }
}

/// Defines `fn NAME(path: SimdPath, ARGS) -> RET` that runs `BODY(isa, ARGS)` compiled with the
/// target features of `path`: one copy per path, each a `#[target_feature]` function around
/// `BODY`, which must be `#[inline(always)]` so that its loops are compiled (auto-vectorized)
/// with those features. `isa` ([`Isa`]) is a constant in each copy: `BODY` may branch on it to
/// use the path's intrinsics (the other branches are compiled away). Panics if the CPU lacks
/// the path's features. Rust never fuses or reorders float operations, so copies that run the
/// same operations give the same bits; only speed differs.
///
/// ```
/// use trail_kernels::simd::Isa;
/// trail_kernels::simd_dispatch! {
///     /// `x += y`.
///     fn add(x: &mut [f32], y: &[f32]) = add_body;
/// }
/// #[inline(always)]
/// fn add_body(_isa: Isa, x: &mut [f32], y: &[f32]) {
///     x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
/// }
/// let mut x = vec![1.0f32; 40];
/// for p in trail_kernels::SimdPath::available() {
///     add(p, &mut x, &[0.5; 40]);
/// }
/// assert!(x.iter().all(|&v| v == 1.0 + 0.5 * trail_kernels::SimdPath::available().len() as f32));
/// ```
#[macro_export]
macro_rules! simd_dispatch {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:ident;
    ) => {
        $(#[$meta])*
        $vis fn $name(path: $crate::SimdPath, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            match path {
                $crate::SimdPath::Avx512Vnni => {
                    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
                    fn avx512($($arg: $ty),*) $(-> $ret)? {
                        // SAFETY: this copy runs only where the path is supported (asserted
                        // before the call).
                        let isa = unsafe { $crate::simd::Isa::new_unchecked(
                            $crate::SimdPath::Avx512Vnni,
                        ) };
                        $body(isa, $($arg),*)
                    }
                    path.assert_supported();
                    // SAFETY: the CPU has every feature `avx512` enables (asserted above).
                    return unsafe { avx512($($arg),*) };
                }
                $crate::SimdPath::Avx2 => {
                    #[target_feature(enable = "avx2,fma,f16c")]
                    fn avx2($($arg: $ty),*) $(-> $ret)? {
                        // SAFETY: as for `avx512`.
                        let isa = unsafe { $crate::simd::Isa::new_unchecked(
                            $crate::SimdPath::Avx2,
                        ) };
                        $body(isa, $($arg),*)
                    }
                    path.assert_supported();
                    // SAFETY: the CPU has every feature `avx2` enables (asserted above).
                    return unsafe { avx2($($arg),*) };
                }
                $crate::SimdPath::Scalar => {}
            }
            #[cfg(not(target_arch = "x86_64"))]
            path.assert_supported();
            $body($crate::simd::Isa::SCALAR, $($arg),*)
        }
    };
}
