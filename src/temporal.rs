//! The RelTemporal bias of SPEC section 4: a learnable per-head mix of three features of the time
//! between a query and a key.
//!
//! ```text
//! bias_h(q, j) = s1[h] * Bk(dt) + s2[h] * Hr(dt) + s3[h] * Wk(t_q, t_j),   dt = |t_q - t_j|
//! ```

use crate::error::{Error, Result};

/// Seconds per day.
pub const DAY: i64 = 86_400;

/// Parameters of the bias that are not learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelTemporal {
    /// `NB`: buckets beyond this saturate at `Bk = -1`. Default 64. At least 1; the GPU path
    /// takes at most 2^24 (no time gap below 2^31 seconds reaches bucket 64, so larger values
    /// only scale `Bk` down).
    pub num_time_buckets: u32,
    /// Seconds added to UTC before deciding the weekday. Default 0; within one day either way.
    pub utc_offset: i64,
}

impl Default for RelTemporal {
    fn default() -> Self {
        RelTemporal {
            num_time_buckets: 64,
            utc_offset: 0,
        }
    }
}

/// Exact integer half-octave log bucket of a non-negative time gap in seconds:
/// `x = dt + 1`, `e = floor(log2 x)`, `r` = the bit below the top one, `bucket = 2e + r`.
pub fn time_bucket(dt: u64) -> u32 {
    let x = dt.saturating_add(1);
    let e = 63 - x.leading_zeros();
    let r = if e >= 1 { (x >> (e - 1)) & 1 } else { 0 } as u32;
    2 * e + r
}

/// Whether Unix time `t`, shifted by `utc_offset`, falls on a Saturday or Sunday.
pub fn is_weekend(t: i64, utc_offset: i64) -> bool {
    // i128 so that no i64 timestamp and offset can overflow.
    let day = (t as i128 + utc_offset as i128).div_euclid(DAY as i128);
    let weekday = (day + 4).rem_euclid(7); // 1970-01-01 was a Thursday; 0 = Sunday.
    weekday == 0 || weekday == 6
}

impl RelTemporal {
    /// Checks the parameters: `num_time_buckets >= 1`, `|utc_offset| <= 86400`.
    pub fn validate(&self) -> Result<()> {
        if self.num_time_buckets == 0 {
            return Err(Error::Zero {
                field: "num_time_buckets",
            });
        }
        if self.utc_offset.unsigned_abs() > DAY as u64 {
            return Err(Error::OutOfRange {
                field: "utc_offset",
                value: self.utc_offset.to_string(),
                expected: "seconds within one day of UTC, |utc_offset| <= 86400",
            });
        }
        Ok(())
    }

    /// `Bk(dt) = -min(bucket(dt), NB) / NB`.
    pub fn bucket_feature(&self, dt: u64) -> f64 {
        let nb = self.num_time_buckets;
        -(time_bucket(dt).min(nb) as f64) / nb as f64
    }

    /// The three features `(Bk, Hr, Wk)` between a query at `t_q` and a key at `t_k`; all zero
    /// when either has no time (the user token).
    pub fn features(&self, t_q: Option<i64>, t_k: Option<i64>) -> [f64; 3] {
        let (Some(t_q), Some(t_k)) = (t_q, t_k) else {
            return [0.0; 3];
        };
        let dt = (t_q as i128 - t_k as i128).unsigned_abs() as u64;
        // sin^2 has period one day, so reducing first keeps the argument small and exact.
        let phase = (dt % DAY as u64) as f64 / DAY as f64;
        let hr = -(std::f64::consts::PI * phase).sin().powi(2);
        let wk = if is_weekend(t_q, self.utc_offset) != is_weekend(t_k, self.utc_offset) {
            -1.0
        } else {
            0.0
        };
        [self.bucket_feature(dt), hr, wk]
    }

    /// `bias_h` for coefficients `s = (s1, s2, s3)` of one head.
    pub fn bias(&self, s: [f64; 3], t_q: Option<i64>, t_k: Option<i64>) -> f64 {
        let f = self.features(t_q, t_k);
        s[0] * f[0] + s[1] * f[1] + s[2] * f[2]
    }
}
