//! Measures taken on the images of the shipped "shapes" models (see `training/shapes.py`, whose
//! palette and shapes are repeated here): where the background and the shape are, which colour
//! each is, which shape was drawn, and PSNR against bicubic upscaling.
//!
//! Shared by `ldm-core/tests/shipped_model.rs` and `ldm-cli/tests/shipped_model.rs` (included with
//! `#[path]`); plain std, no test-only code in the libraries.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::path::PathBuf;

/// The data set's colours, as `training/shapes.py` draws them.
pub const PALETTE: [(&str, [u8; 3]); 8] = [
    ("red", [230, 30, 30]),
    ("orange", [255, 140, 0]),
    ("yellow", [250, 230, 40]),
    ("green", [30, 170, 50]),
    ("blue", [30, 80, 230]),
    ("purple", [140, 40, 190]),
    ("white", [245, 245, 245]),
    ("black", [20, 20, 20]),
];
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];

/// A pixel belongs to the shape when it is farther than this from the background colour (0-255
/// RGB distance; the closest two palette colours are about 99 apart).
const FOREGROUND_DISTANCE: f32 = 50.0;
/// Fewer pixels than this is no shape at all (the data set's smallest is about 200).
const MIN_AREA: usize = 24;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

pub fn colour_index(name: &str) -> usize {
    PALETTE.iter().position(|(n, _)| *n == name).unwrap_or_else(|| panic!("no colour {name}"))
}

/// What a prompt asks for; `background: None` when the prompt does not name one.
#[derive(Clone, Debug)]
pub struct Expect {
    pub colour: usize,
    pub shape: &'static str,
    pub background: Option<usize>,
}

impl Expect {
    pub fn prompt(&self) -> String {
        match self.background {
            Some(b) => format!("a {} {}, {} background", PALETTE[self.colour].0, self.shape, PALETTE[b].0),
            None => format!("a {} {}", PALETTE[self.colour].0, self.shape),
        }
    }
}

/// The grid of the tests: every colour with every shape; the background named in the prompt
/// cycles through the other colours as `variant` changes.
pub fn grid(variant: usize) -> Vec<Expect> {
    let mut out = Vec::new();
    for c in 0..PALETTE.len() {
        for (s, shape) in SHAPES.iter().enumerate() {
            let k = (s + 3 * variant) % (PALETTE.len() - 1);
            out.push(Expect { colour: c, shape, background: Some((c + 1 + k) % PALETTE.len()) });
        }
    }
    out
}

fn dist(a: [f32; 3], b: [u8; 3]) -> f32 {
    let d: f32 = (0..3).map(|i| (a[i] - b[i] as f32).powi(2)).sum();
    d.sqrt()
}

/// The palette colour nearest to `c`.
pub fn nearest(c: [f32; 3]) -> usize {
    let mut best = (f32::INFINITY, 0);
    for (i, (_, p)) in PALETTE.iter().enumerate() {
        let d = dist(c, *p);
        if d < best.0 {
            best = (d, i);
        }
    }
    best.1
}

fn median(values: &mut [u8]) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_unstable();
    values[values.len() / 2] as f32
}

fn median_colour(px: &[u8], idx: impl Iterator<Item = usize>) -> [f32; 3] {
    let mut ch: [Vec<u8>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for i in idx {
        for c in 0..3 {
            ch[c].push(px[3 * i + c]);
        }
    }
    [median(&mut ch[0]), median(&mut ch[1]), median(&mut ch[2])]
}

fn pixel(px: &[u8], i: usize) -> [f32; 3] {
    [px[3 * i] as f32, px[3 * i + 1] as f32, px[3 * i + 2] as f32]
}

/// What one image shows.
#[derive(Clone, Debug)]
pub struct Analysis {
    pub w: usize,
    pub h: usize,
    /// Palette index nearest to the median colour of the 2-pixel border.
    pub background: usize,
    /// The shape: the largest 4-connected region of pixels unlike the background.
    pub region: Vec<bool>,
    pub area: usize,
    /// Palette index nearest to the region's median colour (None: no region).
    pub foreground: Option<usize>,
    /// The shape whose ideal outline in the region's bounding box overlaps the region best, and
    /// the overlap (intersection over union) of each of SHAPES.
    pub shape: Option<&'static str>,
    pub iou: [f32; 3],
    /// Per pixel: the nearest palette colour.
    pub nearest: Vec<usize>,
}

pub fn analyse(px: &[u8], w: usize, h: usize) -> Analysis {
    assert_eq!(px.len(), w * h * 3);
    let n = w * h;
    let border = (0..n).filter(|i| {
        let (x, y) = (i % w, i / w);
        x < 2 || y < 2 || x + 2 >= w || y + 2 >= h
    });
    let bg = median_colour(px, border);
    let unlike: Vec<bool> = (0..n).map(|i| dist(pixel(px, i), bg.map(|v| v as u8)) > FOREGROUND_DISTANCE).collect();
    // largest 4-connected component of `unlike`
    let mut label = vec![usize::MAX; n];
    let mut best: Vec<usize> = Vec::new();
    for start in 0..n {
        if !unlike[start] || label[start] != usize::MAX {
            continue;
        }
        let mut comp = vec![start];
        label[start] = start;
        let mut queue = VecDeque::from([start]);
        while let Some(i) = queue.pop_front() {
            let (x, y) = (i % w, i / w);
            let mut push = |j: usize| {
                if unlike[j] && label[j] == usize::MAX {
                    label[j] = start;
                    comp.push(j);
                    queue.push_back(j);
                }
            };
            if x > 0 {
                push(i - 1);
            }
            if x + 1 < w {
                push(i + 1);
            }
            if y > 0 {
                push(i - w);
            }
            if y + 1 < h {
                push(i + w);
            }
        }
        if comp.len() > best.len() {
            best = comp;
        }
    }
    let mut region = vec![false; n];
    for &i in &best {
        region[i] = true;
    }
    let area = best.len();
    let nearest_px: Vec<usize> = (0..n).map(|i| nearest(pixel(px, i))).collect();
    let (foreground, shape, iou) = if area >= MIN_AREA {
        let fg = nearest(median_colour(px, best.iter().copied()));
        let iou = shape_iou(&best, w);
        let k = (0..3).fold(0, |k, j| if iou[j] > iou[k] { j } else { k });
        (Some(fg), Some(SHAPES[k]), iou)
    } else {
        (None, None, [0.0; 3])
    };
    Analysis { w, h, background: nearest(bg), region, area, foreground, shape, iou, nearest: nearest_px }
}

/// Intersection over union of the region with the ideal circle, square and triangle (pointing up,
/// as the data set draws it) that fill the region's bounding box.
fn shape_iou(pixels: &[usize], w: usize) -> [f32; 3] {
    let xs = pixels.iter().map(|i| i % w);
    let ys = pixels.iter().map(|i| i / w);
    let (x0, x1) = (xs.clone().min().unwrap_or(0), xs.max().unwrap_or(0) + 1);
    let (y0, y1) = (ys.clone().min().unwrap_or(0), ys.max().unwrap_or(0) + 1);
    let (cx, cy) = ((x0 + x1) as f32 / 2.0, (y0 + y1) as f32 / 2.0);
    let (rx, ry) = ((x1 - x0) as f32 / 2.0, (y1 - y0) as f32 / 2.0);
    let inside = |k: usize, x: usize, y: usize| -> bool {
        let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
        match k {
            0 => ((px - cx) / rx).powi(2) + ((py - cy) / ry).powi(2) <= 1.0,
            1 => true,
            _ => (px - cx).abs() <= rx * (py - y0 as f32) / (2.0 * ry),
        }
    };
    let mut member = std::collections::HashSet::with_capacity(pixels.len());
    member.extend(pixels.iter().copied());
    let mut out = [0.0; 3];
    for (k, o) in out.iter_mut().enumerate() {
        let (mut inter, mut uni) = (0usize, 0usize);
        for y in y0..y1 {
            for x in x0..x1 {
                let m = member.contains(&(y * w + x));
                let t = inside(k, x, y);
                inter += (m && t) as usize;
                uni += (m || t) as usize;
            }
        }
        *o = inter as f32 / uni.max(1) as f32;
    }
    out
}

/// How well one image follows its prompt.
#[derive(Clone, Debug)]
pub struct Score {
    /// The named colour dominates the shape's region (its median colour is nearest to it, and so
    /// are at least half its pixels) and the background colour the rest (likewise).
    pub colour_ok: bool,
    /// The geometric classifier names the prompt's shape.
    pub shape_ok: bool,
    /// Fraction of the region's pixels nearest the named colour, of the other pixels nearest the
    /// named background (or the detected one when the prompt names none), and the overlap of the
    /// region with the named shape: a continuous prompt-following score in [0, 1].
    pub follow: f32,
}

pub fn score(a: &Analysis, e: &Expect) -> Score {
    let bg_named = e.background.unwrap_or(a.background);
    let (mut fg_hits, mut bg_hits, mut rest) = (0usize, 0usize, 0usize);
    for (i, &r) in a.region.iter().enumerate() {
        if r {
            fg_hits += (a.nearest[i] == e.colour) as usize;
        } else {
            rest += 1;
            bg_hits += (a.nearest[i] == bg_named) as usize;
        }
    }
    let fg_frac = fg_hits as f32 / a.area.max(1) as f32;
    let bg_frac = bg_hits as f32 / rest.max(1) as f32;
    let fg_ok = a.foreground == Some(e.colour) && fg_frac >= 0.5;
    let bg_ok = a.background == bg_named && bg_frac >= 0.5 && bg_named != e.colour;
    let k = SHAPES.iter().position(|s| *s == e.shape).unwrap_or(0);
    let iou = if a.foreground.is_some() { a.iou[k] } else { 0.0 };
    Score { colour_ok: fg_ok && bg_ok, shape_ok: a.shape == Some(e.shape), follow: (fg_frac + bg_frac + iou) / 3.0 }
}

/// Totals over many images.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub n: usize,
    pub colour_ok: usize,
    pub shape_ok: usize,
    pub follow: f32,
    pub failures: Vec<String>,
}

impl Tally {
    pub fn add(&mut self, e: &Expect, a: &Analysis, s: &Score, label: &str) {
        self.n += 1;
        self.colour_ok += s.colour_ok as usize;
        self.shape_ok += s.shape_ok as usize;
        self.follow += s.follow;
        if !(s.colour_ok && s.shape_ok) {
            self.failures.push(format!(
                "{label} {:?}: saw {} {} on {} (area {}, iou c/s/t {:.2}/{:.2}/{:.2})",
                e.prompt(),
                a.foreground.map_or("no", |f| PALETTE[f].0),
                a.shape.unwrap_or("shape"),
                PALETTE[a.background].0,
                a.area,
                a.iou[0],
                a.iou[1],
                a.iou[2]
            ));
        }
    }
    pub fn colour_rate(&self) -> f32 {
        self.colour_ok as f32 / self.n.max(1) as f32
    }
    pub fn shape_rate(&self) -> f32 {
        self.shape_ok as f32 / self.n.max(1) as f32
    }
    pub fn follow_mean(&self) -> f32 {
        self.follow / self.n.max(1) as f32
    }
    pub fn summary(&self) -> String {
        format!(
            "{} images: colour {:.1}%, shape {:.1}%, prompt-following {:.3}",
            self.n,
            100.0 * self.colour_rate(),
            100.0 * self.shape_rate(),
            self.follow_mean()
        )
    }
}

/// 8-bit RGB, `w * h * 3` bytes, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Rgb {
    pub px: Vec<u8>,
    pub w: usize,
    pub h: usize,
}

/// The super-resolution input: the mean of each f x f block, rounded half up (as the training
/// script's `box_down`).
pub fn box_down(img: &Rgb, f: usize) -> Rgb {
    let (w, h) = (img.w / f, img.h / f);
    let mut px = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let mut sum = 0u32;
                for dy in 0..f {
                    for dx in 0..f {
                        sum += img.px[((y * f + dy) * img.w + x * f + dx) * 3 + c] as u32;
                    }
                }
                let n = (f * f) as u32;
                px[(y * w + x) * 3 + c] = ((sum + n / 2) / n) as u8;
            }
        }
    }
    Rgb { px, w, h }
}

/// Bicubic (Catmull-Rom, a = -0.5, as Pillow's BICUBIC when enlarging) upscaling by `f`, pixel
/// centres aligned, edges clamped.
pub fn bicubic_up(img: &Rgb, f: usize) -> Rgb {
    fn kernel(x: f32) -> f32 {
        let a = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * a
        } else {
            0.0
        }
    }
    // weights and source indices for one axis
    fn taps(n_out: usize, n_in: usize, f: usize) -> Vec<[(usize, f32); 4]> {
        (0..n_out)
            .map(|o| {
                let s = (o as f32 + 0.5) / f as f32 - 0.5;
                let base = s.floor();
                let mut t = [(0usize, 0f32); 4];
                for (k, tk) in t.iter_mut().enumerate() {
                    let p = base + k as f32 - 1.0;
                    *tk = ((p.max(0.0) as usize).min(n_in - 1), kernel(s - p));
                }
                t
            })
            .collect()
    }
    let (w, h) = (img.w * f, img.h * f);
    let (tx, ty) = (taps(w, img.w, f), taps(h, img.h, f));
    let mut px = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let mut v = 0f32;
                for &(sy, wy) in &ty[y] {
                    for &(sx, wx) in &tx[x] {
                        v += wy * wx * img.px[(sy * img.w + sx) * 3 + c] as f32;
                    }
                }
                px[(y * w + x) * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    Rgb { px, w, h }
}

/// PSNR in dB of `a` against `b` (8-bit).
pub fn psnr(a: &Rgb, b: &Rgb) -> f64 {
    assert_eq!((a.w, a.h), (b.w, b.h));
    let mse: f64 = a.px.iter().zip(&b.px).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>() / a.px.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
}

/// Four images of one size side by side, 2 x 2.
pub fn mosaic(tiles: &[Rgb]) -> Rgb {
    assert_eq!(tiles.len(), 4);
    let (tw, th) = (tiles[0].w, tiles[0].h);
    let (w, h) = (2 * tw, 2 * th);
    let mut px = vec![0u8; w * h * 3];
    for (k, t) in tiles.iter().enumerate() {
        let (ox, oy) = ((k % 2) * tw, (k / 2) * th);
        for y in 0..th {
            let src = &t.px[y * tw * 3..(y + 1) * tw * 3];
            let dst = ((oy + y) * w + ox) * 3;
            px[dst..dst + tw * 3].copy_from_slice(src);
        }
    }
    Rgb { px, w, h }
}

/// A PNG (or JPEG, WebP) file as 8-bit RGB.
pub fn load_sample(path: &std::path::Path) -> Rgb {
    let bytes = std::fs::read(path).unwrap();
    let (px, w, h) = ldm_core::image::decode_image(&bytes, &path.display().to_string()).unwrap();
    Rgb { px, w: w as usize, h: h as usize }
}

/// The data-set images committed for the super-resolution test (`training/samples`).
pub fn sample_paths() -> Vec<PathBuf> {
    let dir = repo().join("training/samples");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    v.sort();
    v
}
