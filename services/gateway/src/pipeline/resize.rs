//! Resizing to a long edge, as libvips' `thumbnail`: a box filter for 4× or more, then
//! Lanczos3, band by band in the decoded buffer.

use fast_image_resize::{
    FilterType as ResizeFilter, PixelType, ResizeAlg, ResizeOptions, Resizer,
    images::{Image, ImageRef},
};
use image::{DynamicImage, imageops::FilterType};

use super::*;
use crate::error::PipelineError;

/// Output rows per band of [`shrunk`]'s vertical pass.
pub(super) const BAND_ROWS: u32 = 64;

/// The resampling of both outputs, as libvips' `thumbnail`: Lanczos3 (the kernel widened by
/// the scale), after a box filter where the reduction is 4× or more ([`box_factors`]).
pub(super) const RESAMPLING: ResizeAlg = ResizeAlg::Convolution(ResizeFilter::Lanczos3);

/// libvips' `reduce` with its default `gap` of 2: a reduction of 4× or more along an axis first
/// averages boxes of a whole number of pixels (`floor(factor / 2)`), so Lanczos3 is left
/// between 2× and 4× ([`box_shrink`]). Its result is a shade softer than Lanczos3 all the way
/// (and 1–2 % smaller as JPEG), for a fraction of the taps. The box per axis (at most
/// [`MAX_BOX`]), or `None` when no axis reduces 4×.
pub(super) fn box_factors((width, height): (u32, u32), (dw, dh): (u32, u32)) -> Option<(u32, u32)> {
    let factor = |from: u32, to: u32| (from / to.max(1) / 2).clamp(1, MAX_BOX);
    let factors = (factor(width, dw), factor(height, dh));
    (factors != (1, 1)).then_some(factors)
}

/// The widest box along an axis: a box's sums (255 × 255 × 256 × 256 for alpha-weighted
/// colours) then fit in a `u32`. Lanczos3 does the rest of a reduction beyond 512×.
pub(super) const MAX_BOX: u32 = 256;

/// The mean of each `kx`×`ky` box of `image`'s pixels, on the exact grid from the top-left
/// corner; the boxes past the right and bottom edges are completed with copies of the edge
/// pixels (libvips' `shrink` with `ceil`). Colours of RGBA pixels are weighted by their alpha,
/// so transparent pixels lend no colour. 8-bit grey, RGB and RGBA only.
pub(super) fn box_shrink(image: &DynamicImage, (kx, ky): (u32, u32)) -> DynamicImage {
    let (width, height) = (image.width(), image.height());
    let (bw, bh) = (width.div_ceil(kx), height.div_ceil(ky));
    let channels = usize::from(image.color().channel_count());
    let alpha = image.color().has_alpha();
    let source = image.as_bytes();
    let row = width as usize * channels;
    let mut out = vec![0u8; bw as usize * bh as usize * channels];
    // Per source column and channel: the sum over the box's rows (colours times alpha for
    // RGBA).
    let mut sums = vec![0u32; row];
    let area = kx * ky;
    let rounded = |sum: u32, by: u32| u8::try_from((sum + by / 2) / by).unwrap_or(u8::MAX);
    for (oy, out_row) in out.chunks_exact_mut(bw as usize * channels).enumerate() {
        sums.fill(0);
        for dy in 0..ky {
            let y = (oy as u32 * ky + dy).min(height - 1) as usize;
            let line = &source[y * row..][..row];
            if alpha {
                for (sum, pixel) in sums.chunks_exact_mut(4).zip(line.chunks_exact(4)) {
                    let a = u32::from(pixel[3]);
                    for c in 0..3 {
                        sum[c] += u32::from(pixel[c]) * a;
                    }
                    sum[3] += a;
                }
            } else {
                for (sum, &value) in sums.iter_mut().zip(line) {
                    *sum += u32::from(value);
                }
            }
        }
        for (ox, pixel) in out_row.chunks_exact_mut(channels).enumerate() {
            let mut total = [0u32; 4];
            for dx in 0..kx {
                let x = (ox as u32 * kx + dx).min(width - 1) as usize;
                for (t, s) in total.iter_mut().zip(&sums[x * channels..][..channels]) {
                    *t += s;
                }
            }
            if alpha {
                let weight = total[3];
                for c in 0..3 {
                    pixel[c] = if weight == 0 {
                        0
                    } else {
                        rounded(total[c], weight)
                    };
                }
                pixel[3] = rounded(weight, area);
            } else {
                for (value, t) in pixel.iter_mut().zip(total) {
                    *value = rounded(t, area);
                }
            }
        }
    }
    from_raw(image.color(), (bw, bh), out).expect("the buffer is the boxed image's size")
}

/// `image` scaled down to a long edge of `edge` (unchanged when it fits), mostly in the memory
/// it already has. For 8-bit RGB and grey — every JPEG — the separable resize runs its vertical
/// pass first (the faster order for 8-bit pixels) band by band, and each band of shortened full
/// -width rows goes back into the image's own buffer as soon as no later band reads the source
/// rows it lands on (output row `r` reads source rows from about `(r - 2.5) * scale` on, so
/// after the first few bands at once). The buffer is then cut to the short image, and the
/// horizontal pass makes the result. Peak memory: the decoded image, a band, and the output.
/// Other pixel types take [`scaled`].
pub fn shrunk(image: DynamicImage, edge: u32) -> Result<DynamicImage, PipelineError> {
    let Some((dw, dh)) = target_size(image.width(), image.height(), edge) else {
        return Ok(image);
    };
    if box_factors((image.width(), image.height()), (dw, dh)).is_some() {
        // The box pass makes a buffer of half the image or less (a quarter when both axes box);
        // the in-place bands are for the rest.
        return Ok(scaled(&image, edge).unwrap_or(image));
    }
    let pixel = match &image {
        DynamicImage::ImageRgb8(_) => PixelType::U8x3,
        DynamicImage::ImageLuma8(_) => PixelType::U8,
        _ => return Ok(scaled(&image, edge).unwrap_or(image)),
    };
    let color = image.color();
    let (sw, sh) = (image.width(), image.height());
    let mut pixels = image.into_bytes();
    let row = sw as usize * pixel.size();
    let scale = f64::from(sh) / f64::from(dh);
    // The first source row that output rows from `r` on read (the filter's reach, rounded
    // down once more for safety).
    let first_read = |r: u32| ((f64::from(r) + 0.5 - 3.0) * scale - 1.0).max(0.0) as usize;
    let mut band = vec![0; row * BAND_ROWS as usize];
    let mut held: Vec<u8> = Vec::new();
    let mut written = 0;
    let mut resizer = Resizer::new();
    let vertical = (0..dh).step_by(BAND_ROWS as usize).try_for_each(|top| {
        let rows = BAND_ROWS.min(dh - top);
        let src = ImageRef::new(sw, sh, &pixels, pixel)?;
        let band = &mut band[..rows as usize * row];
        let mut dst = Image::from_slice_u8(sw, rows, band, pixel)?;
        let options = ResizeOptions::new().resize_alg(RESAMPLING).crop(
            0.0,
            f64::from(top) * scale,
            f64::from(sw),
            f64::from(rows) * scale,
        );
        resizer.resize(&src, &mut dst, &options)?;
        held.extend_from_slice(band);
        let done = (top + rows) as usize;
        let free = if done < dh as usize {
            first_read(top + rows).min(done)
        } else {
            done
        };
        if free > written {
            let n = (free - written) * row;
            pixels[written * row..][..n].copy_from_slice(&held[..n]);
            held.drain(..n);
            written = free;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    });
    drop((band, held));
    pixels.truncate(dh as usize * row);
    pixels.shrink_to_fit();
    let out = vertical
        .and_then(|()| {
            let src = ImageRef::new(sw, dh, &pixels, pixel)?;
            let mut dst = Image::new(dw, dh, pixel);
            resizer.resize(&src, &mut dst, &ResizeOptions::new().resize_alg(RESAMPLING))?;
            Ok(dst.into_vec())
        })
        .map_err(|e| {
            tracing::error!(error = %e, "banded resize failed");
            PipelineError::Internal
        })?;
    from_raw(color, (dw, dh), out).ok_or(PipelineError::Internal)
}

/// The size of an image scaled to a long edge of `edge`, or `None` when it already fits.
pub(super) fn target_size(width: u32, height: u32, edge: u32) -> Option<(u32, u32)> {
    let (w, h) = (u64::from(width), u64::from(height));
    if w.max(h) <= u64::from(edge) {
        return None;
    }
    // Rounded to the nearest, as libvips does.
    let shorter = |long: u64, short: u64| {
        u32::try_from(((short * u64::from(edge) + long / 2) / long).max(1)).unwrap_or(1)
    };
    Some(if w >= h {
        (edge, shorter(w, h))
    } else {
        (shorter(h, w), edge)
    })
}

/// The image scaled down so its long edge is `edge`, or `None` when it already fits (never
/// upscaled). Resized in 8-bit RGB(A) with SIMD convolution (`fast_image_resize`, alpha
/// premultiplied): no float copies of the image, several times faster than `image`'s resize.
pub fn scaled(image: &DynamicImage, edge: u32) -> Option<DynamicImage> {
    let (dw, dh) = target_size(image.width(), image.height(), edge)?;
    let converted;
    let source = match image {
        DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgba8(_) => image,
        other if other.color().has_alpha() => {
            converted = DynamicImage::ImageRgba8(other.to_rgba8());
            &converted
        }
        other => {
            converted = DynamicImage::ImageRgb8(other.to_rgb8());
            &converted
        }
    };
    let mut resizer = Resizer::new();
    let mut target = DynamicImage::new(dw, dh, source.color());
    let lanczos = ResizeOptions::new().resize_alg(RESAMPLING);
    let resized = match box_factors((source.width(), source.height()), (dw, dh)) {
        // Lanczos3 over the boxes, mapped back onto the source's exact extent (the last boxes
        // reach past it), as libvips' `reduce` does after its `shrink`.
        Some((kx, ky)) => resizer.resize(
            &box_shrink(source, (kx, ky)),
            &mut target,
            &lanczos.crop(
                0.0,
                0.0,
                f64::from(source.width()) / f64::from(kx),
                f64::from(source.height()) / f64::from(ky),
            ),
        ),
        None => resizer.resize(source, &mut target, &lanczos),
    };
    match resized {
        Ok(()) => Some(target),
        Err(e) => {
            tracing::warn!(error = %e, "fast resize failed; using the slow path");
            Some(source.resize(edge, edge, FilterType::Lanczos3))
        }
    }
}
