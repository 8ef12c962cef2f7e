//! Kendall's τ-b: rank agreement with ties on both sides (many true lengths sit at the output
//! cap, and a constant predictor ties everywhere: τ-b is then undefined, `None`).

/// Kendall's τ-b of paired samples; `None` when either side is constant (or n < 2) or a value
/// is NaN.
///
/// `(n_c − n_d) / √((n₀ − n₁)(n₀ − n₂))` with `n₀ = n(n−1)/2` and `n₁`, `n₂` the pairs tied in
/// `x`, resp. `y`. O(n²): fine for the few thousand test requests of a run.
pub fn kendall_tau_b(x: &[f64], y: &[f64]) -> Option<f64> {
    assert_eq!(x.len(), y.len(), "kendall_tau_b needs paired samples");
    let n = x.len();
    let (mut s, mut tie_x, mut tie_y, mut pairs) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..n {
        for j in i + 1..n {
            pairs += 1;
            let dx = x[i].partial_cmp(&x[j])? as i64;
            let dy = y[i].partial_cmp(&y[j])? as i64;
            s += dx * dy;
            tie_x += (dx == 0) as i64;
            tie_y += (dy == 0) as i64;
        }
    }
    let denom = ((pairs - tie_x) as f64 * (pairs - tie_y) as f64).sqrt();
    (denom > 0.0).then(|| s as f64 / denom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tau_b_by_hand() {
        // Perfect agreement and reversal.
        assert_eq!(kendall_tau_b(&[1., 2., 3.], &[10., 20., 30.]), Some(1.0));
        assert_eq!(kendall_tau_b(&[1., 2., 3.], &[3., 2., 1.]), Some(-1.0));
        // x = 1,2,2,3; y = 1,3,2,4: pairs 6, ties in x 1, none in y; concordant 5, discordant 0
        // → 5/√(5·6).
        let t = kendall_tau_b(&[1., 2., 2., 3.], &[1., 3., 2., 4.]).unwrap();
        assert!((t - 5.0 / 30f64.sqrt()).abs() < 1e-12);
        // A constant predictor has no τ-b, nor has a sample with a NaN.
        assert_eq!(kendall_tau_b(&[5., 5., 5.], &[1., 2., 3.]), None);
        assert_eq!(kendall_tau_b(&[1., f64::NAN, 3.], &[1., 2., 3.]), None);
    }
}
