/* The exact postprocess's two streaming steps over a query's photo-size window, fused.
 *
 * Why by hand: ATen runs the bilinear width pass, the height pass, the threshold and the count as
 * separate element-wise operations, each reading and writing the whole window (48 MB for one
 * query of a 12 MP photo), and paints the label map's running maximum in two more. No library
 * fuses them with ATen's own rounding, and the bits must stay ATen's. This file does only
 * arithmetic whose result is fixed by IEEE 754: a product rounded once, fmaf (one rounding),
 * comparisons and selections. The sigmoid and the sum, whose bits depend on ATen's vector
 * library and reduction order, stay ATen's (dicom_node/model/postprocess.py).
 *
 * Compiled with -ffp-contract=off so that the compiler fuses nothing itself: every fma below is
 * written out, as ATen's addcmul computes it.
 */
#include <math.h>
#include <stdint.h>

/* One row of the width pass: dst[c] = fma(src[i0[c]], w0[c], src[i1[c]] * w1[c]). */
static void lerp_row(const float *restrict src, const int64_t *restrict i0, const int64_t *restrict i1,
                     const float *restrict w0, const float *restrict w1, int64_t n, float *restrict dst)
{
    for (int64_t c = 0; c < n; c++)
        dst[c] = fmaf(src[i0[c]], w0[c], src[i1[c]] * w1[c]);
}

/* A query's logits inside a window of the photo, thresholded as F.threshold(x, 0, -inf) does.
 *
 * src: the query's logits at the network-input size, rows of src_w floats.
 * Width taps (ci0, ci1, cw0, cw1) for the window's n_cols columns; height taps (ri0, ri1, rw0, rw1)
 * for its n_rows rows, as absolute source rows, non-decreasing. Each output element is
 * fma(a0, rw0, a1 * rw1) of the two width-interpolated source rows a0 and a1: the width pass,
 * then the height pass, the order of dicom_node.model.postprocess._lerp. The width pass runs
 * once per source row (kept in two row slots), not once per output row.
 * rows: scratch for two rows of n_cols floats. out: n_rows x n_cols.
 * Returns the number of positive outputs; *nans receives the number of NaNs (kept as NaN).
 */
int64_t window_logits(const float *src, int64_t src_w,
                      const int64_t *ci0, const int64_t *ci1, const float *cw0, const float *cw1, int64_t n_cols,
                      const int64_t *ri0, const int64_t *ri1, const float *rw0, const float *rw1, int64_t n_rows,
                      float *rows, float *out, int64_t *nans)
{
    int64_t held[2] = {-1, -1};
    int64_t positives = 0, nan_count = 0;
    for (int64_t y = 0; y < n_rows; y++) {
        const int64_t want[2] = {ri0[y], ri1[y]};
        const float *row[2];
        for (int k = 0; k < 2; k++) {
            int slot = held[0] == want[k] ? 0 : held[1] == want[k] ? 1 : -1;
            if (slot < 0) {
                slot = held[0] == want[1 - k] ? 1 : 0; /* keep the other row this output needs */
                lerp_row(src + want[k] * src_w, ci0, ci1, cw0, cw1, n_cols, rows + slot * n_cols);
                held[slot] = want[k];
            }
            row[k] = rows + slot * n_cols;
        }
        const float *restrict a0 = row[0], *restrict a1 = row[1];
        const float w0 = rw0[y], w1 = rw1[y];
        float *restrict dst = out + y * n_cols;
        /* 32-bit counters, and this order of the statements: what GCC 12 vectorises (with 64-bit
         * counters, or the select before the count, the loop took twice as long) */
        int32_t pos = 0, nan = 0;
        for (int64_t c = 0; c < n_cols; c++) {
            float v = fmaf(a0[c], w0, a1[c] * w1);
            nan += v != v;
            pos += v > 0.0f;
            dst[c] = v > 0.0f || v != v ? v : -INFINITY; /* ATen's threshold: x <= 0 ? -inf : x */
        }
        positives += pos;
        nan_count += nan;
    }
    *nans = nan_count;
    return positives;
}

/* The label map's running maximum: best = max(best, key) where the query's sigmoid is positive.
 * sig: n_rows x n_cols; best: the same window of the photo-size map, rows best_stride apart.
 * Equal to torch.maximum(best, ceil(sig) * key) for best >= 0 and a positive finite key. */
void paint_max(const float *sig, int64_t n_rows, int64_t n_cols, float *best, int64_t best_stride, float key)
{
    for (int64_t y = 0; y < n_rows; y++) {
        const float *restrict s = sig + y * n_cols;
        float *restrict b = best + y * best_stride;
        for (int64_t c = 0; c < n_cols; c++)
            b[c] = (s[c] > 0.0f && key > b[c]) ? key : b[c];
    }
}

/* ---- Banded: a window in slices that stay in cache, never whole in memory ---------------------
 *
 * window_band computes elements [f0, f1) of the row-major window (as window_logits does) and a
 * 0/1 byte per element (logit > 0) for the label map and the person masks. The caller applies
 * ATen's sigmoid to each slice and feeds it to cascade_feed, which adds the elements in the order
 * of ATen's sum (below), so the score's bits are those of ATen's sum over the whole window. */

int64_t window_band(const float *src, int64_t src_w,
                    const int64_t *ci0, const int64_t *ci1, const float *cw0, const float *cw1, int64_t n_cols,
                    const int64_t *ri0, const int64_t *ri1, const float *rw0, const float *rw1,
                    int64_t f0, int64_t f1, float *rows, float *out, uint8_t *positive, int64_t *nans)
{
    int64_t positives = 0, nan_count = 0;
    int64_t held[2] = {-1, -1};
    for (int64_t f = f0; f < f1;) {
        const int64_t y = f / n_cols, c0 = f - y * n_cols;
        const int64_t c1 = (f1 - y * n_cols) < n_cols ? (f1 - y * n_cols) : n_cols;
        const int64_t want[2] = {ri0[y], ri1[y]};
        const float *row[2];
        for (int k = 0; k < 2; k++) {
            int slot = held[0] == want[k] ? 0 : held[1] == want[k] ? 1 : -1;
            if (slot < 0) {
                slot = held[0] == want[1 - k] ? 1 : 0;
                lerp_row(src + want[k] * src_w, ci0, ci1, cw0, cw1, n_cols, rows + slot * n_cols);
                held[slot] = want[k];
            }
            row[k] = rows + slot * n_cols;
        }
        const float *restrict a0 = row[0], *restrict a1 = row[1];
        const float w0 = rw0[y], w1 = rw1[y];
        float *restrict dst = out + (f - f0) - c0;
        uint8_t *restrict pos_out = positive + (f - f0) - c0;
        int32_t pos = 0, nan = 0;
        for (int64_t c = c0; c < c1; c++) {
            float v = fmaf(a0[c], w0, a1[c] * w1);
            nan += v != v;
            pos += v > 0.0f;
            pos_out[c] = v > 0.0f;
            dst[c] = v > 0.0f || v != v ? v : -INFINITY;
        }
        positives += pos;
        nan_count += nan;
        f += c1 - c0;
    }
    *nans = nan_count;
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

static void add_row(cascade_t *s, const float *restrict x)
{
    for (int k = 0; k < ILP; k++)
        for (int l = 0; l < LANES; l++)
            s->acc[0][k][l] += x[k * LANES + l];
    const int64_t step = (int64_t)1 << s->level_power;
    const int64_t i = ++s->rows_done;
    /* the block of rows just completed was a full one, entered while i_start + step <= rows */
    if (i % step == 0 && i <= s->rows_total - (s->rows_total % step)) {
        for (int j = 1; j < LEVELS; j++) {
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < LANES; l++) {
                    s->acc[j][k][l] += s->acc[j - 1][k][l];
                    s->acc[j - 1][k][l] = 0.0f;
                }
            const int64_t mask = (step - 1) << (j * s->level_power);
            if ((i & mask) != 0)
                break;
        }
    }
}

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
    for (; t + ROW <= n && s->rows_done < s->rows_total && s->n_pending == 0; t += ROW)
        add_row(s, x + t);
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

/* paint_max with the 0/1 bytes of window_band as the mask. */
void paint_max_bytes(const uint8_t *positive, int64_t n_rows, int64_t n_cols, float *best, int64_t best_stride,
                     float key)
{
    for (int64_t y = 0; y < n_rows; y++) {
        const uint8_t *restrict p = positive + y * n_cols;
        float *restrict b = best + y * best_stride;
        for (int64_t c = 0; c < n_cols; c++)
            b[c] = (p[c] && key > b[c]) ? key : b[c];
    }
}
