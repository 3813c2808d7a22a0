//! ldm_core::image against Pillow / NumPy outputs recorded by
//! tests/reference/make_rng_image_refs.py (tests/fixtures/images/index.json).

use std::path::PathBuf;

use ldm_core::image::{
    decode_image, encode_png, read_npy_f32, resize_lanczos, to_rgb8, write_npy_f32,
};
use ldm_core::rng::TorchGenerator;
use ldm_core::Error;
use serde_json::Value;

fn images_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images")
}

fn index() -> Value {
    serde_json::from_slice(&std::fs::read(images_dir().join("index.json")).expect("index.json"))
        .expect("index.json")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(images_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn load(name: &str) -> (Vec<u8>, u32, u32) {
    decode_image(&read(name), name).unwrap_or_else(|e| panic!("{e}"))
}

/// (max abs difference, number of differing pixels)
fn diff(a: &[u8], b: &[u8]) -> (u8, usize) {
    assert_eq!(a.len(), b.len());
    let mut max = 0;
    let mut pixels = 0;
    for (pa, pb) in a.chunks_exact(3).zip(b.chunks_exact(3)) {
        let d = pa
            .iter()
            .zip(pb)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(0);
        max = max.max(d);
        pixels += (d > 0) as usize;
    }
    (max, pixels)
}

// ---------------------------------------------------------------------------------------------
// Lanczos
// ---------------------------------------------------------------------------------------------

#[test]
fn lanczos_matches_pillow() {
    let idx = index();
    let cases = idx["lanczos"].as_array().expect("lanczos cases");
    assert!(cases.len() >= 4);
    let mut total_differ = 0;
    for c in cases {
        let src = c["source"].as_str().expect("source");
        let (nw, nh) = (
            c["width"].as_u64().expect("w") as u32,
            c["height"].as_u64().expect("h") as u32,
        );
        let (rgb, w, h) = load(src);
        let (want, ew, eh) = load(c["expected"].as_str().expect("expected"));
        assert_eq!((ew, eh), (nw, nh));
        let got = resize_lanczos(&rgb, w, h, nw, nh);
        let (max, differ) = diff(&got, &want);
        eprintln!(
            "lanczos {src} {w}x{h} -> {nw}x{nh}: max diff {max}, {differ} of {} pixels differ",
            nw * nh
        );
        assert!(max <= 1, "{src} -> {nw}x{nh}: max diff {max}");
        total_differ += differ;
    }
    eprintln!("lanczos: {total_differ} pixels differ from Pillow in all");
}

#[test]
fn lanczos_edge_sizes() {
    let (rgb, w, h) = load("src_37x50.png");
    assert!(resize_lanczos(&rgb, w, h, 0, 10).is_empty());
    assert_eq!(resize_lanczos(&rgb, w, h, w, h), rgb);
    // A constant image stays constant (the weights are normalised to sum 1).
    let flat = vec![77u8; 3 * 40 * 30];
    for (nw, nh) in [(1, 1), (13, 7), (32, 32), (40, 30), (97, 61)] {
        assert!(
            resize_lanczos(&flat, 40, 30, nw, nh)
                .iter()
                .all(|&v| v == 77),
            "{nw}x{nh}"
        );
    }
    // Upscaling a single pixel.
    assert_eq!(resize_lanczos(&[1, 2, 3], 1, 1, 2, 3), [1, 2, 3].repeat(6));
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

#[test]
fn decode_matches_pillow_convert_rgb() {
    let idx = index();
    let cases = idx["decode"].as_array().expect("decode cases");
    for c in cases {
        let file = c["file"].as_str().expect("file");
        let exact = c["exact"].as_bool().expect("exact");
        let (got, w, h) = load(file);
        let (want, ew, eh) = load(c["expected"].as_str().expect("expected"));
        assert_eq!((w, h), (ew, eh), "{file}: size");
        let (max, differ) = diff(&got, &want);
        let mean = got
            .iter()
            .zip(&want)
            .map(|(a, b)| a.abs_diff(*b) as f64)
            .sum::<f64>()
            / got.len() as f64;
        eprintln!(
            "decode {file} (Pillow mode {}): max diff {max}, mean {mean:.3}, {differ} of {} pixels differ",
            c["pillow_mode"],
            w * h
        );
        if exact {
            assert_eq!(max, 0, "{file}: {differ} pixels differ from Pillow");
        } else {
            // JPEG / lossy WebP decoders are not libjpeg-turbo / libwebp: IDCT and chroma
            // upsampling differ slightly.
            // Measured with Pillow 13 / libjpeg-turbo 3: max 3, mean 0.35 (4:2:0 JPEG).
            assert!(
                max <= 6 && mean <= 1.0,
                "{file}: max diff {max}, mean {mean}"
            );
        }
    }
}

fn expect_image_error(bytes: &[u8], what: &str, needle: &str) -> String {
    match decode_image(bytes, what) {
        Ok((_, w, h)) => panic!("{what}: decoded a {w}x{h} image, expected an error"),
        Err(e @ Error::Image { .. }) => {
            let msg = e.to_string();
            assert!(msg.starts_with(what), "{msg:?} does not name {what:?}");
            assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
            msg
        }
        Err(e) => panic!("{what}: wrong error variant: {e:?}"),
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut c = kind.to_vec();
    c.extend_from_slice(data);
    out.extend_from_slice(&crc32(&c).to_be_bytes());
    out
}

fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(png_chunk(b"IHDR", &ihdr));
    // A token IDAT (an empty zlib stream) and IEND, so that only the size is wrong.
    out.extend(png_chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    out.extend(png_chunk(b"IEND", &[]));
    out
}

#[test]
fn decode_errors() {
    expect_image_error(b"", "empty.png", "empty");
    let mut state = 0x1234_5678u32;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        })
        .collect();
    expect_image_error(&random, "random.bin", "not a PNG, JPEG or WebP image");
    expect_image_error(
        b"GIF89a\x01\x00\x01\x00\x00\x00\x00",
        "x.gif",
        "not supported",
    );

    let msg = expect_image_error(
        &png_header_only(100_000, 100_000),
        "huge.png",
        "100000x100000",
    );
    assert!(msg.contains("larger than supported"), "{msg}");
    expect_image_error(&png_header_only(20_000, 1), "wide.png", "20000x1");
    expect_image_error(&png_header_only(16_384, 16_385), "tall.png", "16384x16385");
    // A JPEG whose frame header claims 60000x60000 (the data behind it is the real 37x50 image).
    let mut jpeg = read("rgb_q90.jpg");
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).expect("SOF0");
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
    expect_image_error(&jpeg, "huge.jpg", "60000x60000");
    // Zero size is refused by the PNG decoder itself; either way it is an error.
    assert!(decode_image(&png_header_only(0, 10), "zero.png").is_err());

    for name in [
        "src_37x50.png",
        "rgb16.png",
        "rgb_q90.jpg",
        "rgb_444_progressive.jpg",
        "lossless.webp",
        "lossy.webp",
    ] {
        let bytes = read(name);
        for cut in [
            bytes.len() / 3,
            bytes.len() / 2,
            bytes.len() * 9 / 10,
            bytes.len() - 30,
        ] {
            let msg = decode_image(&bytes[..cut], name)
                .err()
                .unwrap_or_else(|| panic!("{name} cut at {cut} decoded"));
            assert!(msg.to_string().starts_with(name), "{msg}");
            eprintln!("{name} cut to {cut} of {} bytes: {msg}", bytes.len());
        }
    }
}

/// Random corruption must give errors or images, never a panic or a runaway allocation.
#[test]
fn decode_never_panics_on_corrupt_files() {
    let mut state = 0x9e37_79b9u32;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    let mut outcomes = [0usize; 2];
    for name in [
        "src_37x50.png",
        "palette.png",
        "gray16.png",
        "rgb_q90.jpg",
        "gray.jpg",
        "lossless.webp",
        "lossy.webp",
    ] {
        let good = read(name);
        for _ in 0..60 {
            let mut bad = good.clone();
            for _ in 0..1 + next() % 8 {
                let i = next() as usize % bad.len();
                bad[i] = next() as u8;
            }
            if next() % 4 == 0 {
                bad.truncate(next() as usize % bad.len());
            }
            outcomes[decode_image(&bad, name).is_ok() as usize] += 1;
        }
    }
    eprintln!(
        "corrupted files: {} errors, {} decoded",
        outcomes[0], outcomes[1]
    );
}

// ---------------------------------------------------------------------------------------------
// PNG output
// ---------------------------------------------------------------------------------------------

#[test]
fn png_round_trip_with_text() {
    let (rgb, w, h) = load("src_100x75.png");
    let text = vec![
        (
            "prompt".to_string(),
            "a painting of a squirrel eating a burger, café".to_string(),
        ),
        ("seed".to_string(), "42".to_string()),
        ("steps".to_string(), "50".to_string()),
        ("scheduler".to_string(), "DDIMScheduler".to_string()),
        ("guidance".to_string(), "6".to_string()),
        (
            "model".to_string(),
            "CompVis/ldm-text2im-large-256".to_string(),
        ),
        (
            "note".to_string(),
            "Unicode → 漢字 needs iTXt\nsecond line".to_string(),
        ),
    ];
    let bytes = encode_png(&rgb, w, h, &text).expect("encode");
    let (back, bw, bh) = decode_image(&bytes, "round trip").expect("decode");
    assert_eq!((bw, bh), (w, h));
    assert_eq!(back, rgb);

    let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
    let reader = decoder.read_info().expect("png header");
    let info = reader.info();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let mut found: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    assert_eq!(found.len(), 6, "tEXt chunks: {found:?}");
    for t in &info.utf8_text {
        found.push((t.keyword.clone(), t.get_text().expect("iTXt text")));
    }
    assert_eq!(
        info.utf8_text.len(),
        1,
        "the non-Latin-1 value goes to iTXt"
    );
    found.sort();
    let mut want = text.clone();
    want.sort();
    assert_eq!(found, want);
}

#[test]
fn png_encode_errors() {
    let px = vec![0u8; 12];
    assert!(encode_png(&px, 2, 2, &[]).is_ok());
    assert!(matches!(
        encode_png(&px, 3, 2, &[]),
        Err(Error::Image { .. })
    ));
    assert!(matches!(
        encode_png(&[], 0, 0, &[]),
        Err(Error::Image { .. })
    ));
    for bad in [
        "",
        " lead",
        "trail ",
        "two  spaces",
        "tab\there",
        "é漢",
        &"k".repeat(80),
    ] {
        let r = encode_png(&px, 2, 2, &[(bad.to_string(), "v".to_string())]);
        assert!(
            matches!(r, Err(Error::Image { .. })),
            "keyword {bad:?} accepted"
        );
    }
    let r = encode_png(&px, 2, 2, &[("k".to_string(), "nul\0".to_string())]);
    assert!(matches!(r, Err(Error::Image { .. })));
}

#[test]
fn to_rgb8_matches_numpy_to_pil() {
    let idx = index();
    let rec = &idx["numpy_to_pil"];
    let inputs: Vec<f32> = rec["inputs_f32_bits"]
        .as_array()
        .expect("inputs")
        .iter()
        .map(|b| f32::from_bits(b.as_u64().expect("bits") as u32))
        .collect();
    let want: Vec<u8> = rec["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .map(|v| v.as_u64().expect("u8") as u8)
        .collect();
    assert!(inputs.len() > 1000);
    assert_eq!(to_rgb8(&inputs), want);
    assert_eq!(
        to_rgb8(&[-0.5, 1.5, f32::NAN, f32::INFINITY, f32::NEG_INFINITY]),
        [0, 255, 0, 255, 0]
    );
}

// ---------------------------------------------------------------------------------------------
// .npy
// ---------------------------------------------------------------------------------------------

fn reference(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/reference")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn npy_files_written_by_numpy() {
    let want = TorchGenerator::new(0).randn(256);
    let f4 = reference("rng_latents_f4.npy");
    let (shape, data) = read_npy_f32(&f4, "rng_latents_f4.npy").expect("f4");
    assert_eq!(shape, [1, 4, 8, 8]);
    assert_eq!(data, want);
    // Byte for byte what numpy.save writes.
    assert_eq!(write_npy_f32(&[1, 4, 8, 8], &want), f4);

    let (shape, data) =
        read_npy_f32(&reference("rng_latents_f8.npy"), "rng_latents_f8.npy").expect("f8");
    assert_eq!(shape, [1, 4, 8, 8]);
    assert_eq!(data, want);
}

#[test]
fn npy_round_trip() {
    for shape in [
        vec![],
        vec![5],
        vec![2, 3],
        vec![1, 4, 64, 64],
        vec![3, 0, 2],
    ] {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 7.0).collect();
        let bytes = write_npy_f32(&shape, &data);
        assert_eq!((bytes.len() - 4 * n) % 64, 0, "header padding");
        let (s, d) = read_npy_f32(&bytes, "x.npy").expect("round trip");
        assert_eq!(s, shape);
        assert_eq!(d, data);
    }
}

fn npy_with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn npy_errors() {
    let ok = write_npy_f32(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let err = |bytes: &[u8], needle: &str| {
        let e = read_npy_f32(bytes, "latents.npy").expect_err("must fail");
        assert!(matches!(e, Error::Image { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.starts_with("latents.npy"), "{msg}");
        assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
    };
    err(b"", "magic");
    err(b"PK\x03\x04 not numpy", "magic");
    err(&ok[..ok.len() - 1], "needs 16 bytes");
    err(&ok[..40], "header claims");
    let mut v9 = ok.clone();
    v9[6] = 9;
    err(&v9, "version 9.0");
    err(
        &npy_with_header(
            "{'descr': '<i4', 'fortran_order': False, 'shape': (1,), }\n",
            &[0; 4],
        ),
        "'<i4'",
    );
    err(
        &npy_with_header(
            "{'descr': '<f4', 'fortran_order': True, 'shape': (1, 1), }\n",
            &[0; 4],
        ),
        "Fortran",
    );
    err(
        &npy_with_header("{'descr': '<f4', 'shape': (1,), }\n", &[0; 4]),
        "fortran_order",
    );
    err(&npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999, 99999999999), }", &[]), "too large");
    err(
        &npy_with_header(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }",
            &[],
        ),
        "bad dimension",
    );
    err(&npy_with_header("not a dict", &[]), "bad header");
    // Big-endian and float64 are converted.
    let be = npy_with_header(
        "{'descr': '>f8', 'fortran_order': False, 'shape': (2,), }",
        &[&1.5f64.to_be_bytes()[..], &(-2.0f64).to_be_bytes()].concat(),
    );
    assert_eq!(read_npy_f32(&be, "be.npy").expect("be").1, [1.5, -2.0]);
    // Arbitrary bytes never panic.
    let mut state = 7u32;
    for len in 0..300 {
        let mut b = ok.clone();
        b.truncate(len % (ok.len() + 1));
        for x in b.iter_mut().skip(8) {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            if state % 11 < 1 {
                *x = (state >> 16) as u8;
            }
        }
        let _ = read_npy_f32(&b, "fuzz.npy");
    }
}
