// RelTemporal bias (SPEC section 4), the one CUDA copy used by forward and backward.
//
// Times arrive as u32 seconds relative to a per-sequence base that is a local (utc_offset) midnight
// at or before the sequence's first timed token, so `dt` is a u32 difference, the hour-of-day
// phase is `dt mod 86400`, and the weekday of a token is `(t / 86400 + weekday0) mod 7`.
#pragma once

constexpr unsigned kSecondsPerDay = 86400u;

// Exact half-octave bucket: x = dt + 1, e = floor(log2 x), r = the bit below the top, 2e + r.
// A conversion that rounds toward zero keeps x's top two bits, so the f32 exponent field is
// e + 127 and the mantissa's top bit is r: the bits above the lower 22 are 2 (e + 127) + r. Four
// instructions instead of a leading-one search, a shift and a select (x <= 2^31, no sign bit).
__device__ __forceinline__ int time_bucket_biased(unsigned dt) {
    return static_cast<int>(__float_as_uint(__uint2float_rz(dt + 1u)) >> 22);  // bucket + 254
}

__device__ __forceinline__ int time_bucket(unsigned dt) {
    return time_bucket_biased(dt) - 254;  // dt <= i32::MAX (validated), so dt + 1 does not wrap
}

// min(bucket(dt), nb) as a float (1 <= nb <= 2^24: the host's bound). The float is made by
// placing the integer in the mantissa of 2^23 and subtracting, where a conversion instruction
// (I2FP) shares the quarter-rate pipe with ex2 and with the bucket's own conversion: a sub-tile's
// bias and softmax made 16 conversions and 10 ex2 per thread (SASS of the forward, sm_90). Exact:
// 2^23 + 254 + min(bucket, nb) is an integer in [2^23, 2^24) (no bucket passes 63).
// `x` = dt + 1.
__device__ __forceinline__ float clamped_bucket_of_next(unsigned x, int nb) {
    // The bucket + 254 + 2^23's bits in one shift-and-add.
    const int bits = static_cast<int>((__float_as_uint(__uint2float_rz(x)) >> 22) + 0x4B000000u);
    return __int_as_float(min(bits, nb + (254 + 0x4B000000))) - (8388608.f + 254.f);
}

__device__ __forceinline__ float clamped_bucket(unsigned dt, int nb) {
    return clamped_bucket_of_next(dt + 1u, nb);
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
    f.bucket = -clamped_bucket(dt, num_time_buckets) * __frcp_rn(static_cast<float>(num_time_buckets));
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
// (cos, sin) and its weekend flag (0 or 1, a float so that it enters the bias by an FMA),
// computed once per token so that a pair's features cost a few integer ops and FMAs instead of
// a sine and two weekday divisions. SPEC section 4: cos(a - b) = cos a cos b + sin a sin b with
// per-token phases is an exact rewrite of Hr.
struct TokenTime {
    unsigned t;
    float c, s;
    float weekend;
};

__device__ __forceinline__ TokenTime token_time(unsigned t, int weekday0) {
    TokenTime x;
    x.t = t;
    // 2 (t mod day) / day in [0, 2): the phase over pi; t mod day < 2^24 is exact in f32.
    sincospif(static_cast<float>(t % kSecondsPerDay) * (2.f / 86400.f), &x.s, &x.c);
    x.weekend = is_weekend(t, weekday0) ? 1.f : 0.f;
    return x;
}

// token_time with the phase's sine and cosine on the special-function unit, for the 16-bit
// tensor-core kernels: each gather of their slots and each key-side query tile makes one per
// slot or query, and sincospif (about 40 instructions) was most of that work. The phase is
// moved to [-pi, pi), where __sincosf is within 2^-21.2 absolute (CUDA C++ Programming Guide),
// and the signs turned back: (c, s) within 1e-6 of SPEC's, so a pair's Hr within 1e-6, far
// below the 16-bit dtypes' tolerances (3e-3, 1e-2). The f32 and dense kernels keep token_time.
// Forward and backward take the same values from the same function.
__device__ __forceinline__ TokenTime token_time_fast(unsigned t, int weekday0) {
    constexpr float kPi = 3.14159265358979f;
    TokenTime x;
    x.t = t;
    // t mod day < 2^24 is exact in f32.
    const float a = fmaf(static_cast<float>(t % kSecondsPerDay), 2.f * kPi / 86400.f, -kPi);
    float s, c;
    __sincosf(a, &s, &c);
    // sin(a + pi), cos(a + pi). (A pair sees only cos(a_q - a_k), so a sign or rotation common
    // to every token cancels; the phase's scale is what the tests can and do catch.)
    x.s = -s;
    x.c = -c;
    x.weekend = is_weekend(t, weekday0) ? 1.f : 0.f;
    return x;
}

// The three features of a pair from per-token state; `inv_buckets` = 1 / NB.
__device__ __forceinline__ TemporalFeatures pair_features(const TokenTime& q, const TokenTime& k,
                                                          int num_time_buckets, float inv_buckets) {
    const unsigned dt = q.t > k.t ? q.t - k.t : k.t - q.t;
    TemporalFeatures f;
    f.bucket = -clamped_bucket(dt, num_time_buckets) * inv_buckets;
    f.hour = 0.5f * (fmaf(q.c, k.c, q.s * k.s) - 1.f);  // (cos(2 pi dt / day) - 1) / 2
    f.weekend = q.weekend != k.weekend ? -1.f : 0.f;
    return f;
}

// One query row's bias against any key, with the row's share of SPEC section 4 folded into five
// coefficients once per row, so that a pair costs the bucket and four FMAs:
//   s1 Bk = -(s1 / NB) min(bucket(dt), NB)
//   s2 Hr = (s2 / 2) qc kc + (s2 / 2) qs ks - s2 / 2
//   s3 Wk = -s3 (qw xor kw) = -s3 qw + s3 (2 qw - 1) kw        (qw, kw in {0, 1})
// Everything is multiplied by `unit` (log2 e for a base-2 softmax). The sum is rounded in another
// order than TemporalCoeffs::bias(pair_features(..)): they agree to a few f32 ulps of the terms.
struct RowBias {
    unsigned t;
    float bucket, cos, sin, weekend, base;

    __device__ __forceinline__ static RowBias make(const TokenTime& q, const TemporalCoeffs& c,
                                                   int num_time_buckets, float unit) {
        RowBias b;
        b.t = q.t;
        b.bucket = -c.s1 * unit * __frcp_rn(static_cast<float>(num_time_buckets));
        const float half = 0.5f * c.s2 * unit, s3 = c.s3 * unit;
        b.cos = half * q.c;
        b.sin = half * q.s;
        b.weekend = s3 * (2.f * q.weekend - 1.f);
        b.base = -half - s3 * q.weekend;
        return b;
    }

    // kRowLast: the caller knows that no key it keeps is later than the row (k.t <= t), so dt + 1
    // is one three-input add where |t - k.t| + 1 took two min/max and an add. kRowFirst: none is
    // earlier (the key side, whose rows are keys and whose columns are later queries). For a key
    // on the wrong side it gives a wrong but finite bias, which the caller must mask.
    template <bool kRowLast = false, bool kRowFirst = false>
    __device__ __forceinline__ float operator()(const TokenTime& k, int num_time_buckets) const {
        float z = bucket_term<kRowLast, kRowFirst>(k, num_time_buckets);
        z = fmaf(cos, k.c, z);
        z = fmaf(sin, k.s, z);
        return fmaf(weekend, k.weekend, z);
    }

    // The bucket's term plus the base: the bias less its phase and weekend terms, for a caller
    // that adds those by an MMA (add_bias_features, dense.cuh).
    template <bool kRowLast = false, bool kRowFirst = false>
    __device__ __forceinline__ float bucket_term(const TokenTime& k, int num_time_buckets) const {
        static_assert(!(kRowLast && kRowFirst), "one order at most");
        const unsigned next = kRowLast    ? t - k.t + 1u
                              : kRowFirst ? k.t - t + 1u
                                          : max(t, k.t) - min(t, k.t) + 1u;
        return fmaf(bucket, clamped_bucket_of_next(next, num_time_buckets), base);
    }
};

// min(bucket(|t_q - t_k|), NB) of a pair: the one feature of dcoeffs that depends on both times.
__device__ __forceinline__ float pair_bucket(const TokenTime& q, const TokenTime& k, int num_time_buckets) {
    return clamped_bucket(max(q.t, k.t) - min(q.t, k.t), num_time_buckets);
}

// dcoeffs of one query row, sum_j dz_j (Bk, Hr, Wk)(q, j), kept as five sums over the keys that
// need no per-pair feature: with Hr = (qc kc + qs ks - 1) / 2 and qw, kw in {0, 1},
//   sum dz Bk = -(1 / NB) sum dz min(bucket, NB)
//   sum dz Hr = (qc sum dz kc + qs sum dz ks - sum dz) / 2
//   sum dz Wk = -(qw sum dz + (1 - 2 qw) sum dz kw)
// so a pair costs the bucket and five FMAs, and no branch on the features. (The phase as one
// sum of dz (qc kc + qs ks) took an FMUL and two FMAs a pair.)
struct CoeffSums {
    float bucket = 0.f, cos = 0.f, sin = 0.f, weekend = 0.f, dz = 0.f;

    __device__ __forceinline__ void add(float dz_j, const TokenTime& q, const TokenTime& k,
                                        int num_time_buckets) {
        bucket = fmaf(dz_j, pair_bucket(q, k, num_time_buckets), bucket);
        cos = fmaf(dz_j, k.c, cos);
        sin = fmaf(dz_j, k.s, sin);
        weekend = fmaf(dz_j, k.weekend, weekend);
        dz += dz_j;
    }

    // Adds c times other's sums: the sums of dz_j + c w_j where `other` summed w_j.
    __device__ __forceinline__ void add_scaled(const CoeffSums& other, float c) {
        bucket = fmaf(c, other.bucket, bucket);
        cos = fmaf(c, other.cos, cos);
        sin = fmaf(c, other.sin, sin);
        weekend = fmaf(c, other.weekend, weekend);
        dz = fmaf(c, other.dz, dz);
    }

    // (sum dz Bk, sum dz Hr, sum dz Wk).
    __device__ __forceinline__ void finish(const TokenTime& q, int num_time_buckets, float (&out)[3]) const {
        out[0] = -bucket * __frcp_rn(static_cast<float>(num_time_buckets));
        out[1] = 0.5f * (fmaf(q.c, cos, q.s * sin) - dz);
        out[2] = -fmaf(q.weekend, dz, (1.f - 2.f * q.weekend) * weekend);
    }
};
