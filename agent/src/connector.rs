//! Between two stages of a pipeline: what the previous stage's output becomes as the next
//! stage's inputs — the output as is, or crops of the request's image around the most
//! confident detections (`Connector::Crops`), one input each.

/// The `k` most confident boxes of `detections` (rows of `row` values: cx, cy, w, h in pixels
/// of `image`, objectness, …), cut out of `image` (`[c, H, W]`, row-major) and resized to
/// `[c, h, w]` (nearest pixel). Fewer when there are fewer rows.
pub fn crops(
    detections: &[f32],
    row: usize,
    k: usize,
    image: &[f32],
    image_shape: [usize; 3],
    out: [usize; 3],
) -> Result<Vec<Vec<f32>>, String> {
    let [c, big_h, big_w] = image_shape;
    let [oc, h, w] = out;
    if row < 5 || !detections.len().is_multiple_of(row) {
        return Err(format!("detections of {} values do not make rows of {row} ≥ 5", detections.len()));
    }
    if c != oc || image.len() != c * big_h * big_w || big_h == 0 || big_w == 0 || h == 0 || w == 0 {
        return Err(format!("cannot crop a {image_shape:?} image into {out:?}"));
    }
    let rows: Vec<&[f32]> = detections.chunks_exact(row).collect();
    let mut order: Vec<usize> = (0..rows.len()).collect();
    // Most confident first; a NaN score ranks last.
    let score = |i: usize| if rows[i][4].is_nan() { f32::NEG_INFINITY } else { rows[i][4] };
    order.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
    Ok(order.into_iter().take(k).map(|i| crop(rows[i], image, image_shape, out)).collect())
}

/// One box (clamped to the image; the whole image when its numbers are not finite), resized.
fn crop(b: &[f32], image: &[f32], [c, big_h, big_w]: [usize; 3], [_, h, w]: [usize; 3]) -> Vec<f32> {
    let span = |centre: f32, size: f32, limit: usize| -> (f32, f32) {
        let (lo, hi) = (centre - size / 2.0, centre + size / 2.0);
        if !(lo.is_finite() && hi.is_finite()) {
            return (0.0, limit as f32);
        }
        let lo = lo.clamp(0.0, limit as f32 - 1.0);
        (lo, hi.clamp(lo + 1.0, limit as f32))
    };
    let (x0, x1) = span(b[0], b[2], big_w);
    let (y0, y1) = span(b[1], b[3], big_h);
    let mut out = Vec::with_capacity(c * h * w);
    for ch in 0..c {
        for oy in 0..h {
            let sy = ((y0 + (oy as f32 + 0.5) * (y1 - y0) / h as f32) as usize).min(big_h - 1);
            for ox in 0..w {
                let sx = ((x0 + (ox as f32 + 0.5) * (x1 - x0) / w as f32) as usize).min(big_w - 1);
                out.push(image[(ch * big_h + sy) * big_w + sx]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_confident_boxes_are_cut_out_and_resized() {
        // A 1×4×4 image whose pixel (y, x) holds 10y + x.
        let image: Vec<f32> = (0..16).map(|i| (10 * (i / 4) + i % 4) as f32).collect();
        let detections = [
            1.0,
            1.0,
            2.0,
            2.0,
            0.9, // the top-left 2×2
            3.0,
            3.0,
            2.0,
            2.0,
            0.1, // the bottom-right 2×2, less confident
            2.0,
            2.0,
            f32::NAN,
            4.0,
            0.5, // not finite: the whole image
        ];
        let got = crops(&detections, 5, 2, &image, [1, 4, 4], [1, 2, 2]).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], vec![0.0, 1.0, 10.0, 11.0], "the most confident box");
        assert_eq!(got[1], vec![11.0, 13.0, 31.0, 33.0], "then the whole image, resized (pixel centres)");
        let bottom = crops(&detections[5..10], 5, 3, &image, [1, 4, 4], [1, 2, 2]).unwrap();
        assert_eq!(bottom, vec![vec![22.0, 23.0, 32.0, 33.0]], "fewer rows, fewer crops");
        // A box past the border is clamped to it.
        let edge = crops(&[10.0, 10.0, 4.0, 4.0, 1.0], 5, 1, &image, [1, 4, 4], [1, 1, 1]).unwrap();
        assert_eq!(edge, vec![vec![33.0]]);
        assert!(crops(&detections[..7], 5, 1, &image, [1, 4, 4], [1, 2, 2]).is_err());
        assert!(crops(&detections, 5, 1, &image, [3, 4, 4], [3, 2, 2]).is_err(), "the image is not 3×4×4");
    }
}
