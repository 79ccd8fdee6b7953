//! 8-bit row-wise absmax weights (LLM.int8's weight format, without outliers).

use super::block_absmax;

/// A `[rows, cols]` weight in 8 bits, row-wise absmax (bitsandbytes' `int8_vectorwise_quant`
/// with no outlier threshold).
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Weight {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<i8>,
    pub row_absmax: Vec<f32>,
}

impl Int8Weight {
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "weight of {rows} × {cols}");
        let row_absmax = block_absmax(w, cols);
        let values = w
            .chunks(cols)
            .zip(&row_absmax)
            .flat_map(|(row, &a)| {
                let s = 127.0 / a;
                row.iter().map(move |&x| (x * s).round_ties_even() as i8)
            })
            .collect();
        Self {
            rows,
            cols,
            values,
            row_absmax,
        }
    }

    /// Rows `r0..r1` dequantized into `out`: `q · absmax_r / 127`.
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        for (r, o) in (r0..r1).zip(out.chunks_mut(self.cols)) {
            let s = self.row_absmax[r] / 127.0;
            for (o, &q) in o
                .iter_mut()
                .zip(&self.values[r * self.cols..(r + 1) * self.cols])
            {
                *o = q as f32 * s;
            }
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &mut out);
        out
    }
}
