// RelTemporal bias (SPEC section 4), the one CUDA copy used by forward and backward.
//
// Times arrive as u32 seconds relative to a per-sequence base that is a local (utc_offset) midnight
// at or before the sequence's first timed token, so `dt` is a u32 difference, the hour-of-day
// phase is `dt mod 86400`, and the weekday of a token is `(t / 86400 + weekday0) mod 7`.
#pragma once

constexpr unsigned kSecondsPerDay = 86400u;

// Exact half-octave bucket: x = dt + 1, e = floor(log2 x), r = the bit below the top, 2e + r.
__device__ __forceinline__ int time_bucket(unsigned dt) {
    unsigned x = dt + 1u;  // dt <= i32::MAX (validated), so no wrap
    int e = 31 - __clz(x);
    int r = e >= 1 ? static_cast<int>((x >> (e - 1)) & 1u) : 0;
    return 2 * e + r;
}

__device__ __forceinline__ bool is_weekend(unsigned t, int weekday0) {
    int weekday = static_cast<int>((t / kSecondsPerDay + static_cast<unsigned>(weekday0)) % 7u);
    return weekday == 0 || weekday == 6;  // 0 = Sunday
}

// The three features (Bk, Hr, Wk) between a query and a key.
struct TemporalFeatures {
    float bucket, hour, weekend;
};

__device__ __forceinline__ TemporalFeatures temporal_features(unsigned tq, unsigned tk, int weekday0,
                                                              int num_time_buckets) {
    unsigned dt = tq > tk ? tq - tk : tk - tq;
    TemporalFeatures f;
    // Reciprocal multiplies, not IEEE divisions: a division's slow path is a called subroutine
    // whose register saves were the only spills of the forward (ptxas -v, sm_80 and sm_90).
    f.bucket = -static_cast<float>(min(time_bucket(dt), num_time_buckets)) *
               __frcp_rn(static_cast<float>(num_time_buckets));
    // sin^2(pi dt / day) has period one day: reduce exactly in integers first.
    constexpr float kInvDay = 1.f / 86400.f;
    float s = sinpif(static_cast<float>(dt % kSecondsPerDay) * kInvDay);
    f.hour = -s * s;
    f.weekend = is_weekend(tq, weekday0) != is_weekend(tk, weekday0) ? -1.f : 0.f;
    return f;
}

// Per-head coefficients (s1, s2, s3).
struct TemporalCoeffs {
    float s1, s2, s3;
    __device__ __forceinline__ float bias(const TemporalFeatures& f) const {
        return s1 * f.bucket + s2 * f.hour + s3 * f.weekend;
    }
};

// A token's time as the tiled kernels keep it: the relative time, the phase of its day as
// (cos, sin) and its weekend flag, computed once per token so that a pair's features cost a few
// integer ops and two FMAs instead of a sine and two weekday divisions. SPEC section 4:
// cos(a - b) = cos a cos b + sin a sin b with per-token phases is an exact rewrite of Hr.
struct TokenTime {
    unsigned t;
    float c, s;
    int weekend;
};

__device__ __forceinline__ TokenTime token_time(unsigned t, int weekday0) {
    TokenTime x;
    x.t = t;
    // 2 (t mod day) / day in [0, 2): the phase over pi; t mod day < 2^24 is exact in f32.
    sincospif(static_cast<float>(t % kSecondsPerDay) * (2.f / 86400.f), &x.s, &x.c);
    x.weekend = is_weekend(t, weekday0) ? 1 : 0;
    return x;
}

// The three features of a pair from per-token state; `inv_buckets` = 1 / NB.
__device__ __forceinline__ TemporalFeatures pair_features(const TokenTime& q, const TokenTime& k,
                                                          int num_time_buckets, float inv_buckets) {
    const unsigned dt = q.t > k.t ? q.t - k.t : k.t - q.t;
    TemporalFeatures f;
    f.bucket = -static_cast<float>(min(time_bucket(dt), num_time_buckets)) * inv_buckets;
    f.hour = 0.5f * (fmaf(q.c, k.c, q.s * k.s) - 1.f);  // (cos(2 pi dt / day) - 1) / 2
    f.weekend = q.weekend != k.weekend ? -1.f : 0.f;
    return f;
}
