/* The exact postprocess's streaming work over a query's photo-size window, fused.
 *
 * Why by hand: ATen runs the bilinear width pass, the height pass, the threshold, the sigmoid, the
 * sum and the count as separate element-wise operations, each reading and writing the whole window
 * (48 MB for one query of a 12 MP photo), and paints the label map's running maximum in two more.
 * No library fuses them with ATen's own rounding, and the bits must stay ATen's:
 * - bilinear steps: a product rounded once and fmaf, as ATen's addcmul computes them;
 * - the sigmoid: ATen's vector body is 1 / (1 + Sleef_expf_u10(0 - x)) and its scalar tail
 *   1 / (1 + expf(-x)) (libm, the same function ATen calls); sleef_expf below is SLEEF's xexpf
 *   (sleefsimdsp.c, the FMA build ATen links), step for step;
 * - the sum: ATen's one-thread cascade (cascade_* below).
 * dicom_node/model/postprocess.py checks each against ATen before it is used, and the tests
 * compare the sigmoid over every positive float below 110.
 *
 * Compiled with -ffp-contract=off so that the compiler fuses nothing itself: every fma below is
 * written out.
 */
#include <math.h>
#include <stdint.h>

/* One row of the width pass: dst[c] = fma(src[i0[c]], w0[c], src[i1[c]] * w1[c]). */
static void lerp_row(const float *restrict src, const int32_t *restrict i0, const int32_t *restrict i1,
                     const float *restrict w0, const float *restrict w1, int64_t n, float *restrict dst)
{
    for (int64_t c = 0; c < n; c++)
        dst[c] = fmaf(src[i0[c]], w0[c], src[i1[c]] * w1[c]);
}

#define BLOCK 64 /* columns skipped at once where no logit is positive */

static inline int any_byte(const uint8_t *restrict p, int64_t n)
{
    uint8_t any = 0;
    for (int64_t i = 0; i < n; i++)
        any |= p[i];
    return any != 0;
}

/* The two width-interpolated source rows output row y reads, computed once per source row and
 * kept in two slots (rows: 2 x n_cols floats; held: the source rows in them, -1 for none). */
typedef struct {
    const float *src;
    int64_t src_w;
    const int32_t *ci0, *ci1; /* 32-bit: the gathers take twice as many lanes */
    const float *cw0, *cw1;
    int64_t n_cols;
    const int64_t *ri0, *ri1;
    const float *rw0, *rw1;
    float *rows;
    int64_t held[2];
} taps_t;

static void source_rows(taps_t *t, int64_t y, const float **a0, const float **a1)
{
    const int64_t want[2] = {t->ri0[y], t->ri1[y]};
    const float *row[2];
    for (int k = 0; k < 2; k++) {
        int slot = t->held[0] == want[k] ? 0 : t->held[1] == want[k] ? 1 : -1;
        if (slot < 0) {
            slot = t->held[0] == want[1 - k] ? 1 : 0; /* keep the other row this output needs */
            lerp_row(t->src + want[k] * t->src_w, t->ci0, t->ci1, t->cw0, t->cw1, t->n_cols,
                     t->rows + slot * t->n_cols);
            t->held[slot] = want[k];
        }
        row[k] = t->rows + slot * t->n_cols;
    }
    *a0 = row[0];
    *a1 = row[1];
}

/* Columns [c0, c1) of output row y: dst[c] = the logit thresholded as F.threshold(x, 0, -inf)
 * (x <= 0 -> -inf, NaN stays), positive[c] = logit > 0. Counts into *positives and *nans.
 * 32-bit counters and this order of the statements: what GCC 12 vectorises (with 64-bit counters,
 * or the select before the count, the loop took twice as long). */
static void logits_span(taps_t *t, int64_t y, int64_t c0, int64_t c1, float *restrict dst,
                        uint8_t *restrict positive, int64_t *positives, int64_t *nans)
{
    const float *a0, *a1;
    source_rows(t, y, &a0, &a1);
    const float w0 = t->rw0[y], w1 = t->rw1[y];
    int32_t pos = 0, nan = 0;
    for (int64_t c = c0; c < c1; c++) {
        float v = fmaf(a0[c], w0, a1[c] * w1);
        nan += v != v;
        pos += v > 0.0f;
        positive[c] = v > 0.0f;
        dst[c] = v > 0.0f || v != v ? v : -INFINITY;
    }
    *positives += pos;
    *nans += nan;
}

/* ---- Banded: a window in slices that stay in cache, never whole in memory ---------------------
 *
 * window_band computes elements [f0, f1) of the row-major window and a 0/1 byte per element
 * (logit > 0) for the label map and the person masks. The caller applies ATen's sigmoid to each
 * slice and feeds it to cascade_feed, which adds the elements in the order of ATen's sum (below),
 * so the score's bits are those of ATen's sum over the whole window. Returns the positives. */
int64_t window_band(const float *src, int64_t src_w,
                    const int32_t *ci0, const int32_t *ci1, const float *cw0, const float *cw1, int64_t n_cols,
                    const int64_t *ri0, const int64_t *ri1, const float *rw0, const float *rw1,
                    int64_t f0, int64_t f1, float *rows, float *out, uint8_t *positive, int64_t *nans)
{
    taps_t t = {src, src_w, ci0, ci1, cw0, cw1, n_cols, ri0, ri1, rw0, rw1, rows, {-1, -1}};
    int64_t positives = 0;
    *nans = 0;
    for (int64_t f = f0; f < f1;) {
        const int64_t y = f / n_cols, c0 = f - y * n_cols;
        const int64_t c1 = (f1 - y * n_cols) < n_cols ? (f1 - y * n_cols) : n_cols;
        logits_span(&t, y, c0, c1, out + (f - f0) - c0, positive + (f - f0) - c0, &positives, nans);
        f += c1 - c0;
    }
    return positives;
}

/* ATen's sum of a contiguous float32 range on one thread (aten/src/ATen/native/cpu/SumKernel.cpp,
 * vectorized_inner_sum -> row_sum -> multi_row_sum), fed in order in pieces:
 * - LANES-wide vectors, ILP = 4 of them per "row" of 32 elements; rows are added into level-0
 *   accumulators; after each full block of 2^level_power rows, level j-1 is added into level j
 *   (and cleared) for j = 1.. while the row count is a multiple of 2^(j * level_power);
 *   level_power = max(4, CeilLog2(rows) / 4), 4 levels; rows past the last full block are added
 *   into level 0 without cascading;
 * - then the levels are added into level 0, the vectors left over after the last row into ILP
 *   slot 0, slots 1..3 into slot 0; the scalar sum starts at 0, adds the elements left over after
 *   the last vector, then the LANES lanes of slot 0.
 * LANES = 8 on this build was found by measurement (16 differs); dicom_node.model.postprocess
 * checks the whole emulation against torch.sum before it is used. */
#define LANES 8
#define ILP 4
#define LEVELS 4
#define ROW (LANES * ILP)

typedef struct {
    float acc[LEVELS][ILP][LANES];
    float pending[ROW];
    int64_t n_pending, rows_done, rows_total, n_total, fed, level_power;
} cascade_t;

int64_t cascade_state_bytes(void) { return (int64_t)sizeof(cascade_t); }

static int64_t ceil_log2(int64_t x)
{
    if (x <= 2)
        return 1;
    return 64 - __builtin_clzll((uint64_t)(x - 1)); /* floor(log2(x - 1)) + 1 */
}

void cascade_start(cascade_t *s, int64_t n)
{
    for (int j = 0; j < LEVELS; j++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < LANES; l++)
                s->acc[j][k][l] = 0.0f;
    s->n_pending = 0;
    s->rows_done = 0;
    s->n_total = n;
    s->fed = 0;
    s->rows_total = n / ROW;
    const int64_t lp = ceil_log2(s->rows_total) / LEVELS;
    s->level_power = lp > 4 ? lp : 4;
}

/* The cascade after row i (1-based) completes a block: level j-1 into level j, for j = 1.. while i is
 * a multiple of 2^(j * level_power); only for full blocks (entered while start + step <= rows). */
static void block_done(cascade_t *s)
{
    const int64_t step = (int64_t)1 << s->level_power, i = s->rows_done;
    if ((i & (step - 1)) != 0 || i > (s->rows_total & ~(step - 1)))
        return;
    for (int j = 1; j < LEVELS; j++) {
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < LANES; l++) {
                s->acc[j][k][l] += s->acc[j - 1][k][l];
                s->acc[j - 1][k][l] = 0.0f;
            }
        if ((i & ((step - 1) << (j * s->level_power))) != 0)
            break;
    }
}

/* n whole rows into level 0, in order; the level-0 accumulators stay in registers within a block. */
static void add_rows(cascade_t *s, const float *restrict x, int64_t n)
{
    const int64_t step = (int64_t)1 << s->level_power;
    while (n > 0) {
        const int64_t to_end = step - (s->rows_done & (step - 1));
        const int64_t k = n < to_end ? n : to_end;
        float acc[ROW];
        for (int e = 0; e < ROW; e++)
            acc[e] = (&s->acc[0][0][0])[e];
        for (int64_t r = 0; r < k; r++)
            for (int e = 0; e < ROW; e++)
                acc[e] += x[r * ROW + e];
        for (int e = 0; e < ROW; e++)
            (&s->acc[0][0][0])[e] = acc[e];
        s->rows_done += k;
        x += k * ROW;
        n -= k;
        block_done(s);
    }
}

static void add_row(cascade_t *s, const float *restrict x) { add_rows(s, x, 1); }

void cascade_feed(cascade_t *s, const float *x, int64_t n)
{
    if (s->fed < 0 || n > s->n_total - s->fed) { /* more than announced: the sum is void */
        s->fed = -1;
        return;
    }
    int64_t t = 0;
    while (t < n && s->n_pending > 0 && s->n_pending < ROW) { /* finish a row begun in the last piece */
        s->pending[s->n_pending++] = x[t++];
        if (s->n_pending == ROW && s->rows_done < s->rows_total) {
            add_row(s, s->pending);
            s->n_pending = 0;
        }
    }
    if (s->n_pending == 0) {
        int64_t whole = (n - t) / ROW;
        if (whole > s->rows_total - s->rows_done)
            whole = s->rows_total - s->rows_done;
        add_rows(s, x + t, whole);
        t += whole * ROW;
    }
    for (; t < n; t++) {
        s->pending[s->n_pending++] = x[t];
        if (s->n_pending == ROW && s->rows_done < s->rows_total) {
            add_row(s, s->pending);
            s->n_pending = 0;
        }
    }
    s->fed += n;
}

/* The sum (a float32), once all n elements have been fed; NaN if they were not. */
float cascade_finish(cascade_t *s)
{
    if (s->fed != s->n_total || s->rows_done != s->rows_total)
        return NAN;
    for (int j = 1; j < LEVELS; j++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < LANES; l++)
                s->acc[0][k][l] += s->acc[j][k][l];
    const int64_t vectors = s->n_pending / LANES; /* left over after the last row: fewer than ILP */
    for (int64_t v = 0; v < vectors; v++)
        for (int l = 0; l < LANES; l++)
            s->acc[0][0][l] += s->pending[v * LANES + l];
    for (int k = 1; k < ILP; k++)
        for (int l = 0; l < LANES; l++)
            s->acc[0][0][l] += s->acc[0][k][l];
    float total = 0.0f;
    for (int64_t t = vectors * LANES; t < s->n_pending; t++)
        total += s->pending[t];
    for (int l = 0; l < LANES; l++)
        total += s->acc[0][0][l];
    return total;
}

/* cascade_feed of n zeros: a zero added to an accumulator (never -0 here: it starts at +0 and
 * only non-negative values are added) leaves it as it is, so only the blocks' cascades remain. */
void cascade_feed_zeros(cascade_t *s, int64_t n)
{
    static const float zeros[ROW] = {0};
    if (s->fed < 0 || n > s->n_total - s->fed) {
        s->fed = -1;
        return;
    }
    const int64_t head = s->n_pending > 0 ? (ROW - s->n_pending < n ? ROW - s->n_pending : n) : 0;
    cascade_feed(s, zeros, head);
    n -= head;
    const int64_t step = (int64_t)1 << s->level_power;
    int64_t whole = n / ROW;
    if (whole > s->rows_total - s->rows_done)
        whole = s->rows_total - s->rows_done;
    while (whole > 0) { /* zeros leave level 0 as it is: only the blocks' cascades remain */
        const int64_t to_end = step - (s->rows_done & (step - 1));
        const int64_t k = whole < to_end ? whole : to_end;
        s->rows_done += k;
        s->fed += k * ROW;
        n -= k * ROW;
        whole -= k;
        block_done(s);
    }
    while (n > 0) {
        const int64_t k = n < ROW ? n : ROW;
        cascade_feed(s, zeros, k);
        n -= k;
    }
}

/* SLEEF's xexpf (sleefsimdsp.c, FMA build: vmla = fma), one lane. */
static inline float pow2i(int32_t q)
{
    union { int32_t i; float f; } u = {(q + 0x7f) * (1 << 23)};
    return u.f;
}

static inline float sleef_expf(float d)
{
    const float r_ln2 = 1.442695040888963407359924681001892137426645954152985934135449406931f;
    const float l2u = 0.693145751953125f, l2l = 1.428606765330187045e-06f;
    const int32_t q = (int32_t)rintf(d * r_ln2);
    float s = fmaf((float)q, -l2u, d);
    s = fmaf((float)q, -l2l, s);
    float u = 0.000198527617612853646278381f;
    u = fmaf(u, s, 0.00139304355252534151077271f);
    u = fmaf(u, s, 0.00833336077630519866943359f);
    u = fmaf(u, s, 0.0416664853692054748535156f);
    u = fmaf(u, s, 0.166666671633720397949219f);
    u = fmaf(u, s, 0.5f);
    u = 1.0f + fmaf(s * s, u, s);
    u = u * pow2i(q >> 1) * pow2i(q - (q >> 1)); /* vldexp2 */
    u = d < -104.0f ? 0.0f : u;
    return 100.0f < d ? INFINITY : u;
}

/* ATen's sigmoid, vector body and scalar tail (UnaryOpsKernel.cpp, sigmoid_kernel). */
void sigmoid_vector(const float *x, float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] = 1.0f / (1.0f + sleef_expf(0.0f - x[i]));
}

void sigmoid_scalar(const float *x, float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] = 1.0f / (1.0f + expf(-x[i]));
}

/* Columns [c0, c1) of row y's sigmoid by the scalar tail's formula, from the logits again (line
 * holds the vector body's results there). */
static void scalar_tail(taps_t *t, int64_t y, int64_t c0, int64_t c1, float *line)
{
    const float *a0, *a1;
    source_rows(t, y, &a0, &a1);
    const float w0 = t->rw0[y], w1 = t->rw1[y];
    for (int64_t c = c0; c < c1; c++) {
        const float v = fmaf(a0[c], w0, a1[c] * w1);
        const float x = v > 0.0f || v != v ? v : -INFINITY;
        sigmoid_scalar(&x, line + c, 1);
    }
}

/* The whole mask score of a window in one pass, nothing window-sized but the bytes:
 * sum(sigmoid(thresholded logits)) as Reductions computes it over the row-major window, whose
 * elements are split into chunks at bounds[0] = 0 < bounds[1] < ... < bounds[n_chunks] = n (the
 * threads' chunks): each chunk's sum is ATen's one-thread cascade, the chunks' sums are added in
 * order in float32; in each chunk the last (length % vec_step) elements take the sigmoid's scalar
 * tail, the others its vector body (vec_step = 2 x ATen's vector length). line: n_cols floats.
 * Returns the positives; *nans the NaN count (the sum is then meaningless); *total the sum. */
int64_t window_score(const float *src, int64_t src_w,
                     const int32_t *ci0, const int32_t *ci1, const float *cw0, const float *cw1, int64_t n_cols,
                     const int64_t *ri0, const int64_t *ri1, const float *rw0, const float *rw1, int64_t n_rows,
                     const int64_t *bounds, int64_t n_chunks, int64_t vec_step, float *rows, float *line,
                     uint8_t *positive, cascade_t *state, int64_t *nans, float *total)
{
    taps_t t = {src, src_w, ci0, ci1, cw0, cw1, n_cols, ri0, ri1, rw0, rw1, rows, {-1, -1}};
    int64_t positives = 0, chunk = 0;
    int64_t tail_start = bounds[1] - (bounds[1] - bounds[0]) % vec_step;
    float sum = 0.0f;
    *nans = 0;
    cascade_start(state, bounds[1] - bounds[0]);
    for (int64_t y = 0; y < n_rows; y++) {
        const int64_t f_row = y * n_cols;
        const int64_t before = positives;
        logits_span(&t, y, 0, n_cols, line, positive + f_row, &positives, nans);
        const int any = positives != before;
        if (any) /* the sigmoid of -inf is +0: blocks without a positive logit need no exp */
            for (int64_t c = 0; c < n_cols; c += BLOCK) {
                const int64_t e = c + BLOCK < n_cols ? c + BLOCK : n_cols;
                if (any_byte(positive + f_row + c, e - c))
                    sigmoid_vector(line + c, line + c, e - c);
                else
                    for (int64_t k = c; k < e; k++)
                        line[k] = 0.0f;
            }
        for (int64_t c = 0; c < n_cols;) { /* feed the row, chunk by chunk */
            const int64_t end = bounds[chunk + 1];
            const int64_t stop = end - f_row < n_cols ? end - f_row : n_cols;
            if (any) {
                const int64_t from = tail_start - f_row > c ? tail_start - f_row : c;
                if (from < stop) /* the chunk's scalar tail lies in this row */
                    scalar_tail(&t, y, from, stop, line);
                cascade_feed(state, line + c, stop - c);
            } else {
                cascade_feed_zeros(state, stop - c);
            }
            c = stop;
            if (f_row + c == end) { /* a chunk ends: its sum, then the next chunk */
                const float part = cascade_finish(state);
                sum = chunk == 0 ? part : sum + part;
                if (++chunk < n_chunks) {
                    cascade_start(state, bounds[chunk + 1] - bounds[chunk]);
                    tail_start = bounds[chunk + 1] - (bounds[chunk + 1] - bounds[chunk]) % vec_step;
                }
            }
        }
    }
    *total = sum;
    return positives;
}

/* best = max(best, key) where positive (the 0/1 bytes of window_band / window_score) is 1; blocks
 * without a positive byte are not read from best at all (most of a part's bounding box). */
void paint_max_bytes(const uint8_t *positive, int64_t n_rows, int64_t n_cols, float *best, int64_t best_stride,
                     float key)
{
    for (int64_t y = 0; y < n_rows; y++) {
        const uint8_t *restrict p = positive + y * n_cols;
        float *restrict b = best + y * best_stride;
        for (int64_t c0 = 0; c0 < n_cols; c0 += BLOCK) {
            const int64_t c1 = c0 + BLOCK < n_cols ? c0 + BLOCK : n_cols;
            if (!any_byte(p + c0, c1 - c0))
                continue;
            for (int64_t c = c0; c < c1; c++)
                b[c] = (p[c] && key > b[c]) ? key : b[c];
        }
    }
}
