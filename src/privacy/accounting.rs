//! Privacy accounting: opendp's zCDP → (ε, δ) conversion, noise calibration and exact noise distributions.
//!
//! Everything that is a *privacy guarantee* (the zCDP → approximate-DP conversion) is
//! delegated to opendp so that hexveil never carries its own, unreviewed, privacy proof.
//! The remaining functions are *utility* helpers (standard deviations, confidence
//! intervals, pmfs) that describe the noise opendp adds; they never influence how much
//! noise is drawn, only how results are reported and tested.

use opendp::combinators::ConcentratedMeasure;
use opendp::measures::ZeroConcentratedDivergence;

/// Two-sided 95% standard-normal quantile, rounded up to the conventional 1.96 so the
/// normal-approximation intervals err on the wide side.
const Z_95: f64 = 1.96;

/// Coverage required of every interval in this module.
const COVERAGE: f64 = 0.95;

/// Above this scale the discrete Gaussian's normaliser and variance equal their
/// continuous counterparts (σ√(2π) and σ²) to full `f64` precision: by Poisson summation
/// the relative corrections are of order σ²·e^{-2π²σ²}, i.e. below 1e-300 here. Switching
/// to the closed form keeps `pmf`/`discrete_gaussian_std` O(1) for huge scales instead
/// of summing ~40σ terms.
const DG_CLOSED_FORM_SCALE: f64 = 1_000.0;

/// The noise distributions hexveil can draw through opendp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// opendp's discrete Gaussian (`make_gaussian` on integers): pmf ∝ exp(-k²/(2σ²)),
    /// where the `scale` parameter is σ. Accounted under zero-concentrated DP.
    DiscreteGaussian,
    /// opendp's discrete Laplace (`make_laplace` on integers): pmf ∝ exp(-|k|/b), where
    /// the `scale` parameter is b. Accounted under pure ε-DP.
    DiscreteLaplace,
}

/// Errors from privacy accounting.
#[derive(Debug, thiserror::Error)]
pub enum AccountingError {
    /// A parameter was outside the range where the computation is meaningful.
    #[error("invalid accounting parameter: {0}")]
    InvalidParameter(String),
    /// opendp rejected the computation; the text is opendp's own variant and message.
    #[error("opendp accounting error: {0}")]
    OpenDp(String),
}

/// Renders an opendp error with its message.
///
/// opendp's `Display` impl prints only the variant name (e.g. `FailedMap`), dropping
/// the message that says what actually went wrong, so both are formatted here.
pub(crate) fn describe_opendp_error(error: &opendp::error::Error) -> String {
    match &error.message {
        Some(message) => format!("{}: {}", error.variant, message),
        None => error.variant.to_string(),
    }
}

/// Returns the ε such that a ρ-zCDP release is also (ε, δ)-DP, using opendp's conversion.
///
/// This is the conversion `make_zCDP_to_approxDP` applies (opendp's
/// `ConcentratedMeasure::convert` for `ZeroConcentratedDivergence`): it builds the
/// privacy profile δ(ε) from the Canonne–Kamath–Steinke (2020) bound, optimised over
/// the Rényi order, and inverts it by binary search, rounding towards a larger ε. It
/// is never looser than the classic ρ + 2√(ρ ln(1/δ)).
///
/// The nested searches make one call cost milliseconds, so compute ε once per budget
/// (e.g. at configuration load) rather than per request.
///
/// `rho` must be finite and non-negative (ρ = 0 gives ε = 0); `delta` must lie in the
/// open interval (0, 1), since zCDP implies no pure-DP guarantee (δ = 0 would give ε = ∞).
///
/// # Errors
///
/// [`AccountingError::InvalidParameter`] for a `rho` or `delta` outside those ranges;
/// [`AccountingError::OpenDp`] if opendp's conversion fails or finds no finite ε.
pub fn zcdp_to_epsilon(rho: f64, delta: f64) -> Result<f64, AccountingError> {
    if !rho.is_finite() || rho < 0.0 {
        return Err(AccountingError::InvalidParameter(format!(
            "rho ({rho}) must be finite and non-negative"
        )));
    }
    if !(delta > 0.0 && delta < 1.0) {
        return Err(AccountingError::InvalidParameter(format!(
            "delta ({delta}) must lie strictly between 0 and 1"
        )));
    }
    if rho == 0.0 {
        // A release that spends no privacy budget is (0, δ)-DP for every δ. opendp's
        // search would instead bisect down to the smallest subnormal, so answer exactly.
        return Ok(0.0);
    }

    let profile = ZeroConcentratedDivergence::convert(rho)
        .map_err(|e| AccountingError::OpenDp(describe_opendp_error(&e)))?;
    let epsilon = profile
        .epsilon(delta)
        .map_err(|e| AccountingError::OpenDp(describe_opendp_error(&e)))?;

    // opendp signals "no finite ε reaches this δ" with infinity rather than an error.
    if !epsilon.is_finite() {
        return Err(AccountingError::OpenDp(format!(
            "no finite epsilon for rho={rho}, delta={delta}"
        )));
    }
    Ok(epsilon)
}

/// Returns the discrete-Gaussian scale σ = √(Δ₂² / (2ρ)) that makes a query with squared
/// L2 sensitivity `l2_sensitivity_sq` satisfy ρ-zCDP.
///
/// Taking the *squared* sensitivity avoids a square root when Δ₂² is an integer (e.g.
/// the number of counts one user can touch). Returns NaN unless Δ₂² is finite and
/// non-negative and ρ is strictly positive (checked separately so that two negative
/// inputs cannot cancel into a plausible scale); Δ₂² = 0 gives σ = 0. NaN and 0 are both
/// rejected by `mechanism::add_noise`, so a bad budget can never silently disable noise.
/// Because of floating-point rounding, the ρ opendp's privacy map reports for this σ
/// can differ from `rho` in the last few bits (either direction).
#[must_use]
pub fn gaussian_sigma_for_rho(l2_sensitivity_sq: f64, rho: f64) -> f64 {
    if !(l2_sensitivity_sq.is_finite() && l2_sensitivity_sq >= 0.0 && rho > 0.0) {
        return f64::NAN;
    }
    (l2_sensitivity_sq / (2.0 * rho)).sqrt()
}

/// Returns the discrete-Laplace scale b = Δ₁ / ε that makes a query with L1 sensitivity
/// `l1_sensitivity` satisfy ε-DP.
///
/// Returns NaN unless Δ₁ is finite and non-negative and ε is strictly positive; Δ₁ = 0
/// gives b = 0. Both are rejected by `mechanism::add_noise`.
#[must_use]
pub fn laplace_scale_for_epsilon(l1_sensitivity: f64, epsilon: f64) -> f64 {
    if !(l1_sensitivity.is_finite() && l1_sensitivity >= 0.0 && epsilon > 0.0) {
        return f64::NAN;
    }
    l1_sensitivity / epsilon
}

/// Unnormalised discrete-Gaussian weight exp(-k²/(2σ²)).
fn dg_weight(k: f64, scale: f64) -> f64 {
    let z = k / scale;
    (-0.5 * z * z).exp()
}

/// Returns the discrete Gaussian's normaliser `Σ w(k)` and second moment `Σ k² w(k)`
/// (unnormalised weights `w`), for a finite `scale > 0`.
fn dg_sums(scale: f64) -> (f64, f64) {
    if scale >= DG_CLOSED_FORM_SCALE {
        let normaliser = scale * (2.0 * std::f64::consts::PI).sqrt();
        return (normaliser, scale * scale * normaliser);
    }
    // Beyond 40σ every weight is below e^{-800}, which underflows to zero in f64, so the
    // truncated sum is the exact f64 sum. Summing from the tail inwards adds the small
    // terms first, which keeps the rounding error at the level of the largest term's ulp.
    // The cast is exact: scale < DG_CLOSED_FORM_SCALE bounds this by 40_001.
    let limit = (40.0 * scale).ceil() as i64 + 1;
    let mut normaliser = 0.0;
    let mut second = 0.0;
    for k in (1..=limit).rev() {
        let kf = k as f64;
        let w = dg_weight(kf, scale);
        normaliser += 2.0 * w;
        second += 2.0 * kf * kf * w;
    }
    (normaliser + 1.0, second)
}

/// Returns r = exp(-1/b), the ratio between consecutive discrete-Laplace probabilities.
fn dl_ratio(scale: f64) -> f64 {
    (-1.0 / scale).exp()
}

/// Returns 1 - exp(-1/b) without cancellation for large b.
fn dl_one_minus_ratio(scale: f64) -> f64 {
    -(-1.0 / scale).exp_m1()
}

/// Exact standard deviation of opendp's discrete Gaussian with scale σ.
///
/// Computed as √(Σ k² e^{-k²/(2σ²)} / Σ e^{-k²/(2σ²)}) by direct summation. It is
/// slightly below σ for σ < 1 and equals σ to within 1e-6 relative for σ ≥ 1 (exactly,
/// in f64, for σ ≥ 2). Scale 0 (no noise) gives 0; a negative or non-finite scale gives NaN.
#[must_use]
pub fn discrete_gaussian_std(scale: f64) -> f64 {
    if scale == 0.0 {
        return 0.0;
    }
    if !(scale.is_finite() && scale > 0.0) {
        return f64::NAN;
    }
    let (normaliser, second) = dg_sums(scale);
    (second / normaliser).sqrt()
}

/// Exact standard deviation of opendp's discrete Laplace with scale b.
///
/// The variance is 2r / (1 - r)² with r = e^{-1/b}. Scale 0 gives 0; a negative or
/// non-finite scale gives NaN.
#[must_use]
pub fn discrete_laplace_std(scale: f64) -> f64 {
    if scale == 0.0 {
        return 0.0;
    }
    if !(scale.is_finite() && scale > 0.0) {
        return f64::NAN;
    }
    (2.0 * dl_ratio(scale)).sqrt() / dl_one_minus_ratio(scale)
}

/// Variance of one draw of `mechanism` at `scale`.
fn variance(mechanism: Mechanism, scale: f64) -> f64 {
    let std = match mechanism {
        Mechanism::DiscreteGaussian => discrete_gaussian_std(scale),
        Mechanism::DiscreteLaplace => discrete_laplace_std(scale),
    };
    std * std
}

/// Exact normalised probability that opendp's `mechanism` at `scale` draws the value `k`.
///
/// Intended for goodness-of-fit tests of sampled noise. Scale 0 is the point mass at 0
/// (this is how opendp treats a zero scale); a negative or non-finite scale gives NaN.
#[must_use]
pub fn pmf(mechanism: Mechanism, scale: f64, k: i64) -> f64 {
    if scale == 0.0 {
        return if k == 0 { 1.0 } else { 0.0 };
    }
    if !(scale.is_finite() && scale > 0.0) {
        return f64::NAN;
    }
    // |k| as f64 is exact below 2^53 and far past where every pmf has underflowed to 0.
    let abs_k = k.unsigned_abs() as f64;
    match mechanism {
        Mechanism::DiscreteGaussian => {
            let (normaliser, _) = dg_sums(scale);
            dg_weight(abs_k, scale) / normaliser
        }
        Mechanism::DiscreteLaplace => {
            // (1 - r) / (1 + r) = tanh(1/(2b)), which stays accurate when r → 1.
            (0.5 / scale).tanh() * (-abs_k / scale).exp()
        }
    }
}

/// Smallest integer h with P(|X| ≤ h) ≥ 0.95 for X drawn from opendp's discrete Gaussian
/// with scale σ, under the exact pmf.
///
/// Runs in O(σ) time. Scale 0 gives 0; a negative or non-finite scale gives NaN.
#[must_use]
pub fn ci95_half_width_gaussian(scale: f64) -> f64 {
    if scale == 0.0 {
        return 0.0;
    }
    if !(scale.is_finite() && scale > 0.0) {
        return f64::NAN;
    }
    let (normaliser, _) = dg_sums(scale);
    // Accumulate unnormalised mass and compare against 0.95·Z, so the pmf is never
    // divided and rounded term by term.
    let target = COVERAGE * normaliser;
    let mut mass = 1.0; // weight of k = 0
    let mut h: u64 = 0;
    while mass < target {
        h += 1;
        mass += 2.0 * dg_weight(h as f64, scale);
    }
    h as f64
}

/// Tail mass P(|X| > h) = 2 r^{h+1} / (1 + r) of the discrete Laplace with scale b.
fn dl_tail_above(scale: f64, h: f64) -> f64 {
    2.0 * (-(h + 1.0) / scale).exp() / (1.0 + dl_ratio(scale))
}

/// Smallest integer h with P(|X| ≤ h) ≥ 0.95 for X drawn from opendp's discrete Laplace
/// with scale b, under the exact pmf.
///
/// Uses the closed-form tail 2r^{h+1}/(1+r), then nudges h by ±1 where rounding in the
/// logarithm could have put it on the wrong side of an integer boundary. Scale 0 gives
/// 0; a negative or non-finite scale gives NaN.
#[must_use]
pub fn ci95_half_width_laplace(scale: f64) -> f64 {
    if scale == 0.0 {
        return 0.0;
    }
    if !(scale.is_finite() && scale > 0.0) {
        return f64::NAN;
    }
    let alpha = 1.0 - COVERAGE;
    // Solve 2r^{h+1}/(1+r) = α for h+1 = b·ln(2/(α(1+r))).
    let continuous = scale * (2.0 / (alpha * (1.0 + dl_ratio(scale)))).ln();
    let mut h = (continuous.ceil() - 1.0).max(0.0);
    while dl_tail_above(scale, h) > alpha {
        h += 1.0;
    }
    while h > 0.0 && dl_tail_above(scale, h - 1.0) <= alpha {
        h -= 1.0;
    }
    h
}

/// Half-width of a 95% interval for the sum of `n` independent draws of `mechanism` at
/// `scale` (e.g. an aggregate over `n` noisy counts).
///
/// For `n == 1` this is the exact interval ([`ci95_half_width_gaussian`] or
/// [`ci95_half_width_laplace`]). For `n > 1` it is the normal approximation
/// ⌈1.96·√(n·Var)⌉ with the exact per-draw variance: sums of discrete Gaussians are
/// close to Gaussian, and sums of discrete Laplaces approach it by the central limit
/// theorem (for small `n` the Laplace's heavier tails make this slightly optimistic).
/// `n == 0` gives 0; a negative or non-finite scale gives NaN.
#[must_use]
pub fn ci95_half_width_of_sum(mechanism: Mechanism, scale: f64, n: usize) -> f64 {
    match n {
        0 => 0.0,
        1 => match mechanism {
            Mechanism::DiscreteGaussian => ci95_half_width_gaussian(scale),
            Mechanism::DiscreteLaplace => ci95_half_width_laplace(scale),
        },
        _ => (Z_95 * (n as f64 * variance(mechanism, scale)).sqrt()).ceil(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opendp::accuracy::{
        discrete_gaussian_scale_to_accuracy, discrete_laplacian_scale_to_accuracy,
    };
    use opendp::combinators::make_zCDP_to_approxDP;
    use opendp::domains::{AtomDomain, VectorDomain};
    use opendp::measurements::{make_gaussian, make_laplace};
    use opendp::measures::MaxDivergence;
    use opendp::metrics::{L1Distance, L2Distance};

    fn classic_bound(rho: f64, delta: f64) -> f64 {
        rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt()
    }

    #[test]
    fn zcdp_to_epsilon_is_positive_and_no_looser_than_classic_bound() {
        let eps = zcdp_to_epsilon(0.06, 1e-6).unwrap();
        let classic = classic_bound(0.06, 1e-6);
        assert!(eps > 0.0, "eps = {eps}");
        assert!(eps <= classic, "eps = {eps} > classic = {classic}");
    }

    #[test]
    fn zcdp_to_epsilon_is_monotone_in_rho_and_delta() {
        let rhos = [1e-4, 0.01, 0.03, 0.06, 0.1, 0.5, 1.0, 5.0];
        let eps: Vec<f64> = rhos
            .iter()
            .map(|&rho| zcdp_to_epsilon(rho, 1e-6).unwrap())
            .collect();
        for pair in eps.windows(2) {
            assert!(pair[0] < pair[1], "not increasing in rho: {eps:?}");
        }
        for (&rho, &e) in rhos.iter().zip(&eps) {
            assert!(e <= classic_bound(rho, 1e-6), "rho={rho}: {e}");
        }
        // A looser delta must never cost more epsilon.
        let by_delta: Vec<f64> = [1e-9, 1e-6, 1e-3]
            .iter()
            .map(|&d| zcdp_to_epsilon(0.06, d).unwrap())
            .collect();
        assert!(by_delta[0] > by_delta[1] && by_delta[1] > by_delta[2]);
    }

    #[test]
    fn zcdp_to_epsilon_matches_a_chained_opendp_measurement() {
        // The same number must come out of the full measurement pipeline:
        // make_gaussian (zCDP) >> make_zCDP_to_approxDP, read at delta.
        let rho = 0.06;
        let sigma = gaussian_sigma_for_rho(1.0, rho);
        let meas = make_gaussian::<_, _, ZeroConcentratedDivergence>(
            VectorDomain::new(AtomDomain::<i64>::default()),
            L2Distance::<f64>::default(),
            sigma,
            None,
        )
        .unwrap();
        let approx = make_zCDP_to_approxDP(meas).unwrap();
        let via_measurement = approx.map(&1.0).unwrap().epsilon(1e-6).unwrap();
        let direct = zcdp_to_epsilon(rho, 1e-6).unwrap();
        assert!(
            (via_measurement - direct).abs() <= 1e-9 * direct,
            "{via_measurement} vs {direct}"
        );
    }

    #[test]
    fn zcdp_to_epsilon_rejects_bad_parameters() {
        assert_eq!(zcdp_to_epsilon(0.0, 1e-6).unwrap(), 0.0);
        for (rho, delta) in [
            (-0.1, 1e-6),
            (f64::NAN, 1e-6),
            (f64::INFINITY, 1e-6),
            (0.06, 0.0),
            (0.06, 1.0),
            (0.06, -1e-6),
            (0.06, f64::NAN),
        ] {
            assert!(
                zcdp_to_epsilon(rho, delta).is_err(),
                "accepted rho={rho}, delta={delta}"
            );
        }
    }

    #[test]
    fn calibrated_scales_spend_the_requested_budget_in_opendp() {
        let rho = 0.06;
        let sens_sq = 3.0;
        let sigma = gaussian_sigma_for_rho(sens_sq, rho);
        let gauss = make_gaussian::<_, _, ZeroConcentratedDivergence>(
            VectorDomain::new(AtomDomain::<i64>::default()),
            L2Distance::<f64>::default(),
            sigma,
            None,
        )
        .unwrap();
        let spent = gauss.map(&sens_sq.sqrt()).unwrap();
        assert!((spent - rho).abs() <= 1e-12 * rho, "spent {spent}");

        let epsilon = 0.5;
        let b = laplace_scale_for_epsilon(2.0, epsilon);
        assert_eq!(b, 4.0);
        let lap = make_laplace::<_, _, MaxDivergence>(
            VectorDomain::new(AtomDomain::<i64>::default()),
            L1Distance::<f64>::default(),
            b,
            None,
        )
        .unwrap();
        assert_eq!(lap.map(&2.0).unwrap(), epsilon);
    }

    #[test]
    fn calibration_rejects_nonsense_budgets() {
        assert_eq!(gaussian_sigma_for_rho(2.0, 1.0), 1.0);
        assert_eq!(gaussian_sigma_for_rho(0.0, 1.0), 0.0);
        assert!(gaussian_sigma_for_rho(-2.0, -1.0).is_nan());
        assert!(gaussian_sigma_for_rho(1.0, 0.0).is_nan());
        assert!(gaussian_sigma_for_rho(f64::INFINITY, 1.0).is_nan());
        assert_eq!(laplace_scale_for_epsilon(0.0, 1.0), 0.0);
        assert!(laplace_scale_for_epsilon(-1.0, -1.0).is_nan());
        assert!(laplace_scale_for_epsilon(1.0, 0.0).is_nan());
        assert!(laplace_scale_for_epsilon(1.0, f64::NAN).is_nan());
    }

    /// Variance and total mass by brute-force summation over the pmf.
    fn brute_moments(mechanism: Mechanism, scale: f64, range: i64) -> (f64, f64) {
        let mut mass = 0.0;
        let mut var = 0.0;
        for k in -range..=range {
            let p = pmf(mechanism, scale, k);
            mass += p;
            var += (k * k) as f64 * p;
        }
        (mass, var)
    }

    #[test]
    fn discrete_gaussian_std_is_close_to_sigma_and_matches_pmf() {
        for sigma in [1.0, 1.5, 2.0, 5.0, 10.0, 14.0, 100.0, 999.0, 1000.0, 5000.0] {
            let std = discrete_gaussian_std(sigma);
            assert!((std - sigma).abs() <= 1e-6 * sigma, "sigma={sigma}: {std}");
        }
        // Below σ = 1 the lattice visibly shrinks the spread.
        assert!(discrete_gaussian_std(0.5) < 0.5);
        for sigma in [0.3, 0.5, 1.0, 3.0, 14.0] {
            let (mass, var) = brute_moments(Mechanism::DiscreteGaussian, sigma, 2_000);
            assert!((mass - 1.0).abs() < 1e-12, "sigma={sigma}: mass {mass}");
            let std = discrete_gaussian_std(sigma);
            assert!((var.sqrt() - std).abs() < 1e-10 * std.max(1.0));
        }
        assert_eq!(discrete_gaussian_std(0.0), 0.0);
        assert!(discrete_gaussian_std(-1.0).is_nan());
    }

    #[test]
    fn discrete_laplace_std_matches_pmf() {
        for b in [0.2, 0.5, 1.0, 3.0, 10.0, 14.0] {
            let (mass, var) = brute_moments(Mechanism::DiscreteLaplace, b, 5_000);
            assert!((mass - 1.0).abs() < 1e-12, "b={b}: mass {mass}");
            let std = discrete_laplace_std(b);
            assert!((var.sqrt() - std).abs() < 1e-9 * std, "b={b}: {std}");
        }
        // For large b the discrete Laplace approaches the continuous one (std b√2).
        let b = 1e6;
        assert!((discrete_laplace_std(b) / (b * 2f64.sqrt()) - 1.0).abs() < 1e-6);
        assert_eq!(discrete_laplace_std(0.0), 0.0);
        assert!(discrete_laplace_std(f64::NAN).is_nan());
    }

    #[test]
    fn pmf_is_symmetric_and_degenerate_at_zero_scale() {
        for m in [Mechanism::DiscreteGaussian, Mechanism::DiscreteLaplace] {
            assert_eq!(pmf(m, 7.0, 3), pmf(m, 7.0, -3));
            assert!(pmf(m, 7.0, 0) > pmf(m, 7.0, 1));
            assert_eq!(pmf(m, 0.0, 0), 1.0);
            assert_eq!(pmf(m, 0.0, 1), 0.0);
            assert_eq!(pmf(m, 7.0, i64::MIN), 0.0);
        }
        // Closed-form normaliser above the switch agrees with summation just below it.
        let below = pmf(
            Mechanism::DiscreteGaussian,
            DG_CLOSED_FORM_SCALE * (1.0 - 1e-12),
            0,
        );
        let above = pmf(Mechanism::DiscreteGaussian, DG_CLOSED_FORM_SCALE, 0);
        assert!((below / above - 1.0).abs() < 1e-10);
    }

    /// P(|X| ≤ h) under the exact pmf.
    fn central_mass(mechanism: Mechanism, scale: f64, h: i64) -> f64 {
        (-h..=h).map(|k| pmf(mechanism, scale, k)).sum()
    }

    #[test]
    fn ci95_half_widths_are_the_smallest_covering_integers() {
        for scale in [0.3, 0.7, 1.0, 2.5, 10.0, 14.0, 31.7] {
            for m in [Mechanism::DiscreteGaussian, Mechanism::DiscreteLaplace] {
                let h = ci95_half_width_of_sum(m, scale, 1);
                assert_eq!(h, h.trunc());
                let h = h as i64;
                assert!(central_mass(m, scale, h) >= 0.95, "{m:?} {scale}: h={h}");
                if h > 0 {
                    assert!(central_mass(m, scale, h - 1) < 0.95, "{m:?} {scale}: h={h}");
                }
            }
        }
    }

    #[test]
    fn ci95_half_widths_agree_with_opendp_accuracy() {
        // opendp's accuracy a satisfies P(|X| >= a) <= alpha, so our h (P(|X| <= h) >= 1 -
        // alpha) is the largest integer strictly below it.
        for scale in [0.5, 1.0, 3.0, 10.0, 14.0, 50.0, 123.4] {
            let a = discrete_gaussian_scale_to_accuracy(scale, 0.05).unwrap();
            assert_eq!(ci95_half_width_gaussian(scale), a - 1.0, "gaussian {scale}");
            let a = discrete_laplacian_scale_to_accuracy(scale, 0.05).unwrap();
            assert_eq!(
                ci95_half_width_laplace(scale),
                a.ceil() - 1.0,
                "laplace {scale}"
            );
        }
    }

    #[test]
    fn ci95_half_width_of_sum_scales_with_sqrt_n() {
        assert_eq!(
            ci95_half_width_of_sum(Mechanism::DiscreteGaussian, 10.0, 0),
            0.0
        );
        // 1.96 · √(4 · 100) = 39.2 → 40.
        assert_eq!(
            ci95_half_width_of_sum(Mechanism::DiscreteGaussian, 10.0, 4),
            40.0
        );
        let lap_var = discrete_laplace_std(10.0).powi(2);
        assert_eq!(
            ci95_half_width_of_sum(Mechanism::DiscreteLaplace, 10.0, 9),
            (1.96 * (9.0 * lap_var).sqrt()).ceil()
        );
        assert!(ci95_half_width_of_sum(Mechanism::DiscreteLaplace, -1.0, 3).is_nan());
    }

    #[test]
    fn opendp_errors_keep_their_message() {
        let err = ZeroConcentratedDivergence::convert(0.06)
            .unwrap()
            .epsilon(2.0)
            .unwrap_err();
        let text = describe_opendp_error(&err);
        assert!(text.starts_with("FailedMap: "), "{text}");
        assert!(text.contains("delta"), "{text}");
    }
}
