//! The mixture e-process every rule keeps: one log-likelihood ratio per alternative θ, and
//! their average as the evidence.

use serde::{Deserialize, Serialize};

/// The alternatives of the mixture: candidate-to-stable rate ratios.
pub const THETAS: [f64; 8] = [1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0, 1000.0];

/// Log-likelihood ratios of one e-process, one per alternative θ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Mixture {
    /// ℓ_θ for θ in [`THETAS`].
    pub ell: [f64; 8],
}

impl Mixture {
    /// Adds a tick of a two-sample comparison: `x_c` of `n_c` candidate and `x_s` of `n_s`
    /// stable requests were bad.
    pub fn two_sample(&mut self, n_c: u64, n_s: u64, x_c: u64, x_s: u64) {
        if n_c == 0 || n_s == 0 || x_c + x_s == 0 {
            return;
        }
        let q = n_c as f64 / (n_c + n_s) as f64;
        for (l, theta) in self.ell.iter_mut().zip(THETAS) {
            let rho = theta * q / (theta * q + 1.0 - q);
            *l += x_c as f64 * (rho / q).ln() + x_s as f64 * ((1.0 - rho) / (1.0 - q)).ln();
        }
    }

    /// Adds a tick of a one-sample test against a limit rate `p0`: `x` of `n` were bad.
    pub fn one_sample(&mut self, p0: f64, n: u64, x: u64) {
        if n == 0 {
            return;
        }
        let p0 = p0.clamp(1e-6, 1.0 - 1e-6);
        for (l, theta) in self.ell.iter_mut().zip(THETAS) {
            let p1 = theta * p0 / (theta * p0 + 1.0 - p0);
            *l += x as f64 * (p1 / p0).ln() + (n - x) as f64 * ((1.0 - p1) / (1.0 - p0)).ln();
        }
    }

    /// `ln E`, the log of the mixture's evidence.
    pub fn ln_evidence(&self) -> f64 {
        log_mean_exp(&self.ell)
    }
}

/// `ln(mean(exp(xs)))` without overflow: how log-evidences are averaged (over θ, and over the
/// latency rule's three τ), which keeps the average an e-process.
pub(super) fn log_mean_exp(xs: &[f64]) -> f64 {
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    max + (xs.iter().map(|x| (x - max).exp()).sum::<f64>() / xs.len() as f64).ln()
}
