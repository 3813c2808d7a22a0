//! Images and arrays in and out: decoding PNG/JPEG/WebP to RGB8 as Pillow does, Pillow's Lanczos
//! resize, PNG output with text chunks, diffusers' float-to-u8 conversion, and NumPy `.npy` files.
//!
//! Pixels are RGB8, row-major, `3 * width * height` bytes, with no padding.

use std::io::Cursor;

use crate::{Error, Result};

/// Images wider or taller than this are refused before anything is allocated for them.
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// Images with more pixels than this (16384 x 16384) are refused before decoding.
pub const MAX_IMAGE_PIXELS: u64 = 1 << 28;

fn image_err(what: &str, msg: impl Into<String>) -> Error {
    Error::Image {
        what: what.to_string(),
        msg: msg.into(),
    }
}

// ------------------------------------------------------------------------------------------------
// Decoding
// ------------------------------------------------------------------------------------------------

/// Decodes a PNG, JPEG or WebP file to RGB8 `(pixels, width, height)`, converting every colour
/// type as Pillow's `Image.open(f).convert("RGB")` does: grey is replicated, palettes are looked
/// up, alpha is dropped (not composited), 16-bit colour keeps its high byte, and 16-bit grey is
/// clamped to 255 (Pillow opens it as `I;16`, whose conversion to RGB clips rather than scales).
/// EXIF orientation is not applied (`convert` does not apply it either).
///
/// `what` names the input in error messages (a path, "the --image argument"). Errors for empty,
/// unrecognised, truncated or corrupt data, for zero-sized images, and for images over
/// [`MAX_IMAGE_SIDE`] a side or [`MAX_IMAGE_PIXELS`] pixels; the size is checked from the header,
/// before the pixels are allocated.
pub fn decode_image(bytes: &[u8], what: &str) -> Result<(Vec<u8>, u32, u32)> {
    use ::image::{DynamicImage, ImageDecoder, ImageFormat};

    if bytes.is_empty() {
        return Err(image_err(
            what,
            "the file is empty (expected a PNG, JPEG or WebP image)",
        ));
    }
    let format = match ::image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => f,
        Ok(other) => {
            return Err(image_err(
                what,
                format!(
                    "{} images are not supported (expected a PNG, JPEG or WebP image)",
                    other.to_mime_type()
                ),
            ))
        }
        Err(_) => {
            let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
            return Err(image_err(
                what,
                format!(
                    "not a PNG, JPEG or WebP image (it starts with bytes {})",
                    head.join(" ")
                ),
            ));
        }
    };
    let name = match format {
        ImageFormat::Png => "PNG",
        ImageFormat::Jpeg => "JPEG",
        _ => "WebP",
    };
    if format == ImageFormat::Jpeg {
        check_jpeg_complete(bytes)
            .map_err(|msg| image_err(what, format!("invalid JPEG: {msg}")))?;
    }
    let decode_err = |e: ::image::ImageError| image_err(what, format!("invalid {name} image: {e}"));
    let too_large = |w: u32, h: u32| {
        image_err(
            what,
            format!(
                "the {name} image is {w}x{h} pixels, larger than supported \
                 (at most {MAX_IMAGE_SIDE} pixels a side and {MAX_IMAGE_PIXELS} pixels in all)"
            ),
        )
    };
    // A PNG's size is in its first chunk: refuse absurd sizes before the decoder sizes its row
    // buffers from them (it would fail with a bare "memory limit exceeded").
    if format == ImageFormat::Png && bytes.len() >= 24 && &bytes[12..16] == b"IHDR" {
        let w = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
        let h = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
        if w == 0 || h == 0 {
            return Err(image_err(what, format!("the PNG image is empty ({w}x{h} pixels)")));
        }
        if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || (w as u64) * (h as u64) > MAX_IMAGE_PIXELS {
            return Err(too_large(w, h));
        }
    }

    // First read the header only, with no size limit, so that the size can be named in the error;
    // `max_alloc` still bounds what the PNG decoder may allocate for metadata chunks.
    let mut probe_limits = ::image::Limits::default();
    probe_limits.max_alloc = Some(64 << 20);
    let mut reader = ::image::ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(probe_limits);
    let mut decoder = reader.into_decoder().map_err(decode_err)?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(image_err(
            what,
            format!("the {name} image is empty ({w}x{h} pixels)"),
        ));
    }
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || (w as u64) * (h as u64) > MAX_IMAGE_PIXELS {
        return Err(too_large(w, h));
    }
    let mut limits = ::image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    // The decoded image (at most 8 bytes a pixel) plus the decoders' working buffers.
    limits.max_alloc = Some((w as u64) * (h as u64) * 8 + (256 << 20));
    decoder.set_limits(limits).map_err(decode_err)?;
    let img = DynamicImage::from_decoder(decoder).map_err(decode_err)?;
    if img.width() != w || img.height() != h {
        return Err(image_err(
            what,
            format!("invalid {name} image: the decoder changed its size"),
        ));
    }
    let rgb = pillow_rgb(img);
    Ok((rgb, w, h))
}

/// Pillow's `.convert("RGB")` of what Pillow would have opened.
fn pillow_rgb(img: ::image::DynamicImage) -> Vec<u8> {
    use ::image::DynamicImage as D;

    fn map<const N: usize, T: Copy>(src: &[T], f: impl Fn(&[T]) -> [u8; 3]) -> Vec<u8> {
        let mut out = Vec::with_capacity(src.len() / N * 3);
        for px in src.chunks_exact(N) {
            out.extend_from_slice(&f(px));
        }
        out
    }
    let hi = |v: u16| (v >> 8) as u8;
    match img {
        D::ImageRgb8(b) => b.into_raw(),
        D::ImageRgba8(b) => map::<4, u8>(b.as_raw(), |p| [p[0], p[1], p[2]]),
        D::ImageLuma8(b) => map::<1, u8>(b.as_raw(), |p| [p[0]; 3]),
        D::ImageLumaA8(b) => map::<2, u8>(b.as_raw(), |p| [p[0]; 3]),
        // Pillow opens 16-bit grey as mode I;16, and I;16 -> RGB clips each value to 0..=255.
        D::ImageLuma16(b) => map::<1, u16>(b.as_raw(), |p| [p[0].min(255) as u8; 3]),
        // ... but 16-bit grey + alpha as RGBA (and 16-bit colour as RGB/RGBA) from the high bytes.
        D::ImageLumaA16(b) => map::<2, u16>(b.as_raw(), |p| [hi(p[0]); 3]),
        D::ImageRgb16(b) => map::<3, u16>(b.as_raw(), |p| [hi(p[0]), hi(p[1]), hi(p[2])]),
        D::ImageRgba16(b) => map::<4, u16>(b.as_raw(), |p| [hi(p[0]), hi(p[1]), hi(p[2])]),
        other => other.to_rgb8().into_raw(),
    }
}

/// A JPEG cut short still decodes in the `image` crate (the missing blocks come out grey), where
/// Pillow raises "image file is truncated". Refuse a JPEG with no end-of-image marker after its
/// first scan. (Entropy-coded data escapes 0xFF as FF 00, so FF D9 there can only be the EOI.)
fn check_jpeg_complete(bytes: &[u8]) -> std::result::Result<(), String> {
    if bytes.len() < 4 || bytes[0] != 0xFF || bytes[1] != 0xD8 {
        return Err("no start-of-image marker".into());
    }
    // Walk the marker segments up to the first start-of-scan (skipping, e.g., an EXIF thumbnail,
    // which has markers of its own).
    let mut i = 2usize;
    let scan_start = loop {
        // Fill bytes (FF FF ...) may precede a marker.
        while i < bytes.len() && bytes[i] == 0xFF && bytes.get(i + 1) == Some(&0xFF) {
            i += 1;
        }
        if i + 4 > bytes.len() {
            return Err("the file is truncated before its image data".into());
        }
        if bytes[i] != 0xFF {
            return Err(format!("no marker at byte {i}"));
        }
        let marker = bytes[i + 1];
        if marker == 0xD9 {
            return Err("the file ends before its image data".into());
        }
        if (0xD0..=0xD7).contains(&marker) || marker == 0x01 {
            i += 2;
            continue;
        }
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        if len < 2 {
            return Err(format!("bad segment length {len} at byte {i}"));
        }
        let end = i + 2 + len;
        if end > bytes.len() {
            return Err("the file is truncated (a header segment is cut short)".into());
        }
        if marker == 0xDA {
            break end;
        }
        i = end;
    };
    if bytes[scan_start..].windows(2).any(|w| w == [0xFF, 0xD9]) {
        Ok(())
    } else {
        Err("the file is truncated (no end-of-image marker after the image data)".into())
    }
}

// ------------------------------------------------------------------------------------------------
// Lanczos resize (Pillow)
// ------------------------------------------------------------------------------------------------

/// Pillow's fixed-point precision for 8-bit resampling: 32 bits less 8 for the value and 2 for
/// the overshoot of the filter's negative lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos3(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Resampling weights of one axis as Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`
/// compute them: for each output index, the first input index and the fixed-point weights.
struct Coeffs {
    ksize: usize,
    /// (first input index, number of taps) for each output index
    bounds: Vec<(usize, usize)>,
    /// `ksize` weights for each output index, in units of 2^-PRECISION_BITS
    weights: Vec<i32>,
}

fn lanczos_coeffs(in_size: u32, out_size: u32) -> Coeffs {
    // The box is the whole image: in0 = 0, in1 = in_size (floats in Pillow, exact here).
    let scale = in_size as f64 / out_size as f64;
    // Downscaling stretches the filter over `scale` input pixels; upscaling does not shrink it.
    let filterscale = scale.max(1.0);
    let support = 3.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size as usize);
    let mut weights = vec![0i32; out_size as usize * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size as usize {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) conversion truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let (xmin, n) = (xmin as usize, xmax.clamp(0, ksize as i64) as usize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = lanczos3(((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for (dst, &kx) in row.iter_mut().zip(&k).take(n) {
            let v = if ww != 0.0 { kx / ww } else { kx };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            *dst = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

/// Pillow's `clip8`: the fixed-point sum, rounded down to 8 bits and clamped.
#[inline]
fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `Image.resize((new_w, new_h), Image.LANCZOS)` of Pillow 13 on an RGB8 image, bit for bit:
/// Lanczos-3 weights stretched by the downscale factor, normalised to sum 1 and rounded to 22-bit
/// fixed point, applied in two separable passes, each rounded and clipped to 8 bits. A pass whose
/// size does not change is skipped. diffusers' super-resolution pipeline shrinks its input to a
/// multiple of 32 this way.
///
/// The order of the passes follows Pillow 13 (python-pillow/Pillow#9549): vertical first when the
/// height shrinks by more than twice as many pixels as the width does, horizontal first otherwise.
/// (Pillow 12 and older always went horizontal first; the two orders differ by the rounding of
/// the intermediate image, a few levels at most.)
///
/// # Panics
/// If `rgb.len() != 3 * w * h` (a programming error: [`decode_image`] returns consistent values).
pub fn resize_lanczos(rgb: &[u8], w: u32, h: u32, new_w: u32, new_h: u32) -> Vec<u8> {
    let need = 3 * w as usize * h as usize;
    assert_eq!(
        rgb.len(),
        need,
        "resize_lanczos: {w}x{h} RGB8 needs {need} bytes"
    );
    if new_w == 0 || new_h == 0 {
        return Vec::new();
    }
    let (need_h, need_v) = (new_w != w, new_h != h);
    let vertical_first =
        need_h && need_v && new_h < h && (h - new_h) as i64 > 2 * (w as i64 - new_w as i64);
    let (w, h, new_w, new_h) = (w as usize, h as usize, new_w as usize, new_h as usize);
    match (need_h, need_v) {
        (false, false) => rgb.to_vec(),
        (true, false) => resample_horizontal(rgb, w, h, new_w),
        (false, true) => resample_vertical(rgb, w, h, new_h),
        (true, true) if vertical_first => {
            resample_horizontal(&resample_vertical(rgb, w, h, new_h), w, new_h, new_w)
        }
        (true, true) => resample_vertical(&resample_horizontal(rgb, w, h, new_w), new_w, h, new_h),
    }
}

/// Pillow's `ImagingResampleHorizontal_8bpc` on RGB8: `w x h` -> `new_w x h`.
fn resample_horizontal(src: &[u8], w: usize, h: usize, new_w: usize) -> Vec<u8> {
    let c = lanczos_coeffs(w as u32, new_w as u32);
    let half = 1i64 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; new_w * h * 3];
    for (src_row, dst_row) in src.chunks_exact(w * 3).zip(out.chunks_exact_mut(new_w * 3)) {
        for (xx, px) in dst_row.chunks_exact_mut(3).enumerate() {
            let (xmin, n) = c.bounds[xx];
            let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
            let mut ss = [half; 3];
            for (s, &kx) in src_row[xmin * 3..(xmin + n) * 3].chunks_exact(3).zip(k) {
                for ch in 0..3 {
                    ss[ch] += s[ch] as i64 * kx as i64;
                }
            }
            for ch in 0..3 {
                px[ch] = clip8(ss[ch]);
            }
        }
    }
    out
}

/// Pillow's `ImagingResampleVertical_8bpc` on RGB8: `w x h` -> `w x new_h`.
fn resample_vertical(src: &[u8], w: usize, h: usize, new_h: usize) -> Vec<u8> {
    let c = lanczos_coeffs(h as u32, new_h as u32);
    let half = 1i64 << (PRECISION_BITS - 1);
    let row = w * 3;
    let mut out = vec![0u8; new_h * row];
    let mut acc = vec![0i64; row];
    for (yy, dst) in out.chunks_exact_mut(row).enumerate() {
        let (ymin, n) = c.bounds[yy];
        let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
        acc.fill(half);
        for (y, &ky) in k.iter().enumerate() {
            let src_row = &src[(ymin + y) * row..(ymin + y + 1) * row];
            for (a, &s) in acc.iter_mut().zip(src_row) {
                *a += s as i64 * ky as i64;
            }
        }
        for (d, &a) in dst.iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
    out
}

// ------------------------------------------------------------------------------------------------
// Output
// ------------------------------------------------------------------------------------------------

/// An 8-bit RGB PNG of `rgb` (`3 * w * h` bytes) with the text chunks `text` (keyword, value),
/// stored as Pillow's `PngInfo.add_text` stores them: tEXt when the value is Latin-1, iTXt
/// (UTF-8) otherwise. Keywords must be 1 to 79 printable Latin-1 characters without leading,
/// trailing or doubled spaces; values must not contain NUL.
pub fn encode_png(rgb: &[u8], w: u32, h: u32, text: &[(String, String)]) -> Result<Vec<u8>> {
    let what = "PNG output";
    if w == 0 || h == 0 {
        return Err(image_err(
            what,
            format!("cannot write an empty image ({w}x{h} pixels)"),
        ));
    }
    let expected = 3 * w as u64 * h as u64;
    if rgb.len() as u64 != expected {
        return Err(image_err(
            what,
            format!(
                "{w}x{h} RGB8 pixels need {expected} bytes, but {} were given",
                rgb.len()
            ),
        ));
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (key, value) in text {
            check_png_keyword(key)
                .map_err(|msg| image_err(what, format!("text chunk keyword {key:?}: {msg}")))?;
            if value.contains('\0') {
                return Err(image_err(
                    what,
                    format!("text chunk {key:?}: the value contains a NUL character"),
                ));
            }
            let res = if value.chars().all(|c| (c as u32) < 256) {
                enc.add_text_chunk(key.clone(), value.clone())
            } else {
                enc.add_itxt_chunk(key.clone(), value.clone())
            };
            res.map_err(|e| image_err(what, format!("text chunk {key:?}: {e}")))?;
        }
        let png_err = |e: png::EncodingError| image_err(what, e.to_string());
        let mut writer = enc.write_header().map_err(png_err)?;
        writer.write_image_data(rgb).map_err(png_err)?;
        writer.finish().map_err(png_err)?;
    }
    Ok(out)
}

fn check_png_keyword(key: &str) -> std::result::Result<(), String> {
    let n = key.chars().count();
    if n == 0 || n > 79 {
        return Err(format!("must be 1 to 79 characters long, not {n}"));
    }
    if let Some(c) = key
        .chars()
        .find(|&c| !matches!(c as u32, 32..=126 | 161..=255))
    {
        return Err(format!(
            "the character {c:?} is not allowed (printable Latin-1 only)"
        ));
    }
    if key.starts_with(' ') || key.ends_with(' ') || key.contains("  ") {
        return Err("no leading, trailing or consecutive spaces are allowed".into());
    }
    Ok(())
}

/// Float pixels in [0, 1] to u8 as diffusers' `numpy_to_pil` does:
/// `(images * 255).round().astype("uint8")` in float32, rounding half to even. Values are
/// clamped to [0, 1] first (the pipelines clamp before converting); NaN becomes 0.
pub fn to_rgb8(pixels: &[f32]) -> Vec<u8> {
    pixels
        .iter()
        .map(|&v| {
            let v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
            (v * 255.0).round_ties_even() as u8
        })
        .collect()
}

// ------------------------------------------------------------------------------------------------
// NumPy .npy
// ------------------------------------------------------------------------------------------------

const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// A NumPy `.npy` file (format 1.0) holding `data` as a little-endian float32 (`<f4`) array of
/// `shape` in C order, with the header padded to 64 bytes as `numpy.save` writes it.
///
/// # Panics
/// If the product of `shape` is not `data.len()` (a programming error).
pub fn write_npy_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let count: usize = shape.iter().product();
    assert_eq!(
        count,
        data.len(),
        "write_npy_f32: shape {shape:?} does not hold {} values",
        data.len()
    );
    let dims = match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // magic (6) + version (2) + header length (2) + header + '\n' is a multiple of 64.
    let unpadded = NPY_MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * data.len());
    out.extend_from_slice(NPY_MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Reads a NumPy `.npy` file (format 1.0, 2.0 or 3.0) holding a float32 or float64 array in C
/// order (`<f4`, `<f8`, and their big-endian forms; float64 is converted to float32). Returns
/// `(shape, values)`. `what` names the file in error messages.
pub fn read_npy_f32(bytes: &[u8], what: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let err = |msg: String| image_err(what, format!("not a usable .npy file: {msg}"));
    if bytes.len() < 10 || &bytes[..6] != NPY_MAGIC {
        return Err(err(
            "it does not start with the NumPy magic \\x93NUMPY".into()
        ));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(err("the header is cut short".into()));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        _ => {
            return Err(err(format!(
                "format version {major}.{minor} is not supported (expected 1.0, 2.0 or 3.0)"
            )))
        }
    };
    let data_start = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| {
            err(format!(
                "the header claims {header_len} bytes, but the file has {} after the preamble",
                bytes.len() - start
            ))
        })?;
    let header = std::str::from_utf8(&bytes[start..data_start])
        .map_err(|_| err("the header is not text".into()))?;
    let dict = NpyHeader::parse(header)
        .map_err(|m| err(format!("bad header {:?}: {m}", header.trim_end())))?;
    let (size, big_endian, is_f64) = match dict.descr.as_str() {
        "<f4" | "=f4" => (4, false, false),
        ">f4" => (4, true, false),
        "<f8" | "=f8" => (8, false, true),
        ">f8" => (8, true, true),
        d => {
            return Err(err(format!(
                "dtype '{d}' is not supported (expected float32 '<f4' or float64 '<f8')"
            )))
        }
    };
    if dict.fortran_order {
        return Err(err(
            "the array is in Fortran order (expected C order; save it with np.ascontiguousarray)"
                .into(),
        ));
    }
    let count = dict
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| err(format!("shape {:?} is too large", dict.shape)))?;
    let data = &bytes[data_start..];
    let need = count
        .checked_mul(size)
        .ok_or_else(|| err(format!("shape {:?} is too large", dict.shape)))?;
    if data.len() != need {
        return Err(err(format!(
            "shape {:?} of {} needs {need} bytes of data, but the file has {}",
            dict.shape,
            dict.descr,
            data.len()
        )));
    }
    let values = if is_f64 {
        data.chunks_exact(8)
            .map(|c| {
                let b: [u8; 8] = [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]];
                (if big_endian {
                    f64::from_be_bytes(b)
                } else {
                    f64::from_le_bytes(b)
                }) as f32
            })
            .collect()
    } else {
        data.chunks_exact(4)
            .map(|c| {
                let b: [u8; 4] = [c[0], c[1], c[2], c[3]];
                if big_endian {
                    f32::from_be_bytes(b)
                } else {
                    f32::from_le_bytes(b)
                }
            })
            .collect()
    };
    Ok((dict.shape, values))
}

/// The header of a .npy file: a Python dict literal such as
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4, 64, 64), }`.
struct NpyHeader {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

enum PyValue {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

impl NpyHeader {
    fn parse(s: &str) -> std::result::Result<NpyHeader, String> {
        let mut p = PyParser {
            s: s.as_bytes(),
            i: 0,
        };
        let (mut descr, mut fortran, mut shape) = (None, None, None);
        p.expect(b'{')?;
        loop {
            p.skip_ws();
            if p.eat(b'}') {
                break;
            }
            let key = p.string()?;
            p.expect(b':')?;
            let value = p.value()?;
            match (key.as_str(), value) {
                ("descr", PyValue::Str(v)) => descr = Some(v),
                ("fortran_order", PyValue::Bool(v)) => fortran = Some(v),
                ("shape", PyValue::Tuple(v)) => shape = Some(v),
                ("descr" | "fortran_order" | "shape", _) => {
                    return Err(format!("`{key}` has the wrong type"))
                }
                _ => {} // unknown keys are ignored
            }
            p.skip_ws();
            if !p.eat(b',') {
                p.expect(b'}')?;
                break;
            }
        }
        Ok(NpyHeader {
            descr: descr.ok_or("no `descr`")?,
            fortran_order: fortran.ok_or("no `fortran_order`")?,
            shape: shape.ok_or("no `shape`")?,
        })
    }
}

struct PyParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl PyParser<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        self.skip_ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected '{}' at character {}", c as char, self.i))
        }
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        self.skip_ws();
        let q = match self.s.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("expected a quoted string at character {}", self.i)),
        };
        let start = self.i + 1;
        let len = self.s[start..]
            .iter()
            .position(|&c| c == q)
            .ok_or("unterminated string")?;
        self.i = start + len + 1;
        Ok(String::from_utf8_lossy(&self.s[start..start + len]).into_owned())
    }
    fn word(&mut self) -> &[u8] {
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i].is_ascii_alphanumeric() {
            self.i += 1;
        }
        &self.s[start..self.i]
    }
    fn value(&mut self) -> std::result::Result<PyValue, String> {
        self.skip_ws();
        match self.s.get(self.i) {
            Some(b'\'' | b'"') => Ok(PyValue::Str(self.string()?)),
            Some(b'(') => {
                self.i += 1;
                let mut dims = Vec::new();
                loop {
                    self.skip_ws();
                    if self.eat(b')') {
                        break;
                    }
                    let w = self.word();
                    let d = std::str::from_utf8(w)
                        .ok()
                        .and_then(|t| t.trim_end_matches('L').parse::<usize>().ok())
                        .ok_or_else(|| format!("bad dimension {:?}", String::from_utf8_lossy(w)))?;
                    dims.push(d);
                    if !self.eat(b',') {
                        self.expect(b')')?;
                        break;
                    }
                }
                Ok(PyValue::Tuple(dims))
            }
            _ => match self.word() {
                b"True" => Ok(PyValue::Bool(true)),
                b"False" => Ok(PyValue::Bool(false)),
                w => Err(format!("unexpected value {:?}", String::from_utf8_lossy(w))),
            },
        }
    }
}
