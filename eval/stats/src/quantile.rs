//! Quantiles as numpy computes them by default (`numpy.quantile(x, q)`, `method="linear"`,
//! Hyndman & Fan's 7th definition), to the bit.
//!
//! The sorted sample is read at the virtual index `h = (n − 1)·q` and interpolated between its
//! neighbours `a = x[⌊h⌋]` and `b = x[⌊h⌋ + 1]` with numpy's two-sided `_lerp`: with
//! `t = h − ⌊h⌋`, `a + (b − a)·t` when `t < 0.5` and `b − (b − a)·(1 − t)` otherwise (exact at
//! both ends). A virtual index at or past the last element takes the last element.

/// The `q`-quantile (`0 ≤ q ≤ 1`) of data sorted ascending; `None` when it is empty.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let h = last as f64 * q;
    if h >= last as f64 {
        return Some(sorted[last]);
    }
    let lo = h.floor();
    let i = lo.max(0.0) as usize;
    Some(lerp(sorted[i], sorted[i + 1], h - lo))
}

/// The `q`-quantile of unsorted data (sorted by [`f64::total_cmp`] first); `None` when empty.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    quantile_sorted(&v, q)
}

/// The median: the 0.5-[`quantile`] (`numpy.quantile(x, 0.5)`); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    quantile(values, 0.5)
}

/// numpy's `_lerp`: exact at `t = 0` and `t = 1`, monotone in between.
fn lerp(a: f64, b: f64, t: f64) -> f64 {
    let d = b - a;
    if t >= 0.5 {
        b - d * (1.0 - t)
    } else {
        a + d * t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_single() {
        assert_eq!(quantile_sorted(&[], 0.5), None);
        assert_eq!(median(&[]), None);
        for q in [0.0, 0.3, 0.5, 1.0] {
            assert_eq!(quantile_sorted(&[7.0], q), Some(7.0));
        }
    }

    #[test]
    fn ends_and_midpoints() {
        let x = [1.0, 2.0, 4.0, 8.0];
        assert_eq!(quantile_sorted(&x, 0.0), Some(1.0));
        assert_eq!(quantile_sorted(&x, 1.0), Some(8.0));
        // h = 1.5: halfway between 2 and 4.
        assert_eq!(quantile_sorted(&x, 0.5), Some(3.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    /// Values from numpy 2.4 (`np.quantile(x, q)`, printed with `repr`), chosen where the
    /// one-sided formulas `a·(1 − t) + b·t` or `a + (b − a)·t` miss numpy's last bit.
    #[test]
    fn matches_numpy_to_the_bit() {
        let x = [0.1, 0.7, 1.3, 2.9, 3.3, 10.1, 11.7];
        for (q, numpy) in NUMPY {
            assert_eq!(quantile_sorted(&x, q), Some(numpy), "q = {q}");
        }
    }

    const NUMPY: [(f64, f64); 9] = [
        (0.001, 0.10360000000000001),
        (0.005, 0.11800000000000001),
        (0.025, 0.19),
        (0.085, 0.40599999999999997),
        (0.087, 0.41319999999999996),
        (0.088, 0.4168),
        (0.5, 2.9),
        (0.975, 11.459999999999999),
        (0.99, 11.604),
    ];

    #[test]
    fn unsorted_input_is_sorted_first() {
        assert_eq!(quantile(&[9.0, 1.0, 5.0], 0.25), Some(3.0));
    }
}
