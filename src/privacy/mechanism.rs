//! Noise addition for released counts, drawn only from opendp's discrete Gaussian and Laplace measurements.
//!
//! hexveil never samples noise itself: opendp's samplers are exact (no floating-point
//! side channels) and draw their randomness from OpenSSL's `RAND_priv_bytes`, which a
//! hand-written sampler on a general-purpose RNG would not guarantee.

use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::{make_gaussian, make_laplace};
use opendp::measures::{MaxDivergence, ZeroConcentratedDivergence};
use opendp::metrics::{L1Distance, L2Distance};

use super::accounting::{Mechanism, describe_opendp_error};

/// Errors from noise addition.
#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    /// The scale was zero, negative, NaN or infinite. Zero is refused on purpose: it
    /// would release the exact counts.
    #[error("noise scale ({0}) must be finite and strictly positive")]
    InvalidScale(f64),
    /// opendp failed to build or run the measurement; the text is opendp's own.
    #[error("opendp noise error: {0}")]
    OpenDp(String),
    /// opendp returned a different number of values than it was given. Never expected;
    /// checked so that a misaligned release can never be published.
    #[error("opendp returned {actual} noisy values for {expected} counts")]
    LengthMismatch {
        /// Number of counts passed in.
        expected: usize,
        /// Number of values opendp returned.
        actual: usize,
    },
}

impl From<opendp::error::Error> for NoiseError {
    fn from(error: opendp::error::Error) -> Self {
        NoiseError::OpenDp(describe_opendp_error(&error))
    }
}

/// Returns `counts` with independent noise from `mechanism` at `scale` added to each entry.
///
/// The noise is drawn by invoking opendp's `make_gaussian` (discrete Gaussian, σ =
/// `scale`, L2 input metric) or `make_laplace` (discrete Laplace, b = `scale`, L1 input
/// metric) over `VectorDomain<AtomDomain<i64>>` once on the whole vector. The
/// measurement is built on every call because opendp measurements are neither `Send`
/// nor `Sync`, so they cannot be cached in shared state; building one is cheap next to
/// sampling.
///
/// The privacy guarantee depends only on `scale` and the caller's sensitivity, which is
/// why this function takes no budget: calibrate `scale` with
/// [`super::accounting::gaussian_sigma_for_rho`] or
/// [`super::accounting::laplace_scale_for_epsilon`].
///
/// Noisy values that fall outside the `i64` range saturate at `i64::MIN`/`i64::MAX`
/// (opendp's integer cast). Returns [`NoiseError::InvalidScale`] unless `scale` is
/// finite and strictly positive, so noise can never be disabled through this function.
///
/// # Errors
///
/// [`NoiseError::InvalidScale`] for a zero, negative or non-finite `scale`;
/// [`NoiseError::OpenDp`] if opendp cannot build or run the measurement (e.g. its
/// secure RNG fails); [`NoiseError::LengthMismatch`] if opendp's output is misaligned.
pub fn add_noise(mechanism: Mechanism, scale: f64, counts: &[i64]) -> Result<Vec<i64>, NoiseError> {
    // opendp itself accepts scale 0 (it then adds no noise at all), so the guard must
    // live here.
    if !(scale.is_finite() && scale > 0.0) {
        return Err(NoiseError::InvalidScale(scale));
    }

    let domain = VectorDomain::new(AtomDomain::<i64>::default());
    let input = counts.to_vec();
    let noisy = match mechanism {
        Mechanism::DiscreteGaussian => {
            // The input metric only affects the privacy map, which is not consulted
            // here; f64 distances match how sensitivities are expressed in accounting.
            let measurement = make_gaussian::<_, _, ZeroConcentratedDivergence>(
                domain,
                L2Distance::<f64>::default(),
                scale,
                None,
            )?;
            measurement.invoke(&input)?
        }
        Mechanism::DiscreteLaplace => {
            let measurement = make_laplace::<_, _, MaxDivergence>(
                domain,
                L1Distance::<f64>::default(),
                scale,
                None,
            )?;
            measurement.invoke(&input)?
        }
    };

    if noisy.len() != counts.len() {
        return Err(NoiseError::LengthMismatch {
            expected: counts.len(),
            actual: noisy.len(),
        });
    }
    Ok(noisy)
}

/// Returns `n` independent draws of `mechanism` noise at `scale` (noise added to zeros).
///
/// This is the baseline "raw opendp sampling" cost for benchmarks, and raw material for
/// distribution tests. It goes through exactly the same path as [`add_noise`].
///
/// # Errors
///
/// As for [`add_noise`].
pub fn sample_raw(mechanism: Mechanism, scale: f64, n: usize) -> Result<Vec<i64>, NoiseError> {
    add_noise(mechanism, scale, &vec![0; n])
}

#[cfg(test)]
mod tests {
    use super::super::accounting::{discrete_gaussian_std, discrete_laplace_std, pmf};
    use super::*;

    #[test]
    fn output_has_input_length_and_keeps_the_signal() {
        for m in [Mechanism::DiscreteGaussian, Mechanism::DiscreteLaplace] {
            assert!(add_noise(m, 1.0, &[]).unwrap().is_empty());
            let counts: Vec<i64> = (0..257).map(|i| i * 1_000_000).collect();
            let noisy = add_noise(m, 3.0, &counts).unwrap();
            assert_eq!(noisy.len(), counts.len());
            // Noise at scale 3 is far below 1e6, so each output stays next to its input.
            for (c, y) in counts.iter().zip(&noisy) {
                assert!((y - c).abs() < 1_000, "{m:?}: {c} -> {y}");
            }
            assert_eq!(sample_raw(m, 2.0, 17).unwrap().len(), 17);
        }
    }

    #[test]
    fn invalid_scales_are_rejected() {
        for m in [Mechanism::DiscreteGaussian, Mechanism::DiscreteLaplace] {
            for scale in [0.0, -0.0, -1.0, f64::NAN, f64::INFINITY] {
                let result = add_noise(m, scale, &[1, 2, 3]);
                assert!(
                    matches!(result, Err(NoiseError::InvalidScale(_))),
                    "{m:?} accepted scale {scale}: {result:?}"
                );
                assert!(sample_raw(m, scale, 3).is_err());
            }
        }
    }

    #[test]
    fn outputs_saturate_instead_of_overflowing() {
        let noisy = add_noise(Mechanism::DiscreteLaplace, 5.0, &[i64::MAX; 64]).unwrap();
        assert!(noisy.iter().all(|&y| y > i64::MAX - 1_000));
        assert!(noisy.contains(&i64::MAX), "no upward draw saturated");
    }

    /// Checks the first two moments and the shape of 200,000 draws against the exact
    /// distribution. Thresholds are wide (5 standard errors, 3% on the std, a chi-square
    /// ~6 standard deviations above its mean) so a correct sampler essentially never fails.
    fn check_distribution(mechanism: Mechanism, scale: f64, exact_std: f64) {
        const N: usize = 200_000;
        let draws = sample_raw(mechanism, scale, N).unwrap();
        assert_eq!(draws.len(), N);

        let n = N as f64;
        let mean = draws.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = draws
            .iter()
            .map(|&x| (x as f64 - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        let std = var.sqrt();
        let std_err = exact_std / n.sqrt();
        assert!(mean.abs() < 5.0 * std_err, "{mechanism:?}: mean {mean}");
        assert!(
            (std / exact_std - 1.0).abs() < 0.03,
            "{mechanism:?}: std {std} vs exact {exact_std}"
        );

        // Chi-square goodness of fit: one bin per value in [-3·std, 3·std], plus the
        // two tails pooled so every expected count is comfortably large.
        let edge = (3.0 * exact_std).round() as i64;
        let mut observed = vec![0u64; (2 * edge + 3) as usize];
        for &x in &draws {
            let bin = x.clamp(-edge - 1, edge + 1) + edge + 1;
            observed[bin as usize] += 1;
        }
        // Beyond 60 scales past the edge every remaining term is below e^-60.
        let far = edge + 1 + (60.0 * scale) as i64;
        let tail: f64 = (edge + 1..=far).map(|k| pmf(mechanism, scale, k)).sum();
        let mut chi2 = 0.0;
        for (bin, &obs) in observed.iter().enumerate() {
            let k = bin as i64 - edge - 1;
            let p = if k.abs() == edge + 1 {
                tail
            } else {
                pmf(mechanism, scale, k)
            };
            let expected = p * n;
            chi2 += (obs as f64 - expected).powi(2) / expected;
        }
        let dof = (observed.len() - 1) as f64;
        assert!(
            chi2 < dof + 6.0 * (2.0 * dof).sqrt(),
            "{mechanism:?}: chi2 {chi2} with {dof} dof"
        );
    }

    #[test]
    fn gaussian_draws_match_the_exact_distribution() {
        check_distribution(
            Mechanism::DiscreteGaussian,
            10.0,
            discrete_gaussian_std(10.0),
        );
    }

    #[test]
    fn laplace_draws_match_the_exact_distribution() {
        check_distribution(Mechanism::DiscreteLaplace, 10.0, discrete_laplace_std(10.0));
    }
}
