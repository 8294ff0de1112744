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
