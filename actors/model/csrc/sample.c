/* One token per row of fp32 logits [B, V], each row with its own temperature, top-k, top-p,
   random stream and log-probability request (see sampler.py, which holds the same rules in
   torch for other devices).

   Per row, the row staying in L2 across passes:
     - max and first argmax; NaN, or no finite logit, marks the row BAD_LOGITS (token -1);
     - temperature < 1e-5, top_k == 1 or a +inf logit: greedy (first argmax);
     - otherwise e_i = exp((l_i - max) / T); top-k keeps l_i >= the k-th largest logit;
       top-p by rejection: draw i with probability e_i / sum(e) over the kept tokens (inverse
       CDF in index order, one uniform from the row's own splitmix64 stream), accept it when
       the kept mass strictly above e_i is < top_p * kept mass (i is then in the nucleus),
       else draw again among the tokens above e_i. Accepted draws follow the nucleus
       distribution exactly; the expected number of draws is about 1 / top_p.
     - log-probabilities are of the raw logits (log_softmax before temperature and cuts),
       clamped at -9999 so that a -inf never reaches JSON.
   No pass reads another row: a row's token depends only on its logits and its seed. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "fastmath.h"

enum { OK = 0, BAD_LOGITS = 1, BAD_PARAMS = 2 };
enum { CHUNK = 64, MAX_DRAWS = 64, NBLK = 512 };
static const float GREEDY_BELOW = 1e-5f; /* vLLM's _SAMPLING_EPS */
static const float MIN_LOGPROB = -9999.0f;

uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline double uniform(uint64_t *state) { return (double)(splitmix64(state) >> 11) * 0x1.0p-53; }

float fs_exp_export(float x) { return fs_exp(x); } /* for the tests */

static int64_t first_equal(const float *l, int64_t V, float value)
{
    int64_t i0 = 0;
    for (; i0 + CHUNK <= V; i0 += CHUNK) {
        int hit = 0;
        #pragma omp simd reduction(|:hit)
        for (int64_t j = 0; j < CHUNK; ++j) hit |= l[i0 + j] == value;
        if (hit) break;
    }
    for (int64_t i = i0; i < V; ++i)
        if (l[i] == value) return i;
    return -1;
}

/* k-th largest (k >= 1) of buf[0..n), by quickselect; reorders buf. */
static float select_desc(float *buf, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n - 1;
    const int64_t want = k - 1;
    while (lo < hi) {
        float a = buf[lo], b = buf[lo + (hi - lo) / 2], c = buf[hi];
        const float pivot = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (buf[i] > pivot) ++i;
            while (buf[j] < pivot) --j;
            if (i <= j) {
                const float t = buf[i];
                buf[i++] = buf[j];
                buf[j--] = t;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return buf[want];
    }
    return buf[want];
}

/* Copies into vals/ids (V each) a superset of the n largest logits: every element >= the n-th
   largest of NBLK block maxima (n blocks hold an element at least that large), looking only
   into the blocks whose maximum reaches it. Returns the count. */
static int64_t candidates(const float *l, int64_t V, int64_t n, float *vals, int64_t *ids)
{
    const int64_t bs = (V + NBLK - 1) / NBLK, nb = (V + bs - 1) / bs;
    float maxima[NBLK], order[NBLK];
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t end = (b + 1) * bs < V ? (b + 1) * bs : V;
        float m = -INFINITY;
        #pragma omp simd reduction(max:m)
        for (int64_t i = b * bs; i < end; ++i) m = l[i] > m ? l[i] : m;
        maxima[b] = order[b] = m;
    }
    const float bound = n <= nb ? select_desc(order, nb, n) : -INFINITY;
    int64_t count = 0;
    for (int64_t b = 0; b < nb; ++b) {
        if (maxima[b] < bound) continue;
        const int64_t end = (b + 1) * bs < V ? (b + 1) * bs : V;
        for (int64_t i = b * bs; i < end; ++i)
            if (l[i] >= bound) {
                vals[count] = l[i];
                ids[count++] = i;
            }
    }
    return count;
}

/* k-th largest logit (1 <= k < V). */
static float kth_largest(const float *l, int64_t V, int64_t k, float *vals, int64_t *ids)
{
    if (k <= NBLK) return select_desc(vals, candidates(l, V, k, vals, ids), k);
    memcpy(vals, l, (size_t)V * sizeof *vals);
    return select_desc(vals, V, k);
}

static inline float kept(const float *e, const float *l, int64_t i, float above, float kth)
{
    return e[i] > above && l[i] >= kth ? e[i] : 0.0f;
}

static float chunk_mass(const float *e, const float *l, int64_t i0, int64_t n, float above, float kth)
{
    float s = 0.0f;
    #pragma omp simd reduction(+:s)
    for (int64_t j = i0; j < i0 + n; ++j) s += kept(e, l, j, above, kth);
    return s;
}

/* Mass of the tokens with e > above and l >= kth, summed chunk by chunk like draw() does. */
static double mass(const float *e, const float *l, int64_t V, float above, float kth)
{
    double total = 0.0;
    for (int64_t i0 = 0; i0 < V; i0 += CHUNK)
        total += chunk_mass(e, l, i0, V - i0 < CHUNK ? V - i0 : CHUNK, above, kth);
    return total;
}

/* First kept token (index order) where the running kept mass exceeds target; -1 if rounding
   left the target unreached. */
static int64_t draw(const float *e, const float *l, int64_t V, float above, float kth, double target)
{
    double acc = 0.0;
    for (int64_t i0 = 0; i0 < V; i0 += CHUNK) {
        const int64_t n = V - i0 < CHUNK ? V - i0 : CHUNK;
        const float s = chunk_mass(e, l, i0, n, above, kth);
        if (acc + s <= target) {
            acc += s;
            continue;
        }
        for (int64_t i = i0; i < i0 + n; ++i) {
            const float c = kept(e, l, i, above, kth);
            if (c > 0.0f && (acc += c) > target) return i;
        }
    }
    return -1;
}

/* The n (<= 32) largest logits, largest first (ties: lower id first), as log-probabilities. */
static void top_n(const float *l, int64_t V, int64_t n, float lse, float *vals_buf, int64_t *ids_buf,
                  int64_t *ids, float *lps)
{
    const int64_t count = candidates(l, V, n, vals_buf, ids_buf);
    float vals[32];
    int64_t got = 0;
    for (int64_t c = 0; c < count; ++c) {
        const float x = vals_buf[c];
        if (got == n && !(x > vals[n - 1])) continue;
        int64_t at = got < n ? got++ : n - 1;
        while (at > 0 && x > vals[at - 1]) {
            vals[at] = vals[at - 1];
            ids[at] = ids[at - 1];
            --at;
        }
        vals[at] = x;
        ids[at] = ids_buf[c];
    }
    for (int64_t j = 0; j < got; ++j) {
        const float lp = vals[j] - lse; /* NaN: a +inf logit among +inf ones */
        lps[j] = lp != lp ? 0.0f : (lp > MIN_LOGPROB ? lp : MIN_LOGPROB);
    }
}

typedef struct {
    float temperature, top_p;
    int64_t top_k, num_logprobs; /* num_logprobs: -1 none, else the sampled one + that many top */
    uint64_t seed;
} RowParams;

/* Returns the status; writes the token (and log-probabilities) of one row. */
static int sample_row(const float *l, int64_t V, RowParams rp, float *e, float *buf, int64_t *ibuf,
                      int64_t *token, float *logprob, int64_t *ids, float *lps)
{
    float m = -INFINITY;
    int nan = 0;
    #pragma omp simd reduction(max:m) reduction(|:nan)
    for (int64_t i = 0; i < V; ++i) {
        m = l[i] > m ? l[i] : m;
        nan |= l[i] != l[i];
    }
    *token = -1;
    if (nan || m == -INFINITY) return BAD_LOGITS;
    if (rp.temperature != rp.temperature || rp.temperature < 0.0f || rp.top_p != rp.top_p)
        return BAD_PARAMS;
    const int64_t argmax = first_equal(l, V, m);
    const int64_t k = rp.top_k <= 0 || rp.top_k > V ? V : rp.top_k;
    const int greedy = rp.temperature < GREEDY_BELOW || k == 1 || m == INFINITY;
    double z_scaled = 0.0;
    const float inv_t = rp.temperature > 1e30f ? 1e-30f : 1.0f / rp.temperature;
    if (greedy) {
        *token = argmax;
    } else {
        #pragma omp simd
        for (int64_t i = 0; i < V; ++i) e[i] = fs_exp((l[i] - m) * inv_t);
        const float kth = k < V ? kth_largest(l, V, k, buf, ibuf) : -INFINITY;
        const double kept_mass = mass(e, l, V, -1.0f, kth);
        z_scaled = kth == -INFINITY ? kept_mass : 0.0;
        const double nucleus = (rp.top_p < 1.0f ? (rp.top_p > 0.0f ? rp.top_p : 0.0f) : 1.0f) * kept_mass;
        uint64_t state = rp.seed;
        float above = -1.0f;
        double candidates = kept_mass;
        *token = argmax; /* what an exhausted or rounding-starved search falls back to */
        for (int d = 0; d < MAX_DRAWS; ++d) {
            const int64_t x = draw(e, l, V, above, kth, uniform(&state) * candidates);
            if (x < 0) break;
            const double higher = rp.top_p >= 1.0f ? 0.0 : mass(e, l, V, e[x], kth);
            if (higher < nucleus || higher == 0.0) {
                *token = x;
                break;
            }
            above = e[x];
            candidates = higher;
        }
    }
    if (rp.num_logprobs < 0) return OK;
    float lse = INFINITY; /* a +inf logit: every finite token has log-probability -inf */
    if (m != INFINITY) {
        double z = z_scaled;
        if (greedy || inv_t != 1.0f || z == 0.0) {
            float s = 0.0f;
            #pragma omp simd reduction(+:s)
            for (int64_t i = 0; i < V; ++i) s += fs_exp(l[i] - m);
            z = s;
        }
        lse = m + (float)log(z);
    }
    const float lp = l[*token] - lse;
    *logprob = lp == lp && lp > MIN_LOGPROB ? lp : (lp == lp ? MIN_LOGPROB : 0.0f);
    if (rp.num_logprobs > 0) top_n(l, V, rp.num_logprobs, lse, buf, ibuf, ids, lps);
    return OK;
}

/* logits [B, V]; per row: temperature, top_p, top_k, seed, num_logprobs (-1, or 0..max_top);
   out: tokens [B], logprobs [B], top_ids / top_lps [B, max_top] (first num_logprobs used),
   status [B]. max_top <= 32. */
void fs_sample(const float *logits, int64_t B, int64_t V, const float *temperature,
               const float *top_p, const int64_t *top_k, const uint64_t *seeds,
               const int64_t *num_logprobs, int64_t max_top, int64_t *tokens, float *logprobs,
               int64_t *top_ids, float *top_lps, int32_t *status)
{
    #pragma omp parallel
    {
        float *e = NULL, *buf = NULL;
        int64_t *ibuf = NULL;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < B; ++b) {
            if (e == NULL) {
                e = (float *)malloc((size_t)V * sizeof *e);
                buf = (float *)malloc((size_t)V * sizeof *buf);
                ibuf = (int64_t *)malloc((size_t)V * sizeof *ibuf);
            }
            const int64_t n = num_logprobs[b] > max_top ? max_top : num_logprobs[b];
            const RowParams rp = {temperature[b], top_p[b], top_k[b], n, seeds[b]};
            status[b] = sample_row(logits + b * V, V, rp, e, buf, ibuf, tokens + b, logprobs + b,
                                   top_ids + b * max_top, top_lps + b * max_top);
        }
        free(e);
        free(buf);
        free(ibuf);
    }
}
