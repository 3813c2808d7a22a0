//! The WGSL compute kernels. Each kernel reads its sizes from a small `array<u32>` of parameters
//! at binding 0 (floats are passed as their bits), so one compiled pipeline serves every shape;
//! tensors are bound whole, one buffer each (the host splits work that would exceed one binding).
//!
//! Weights may be stored as f16, two to a `u32`, and are unpacked with `unpack2x16float`, which
//! WebGPU has without the `shader-f16` feature. Kernels that read weights come in two variants.

/// A kernel and its variant: the key of the pipeline cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    /// affine, clamp, silu, gelu, copy; the input f32 or (`true`) f16.
    Unary(bool),
    Binary,
    StridedCopy,
    PadUpsample,
    /// Rows of a table, f32 or (`true`) f16.
    Embedding(bool),
    VqNearest,
    Softmax,
    LayerNorm,
    GroupNormStats,
    GroupNormApply,
    /// Batched strided matmul; B f32 or (`.0`) f16; tiled in workgroup memory (`.1`) or not.
    Matmul(bool, bool),
    /// Convolution as an implicit GEMM; the weight f32 or (`.0`) f16; tiled (`.1`) or not.
    Conv2d(bool, bool),
}

/// Operation codes of [`Kernel::Unary`].
pub(crate) mod unary_op {
    pub const AFFINE: u32 = 0;
    pub const CLAMP: u32 = 1;
    pub const SILU: u32 = 2;
    pub const GELU: u32 = 3;
    pub const COPY: u32 = 4;
}

/// Threads per workgroup of the one-thread-per-element kernels.
pub(crate) const WG: u32 = 256;
/// Output tile of the matmul and convolution kernels (TILE x TILE per workgroup).
pub(crate) const TILE: u32 = 64;

const PRELUDE: &str = r#"
@group(0) @binding(0) var<storage, read> p: array<u32>;
fn pf(i: u32) -> f32 { return bitcast<f32>(p[i]); }
"#;

/// Reads element `i` of a tensor bound as `NAME` (f32) or as packed f16 pairs.
fn loader(fn_name: &str, var: &str, f16: bool) -> String {
    if f16 {
        format!(
            "fn {fn_name}(i: u32) -> f32 {{ let v = unpack2x16float({var}[i >> 1u]); return select(v.x, v.y, (i & 1u) == 1u); }}\n"
        )
    } else {
        format!("fn {fn_name}(i: u32) -> f32 {{ return {var}[i]; }}\n")
    }
}

fn elem_ty(f16: bool) -> &'static str {
    if f16 {
        "u32"
    } else {
        "f32"
    }
}

/// The index of this invocation in a 1-D launch of `WG`-thread workgroups spread over a 2-D grid
/// (a grid dimension holds at most 65535 workgroups).
const LINEAR_ID: &str = r#"
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + li;
"#;

/// erf to full single precision (max error below 1 ulp, given an exact `exp`): N. Juffa's
/// minimax approximation, the one CUDA-class libraries use. The tanh form of GELU would be off
/// by up to 1e-3; this keeps `gelu` at float rounding.
const ERF: &str = r#"
fn erf_f(a: f32) -> f32 {
    let t = abs(a);
    let s = a * a;
    var r: f32;
    if (t > 0.927734375) {
        r = fma(-1.72853470e-5, t, 3.83197126e-4);
        let u = fma(-3.88396438e-3, t, 2.42546219e-2);
        r = fma(r, s, u);
        r = fma(r, t, -1.06777877e-1);
        r = fma(r, t, -6.34846687e-1);
        r = fma(r, t, -1.28717512e-1);
        r = fma(r, t, -t);
        r = 1.0 - exp(r);
        if (a < 0.0) { r = -r; }
    } else {
        r = -5.96761703e-4;
        r = fma(r, s, 4.99119423e-3);
        r = fma(r, s, -2.67681349e-2);
        r = fma(r, s, 1.12819925e-1);
        r = fma(r, s, -3.76125336e-1);
        r = fma(r, s, 1.28379166e-1);
        r = fma(r, a, a);
    }
    return r;
}
"#;

/// Decomposes the flat index `i` over up to 6 dimensions at `p[dims..dims+6]` and returns the
/// offsets through two stride sets at `p[s1..]` and `p[s2..]`.
const DECOMPOSE: &str = r#"
fn decompose(i: u32, dims: u32, s1: u32, s2: u32) -> vec2<u32> {
    var rem = i;
    var o1 = 0u;
    var o2 = 0u;
    for (var k = 0u; k < 6u; k = k + 1u) {
        let d = 5u - k;
        let n = p[dims + d];
        // Dimensions of extent 1 (the padding to six, most broadcasts) cost no division.
        if (n > 1u) {
            let c = rem % n;
            rem = rem / n;
            o1 = o1 + c * p[s1 + d];
            o2 = o2 + c * p[s2 + d];
        }
    }
    return vec2<u32>(o1, o2);
}
"#;

pub(crate) fn source(k: Kernel) -> String {
    let mut s = String::from(PRELUDE);
    match k {
        Kernel::Unary(f16) => {
            s += &format!(
                "@group(0) @binding(1) var<storage, read> x: array<{}>;\n\
                 @group(0) @binding(2) var<storage, read_write> y: array<f32>;\n",
                elem_ty(f16)
            );
            s += &loader("load_x", "x", f16);
            s += ERF;
            s += LINEAR_ID;
            s += r#"
    if (i >= p[0]) { return; }
    let a = pf(2u);
    let b = pf(3u);
    let v = load_x(i);
    var r = v;
    switch p[1] {
        case 0u: { r = v * a + b; }
        case 1u: { r = min(max(v, a), b); }
        case 2u: { r = v / (1.0 + exp(-v)); }
        case 3u: { r = 0.5 * v * (1.0 + erf_f(v * 0.70710678118654752)); }
        default: { r = v; }
    }
    y[i] = r;
}
"#;
        }
        Kernel::Binary => {
            // p: n, op, same, dims[6] @3, a strides[6] @9, b strides[6] @15
            s += "@group(0) @binding(1) var<storage, read> a: array<f32>;\n\
                  @group(0) @binding(2) var<storage, read> b: array<f32>;\n\
                  @group(0) @binding(3) var<storage, read_write> y: array<f32>;\n";
            s += DECOMPOSE;
            s += LINEAR_ID;
            s += r#"
    if (i >= p[0]) { return; }
    var o = vec2<u32>(i, i);
    if (p[2] == 0u) { o = decompose(i, 3u, 9u, 15u); }
    let u = a[o.x];
    let v = b[o.y];
    if (p[1] == 0u) { y[i] = u + v; } else { y[i] = u * v; }
}
"#;
        }
        Kernel::StridedCopy => {
            // p: n, src_off, dst_off, dims[6] @3, src strides[6] @9, dst strides[6] @15
            s += "@group(0) @binding(1) var<storage, read> x: array<f32>;\n\
                  @group(0) @binding(2) var<storage, read_write> y: array<f32>;\n";
            s += DECOMPOSE;
            s += LINEAR_ID;
            s += r#"
    if (i >= p[0]) { return; }
    let o = decompose(i, 3u, 9u, 15u);
    y[p[2] + o.y] = x[p[1] + o.x];
}
"#;
        }
        Kernel::PadUpsample => {
            // p: n, hin, win, hout, wout. idx: the source row of each output row, then the
            // source column of each output column; NONE (all ones) reads as zero (padding).
            s += "@group(0) @binding(1) var<storage, read> x: array<f32>;\n\
                  @group(0) @binding(2) var<storage, read> idx: array<u32>;\n\
                  @group(0) @binding(3) var<storage, read_write> y: array<f32>;\n";
            s += LINEAR_ID;
            s += r#"
    if (i >= p[0]) { return; }
    let hin = p[1]; let win = p[2]; let hout = p[3]; let wout = p[4];
    let plane = i / (hout * wout);
    let r = i % (hout * wout);
    let ri = idx[r / wout];
    let ci = idx[hout + r % wout];
    var v = 0.0;
    if (ri != 0xffffffffu && ci != 0xffffffffu) { v = x[(plane * hin + ri) * win + ci]; }
    y[i] = v;
}
"#;
        }
        Kernel::Embedding(f16) => {
            // p: n (ids * d), d, row0, rows. Writes only the rows whose id lies in this part of
            // the table, so a table split over several buffers takes one launch per part.
            s += &format!(
                "@group(0) @binding(1) var<storage, read> ids: array<u32>;\n\
                 @group(0) @binding(2) var<storage, read> t: array<{}>;\n\
                 @group(0) @binding(3) var<storage, read_write> y: array<f32>;\n",
                elem_ty(f16)
            );
            s += &loader("load_t", "t", f16);
            s += LINEAR_ID;
            s += r#"
    if (i >= p[0]) { return; }
    let d = p[1];
    let id = ids[i / d];
    if (id >= p[2] && id < p[2] + p[3]) {
        y[i] = load_t((id - p[2]) * d + i % d);
    }
}
"#;
        }
        Kernel::VqNearest => {
            // p: n rows, k codes, d. One thread per row; the full distance |z|^2 + |e|^2 - 2 z.e
            // as diffusers computes it, first index on ties as torch.argmin.
            s += "@group(0) @binding(1) var<storage, read> z: array<f32>;\n\
                  @group(0) @binding(2) var<storage, read> cb: array<f32>;\n\
                  @group(0) @binding(3) var<storage, read_write> y: array<f32>;\n";
            s += LINEAR_ID;
            s += r#"
    if (i >= p[0]) { return; }
    let k = p[1]; let d = p[2];
    var z2 = 0.0;
    for (var j = 0u; j < d; j = j + 1u) { let v = z[i * d + j]; z2 = z2 + v * v; }
    var best = 0u;
    var best_d = 0.0;
    for (var c = 0u; c < k; c = c + 1u) {
        var e2 = 0.0;
        var ze = 0.0;
        for (var j = 0u; j < d; j = j + 1u) {
            let e = cb[c * d + j];
            e2 = e2 + e * e;
            ze = ze + z[i * d + j] * e;
        }
        let dist = (z2 + e2) - 2.0 * ze;
        if (c == 0u || dist < best_d) { best = c; best_d = dist; }
    }
    for (var j = 0u; j < d; j = j + 1u) { y[i * d + j] = cb[best * d + j]; }
}
"#;
        }
        Kernel::Softmax | Kernel::LayerNorm | Kernel::GroupNormStats => {
            s += &row_kernel(k);
        }
        Kernel::GroupNormApply => {
            // p: n, c, spatial, channels per group; stats: (mean, 1/std) per (image, group).
            s += "@group(0) @binding(1) var<storage, read> x: array<f32>;\n\
                  @group(0) @binding(2) var<storage, read> st: array<f32>;\n\
                  @group(0) @binding(3) var<storage, read> gamma: array<f32>;\n\
                  @group(0) @binding(4) var<storage, read> beta: array<f32>;\n\
                  @group(0) @binding(5) var<storage, read_write> y: array<f32>;\n";
            s += LINEAR_ID;
            s += r#"
    if (i >= p[0]) { return; }
    let c = p[1]; let sp = p[2]; let cpg = p[3];
    let ch = (i / sp) % c;
    let g = (i / (sp * c)) * (c / cpg) + ch / cpg;
    y[i] = (x[i] - st[2u * g]) * (st[2u * g + 1u] * gamma[ch]) + beta[ch];
}
"#;
        }
        Kernel::Matmul(f16, tiled) => s += &gemm(GemmKind::Matmul, f16, tiled),
        Kernel::Conv2d(f16, tiled) => s += &gemm(GemmKind::Conv, f16, tiled),
    }
    s
}

/// One workgroup of `WG_ROW` threads per row: softmax, layer norm, and the group norm statistics
/// (a group is a contiguous row of `channels_per_group * spatial` values).
fn row_kernel(k: Kernel) -> String {
    let mut s = String::from(
        "@group(0) @binding(1) var<storage, read> x: array<f32>;\n\
         var<workgroup> red: array<f32, 64>;\n\
         fn reduce_sum(v: f32, li: u32) -> f32 {\n\
             red[li] = v;\n\
             workgroupBarrier();\n\
             for (var s = 32u; s > 0u; s = s >> 1u) {\n\
                 if (li < s) { red[li] = red[li] + red[li + s]; }\n\
                 workgroupBarrier();\n\
             }\n\
             let r = red[0];\n\
             workgroupBarrier();\n\
             return r;\n\
         }\n\
         fn reduce_max(v: f32, li: u32) -> f32 {\n\
             red[li] = v;\n\
             workgroupBarrier();\n\
             for (var s = 32u; s > 0u; s = s >> 1u) {\n\
                 if (li < s) { red[li] = max(red[li], red[li + s]); }\n\
                 workgroupBarrier();\n\
             }\n\
             let r = red[0];\n\
             workgroupBarrier();\n\
             return r;\n\
         }\n",
    );
    s += match k {
        Kernel::Softmax => "@group(0) @binding(2) var<storage, read_write> y: array<f32>;\n",
        Kernel::LayerNorm => {
            "@group(0) @binding(2) var<storage, read> gamma: array<f32>;\n\
             @group(0) @binding(3) var<storage, read> beta: array<f32>;\n\
             @group(0) @binding(4) var<storage, read_write> y: array<f32>;\n"
        }
        _ => "@group(0) @binding(2) var<storage, read_write> y: array<f32>;\n",
    };
    // p: rows, len, eps
    s += r#"
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= p[0]) { return; }
    let n = p[1];
    let base = row * n;
"#;
    s += match k {
        Kernel::Softmax => {
            r#"
    var m = -3.402823e38;
    for (var j = li; j < n; j = j + 64u) { m = max(m, x[base + j]); }
    m = reduce_max(m, li);
    var t = 0.0;
    for (var j = li; j < n; j = j + 64u) { t = t + exp(x[base + j] - m); }
    t = reduce_sum(t, li);
    for (var j = li; j < n; j = j + 64u) { y[base + j] = exp(x[base + j] - m) / t; }
}
"#
        }
        Kernel::LayerNorm => {
            r#"
    var t = 0.0;
    for (var j = li; j < n; j = j + 64u) { t = t + x[base + j]; }
    let mean = reduce_sum(t, li) / f32(n);
    var v = 0.0;
    for (var j = li; j < n; j = j + 64u) { let d = x[base + j] - mean; v = v + d * d; }
    let inv = 1.0 / sqrt(reduce_sum(v, li) / f32(n) + pf(2u));
    for (var j = li; j < n; j = j + 64u) { y[base + j] = (x[base + j] - mean) * inv * gamma[j] + beta[j]; }
}
"#
        }
        _ => {
            r#"
    var t = 0.0;
    for (var j = li; j < n; j = j + 64u) { t = t + x[base + j]; }
    let mean = reduce_sum(t, li) / f32(n);
    var v = 0.0;
    for (var j = li; j < n; j = j + 64u) { let d = x[base + j] - mean; v = v + d * d; }
    let inv = 1.0 / sqrt(reduce_sum(v, li) / f32(n) + pf(2u));
    if (li == 0u) { y[2u * row] = mean; y[2u * row + 1u] = inv; }
}
"#
        }
    };
    s
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum GemmKind {
    Matmul,
    Conv,
}

/// A matrix product `C[batch] = alpha * A[batch] B[batch] (+ bias)`, in two forms:
/// - tiled (for m >= 64): each workgroup of 16x16 threads computes a 64x64 tile, each thread a
///   4x4 block, staging 16-deep slices of A and B in workgroup memory;
/// - untiled (for fewer rows, where a 64-row tile would be mostly idle): each thread computes 4
///   rows of one column straight from memory, 64 threads per workgroup along the columns. The
///   convolutions of small models (16 to 32 output channels) take this form; on a software
///   driver it is also several times faster there, as it needs no workgroup barriers.
///
/// Matmul: A and B are read through strides (so transposed operands need no copy); p: m, n, k,
/// a batch/row/col strides @3, b batch/row/col strides @6, bias mode @9 (0 none, 1 per column,
/// 2 per row), alpha @10.
///
/// Conv: A is the weight `(O, C*kh*kw)`, B the implicit im2col matrix of image `batch`
/// `(C*kh*kw, Ho*Wo)`, read from x with zero padding; p: m=O, n=Ho*Wo, k, c, h, w, kh, kw,
/// stride, pad top, pad left, wo, bias mode @12, alpha @13; binding 5 the im2col row table.
fn gemm(kind: GemmKind, f16: bool, tiled: bool) -> String {
    let (a_f16, b_f16) = match kind {
        GemmKind::Matmul => (false, f16),
        GemmKind::Conv => (f16, false),
    };
    let mut s = format!(
        "@group(0) @binding(1) var<storage, read> A: array<{}>;\n\
         @group(0) @binding(2) var<storage, read> B: array<{}>;\n\
         @group(0) @binding(3) var<storage, read> bias: array<f32>;\n\
         @group(0) @binding(4) var<storage, read_write> C: array<f32>;\n\
         var<workgroup> As: array<f32, 1024>;\n\
         var<workgroup> Bs: array<f32, 1024>;\n",
        elem_ty(a_f16),
        elem_ty(b_f16)
    );
    s += &loader("ld_a", "A", a_f16);
    s += &loader("ld_b", "B", b_f16);
    let (bias_at, alpha_at) = match kind {
        GemmKind::Matmul => {
            s += r#"
fn load_a(b: u32, i: u32, k: u32) -> f32 { return ld_a(b * p[3] + i * p[4] + k * p[5]); }
fn load_b(b: u32, k: u32, j: u32) -> f32 { return ld_b(b * p[6] + k * p[7] + j * p[8]); }
fn setup_b(j: u32) {}
"#;
            (9, 10)
        }
        GemmKind::Conv => {
            // ktab[k] = channel << 16 | ky << 8 | kx for k = (channel, ky, kx) of the im2col
            // row: no integer division in the inner loop (software Vulkan drivers turn vector
            // divisions into scalar ones). Each thread loads one column j of the B tile, whose
            // output pixel is decoded once, before the loop.
            s += r#"
@group(0) @binding(5) var<storage, read> ktab: array<u32>;
var<private> base_y: i32;
var<private> base_x: i32;
fn setup_b(j: u32) {
    let oy = j / p[11];
    let ox = j % p[11];
    base_y = i32(oy * p[8]) - i32(p[9]);
    base_x = i32(ox * p[8]) - i32(p[10]);
}
fn load_a(b: u32, i: u32, k: u32) -> f32 { return ld_a(i * p[2] + k); }
fn load_b(b: u32, k: u32, j: u32) -> f32 {
    let t = ktab[k];
    let iy = base_y + i32((t >> 8u) & 255u);
    let ix = base_x + i32(t & 255u);
    let h = p[4]; let w = p[5];
    if (iy < 0 || iy >= i32(h) || ix < 0 || ix >= i32(w)) { return 0.0; }
    return ld_b(((b * p[3] + (t >> 16u)) * h + u32(iy)) * w + u32(ix));
}
"#;
            (12, 13)
        }
    };
    if !tiled {
        s += &format!(
            r#"
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {{
    let m = p[0]; let n = p[1]; let kk = p[2];
    let batch = wid.z;
    let j = wid.x * 64u + li;
    let i0 = wid.y * 4u;
    if (j >= n) {{ return; }}
    setup_b(j);
    var acc = vec4<f32>(0.0);
    let r1 = min(i0 + 1u, m - 1u);
    let r2 = min(i0 + 2u, m - 1u);
    let r3 = min(i0 + 3u, m - 1u);
    for (var k = 0u; k < kk; k = k + 1u) {{
        let b = load_b(batch, k, j);
        let a = vec4<f32>(load_a(batch, i0, k), load_a(batch, r1, k), load_a(batch, r2, k), load_a(batch, r3, k));
        acc = fma(a, vec4<f32>(b), acc);
    }}
    let mode = p[{bias_at}u];
    let alpha = pf({alpha_at}u);
    for (var r = 0u; r < 4u; r = r + 1u) {{
        let i = i0 + r;
        if (i < m) {{
            var v = acc[r] * alpha;
            if (mode == 1u) {{ v = v + bias[j]; }} else if (mode == 2u) {{ v = v + bias[i]; }}
            C[(batch * m + i) * n + j] = v;
        }}
    }}
}}
"#
        );
        return s;
    }
    s += &format!(
        r#"
@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {{
    let m = p[0]; let n = p[1]; let kk = p[2];
    let batch = wid.z;
    let row0 = wid.y * 64u;
    let col0 = wid.x * 64u;
    // Rows r of this thread's 4x4 block, as vectors: no dynamically indexed private array,
    // which software drivers keep in memory.
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    // The B column this thread loads (e % 64 below is the same for its four loads).
    setup_b(col0 + (li & 63u));
    for (var k0 = 0u; k0 < kk; k0 = k0 + 16u) {{
        for (var r = 0u; r < 4u; r = r + 1u) {{
            let e = li + r * 256u;
            let i = e / 16u;
            let k = e % 16u;
            var v = 0.0;
            if (row0 + i < m && k0 + k < kk) {{ v = load_a(batch, row0 + i, k0 + k); }}
            As[k * 64u + i] = v;
            let k2 = e / 64u;
            let j = e % 64u;
            var u = 0.0;
            if (col0 + j < n && k0 + k2 < kk) {{ u = load_b(batch, k0 + k2, col0 + j); }}
            Bs[k2 * 64u + j] = u;
        }}
        workgroupBarrier();
        for (var k = 0u; k < 16u; k = k + 1u) {{
            let a = vec4<f32>(As[k * 64u + lid.y * 4u], As[k * 64u + lid.y * 4u + 1u],
                              As[k * 64u + lid.y * 4u + 2u], As[k * 64u + lid.y * 4u + 3u]);
            let b = vec4<f32>(Bs[k * 64u + lid.x * 4u], Bs[k * 64u + lid.x * 4u + 1u],
                              Bs[k * 64u + lid.x * 4u + 2u], Bs[k * 64u + lid.x * 4u + 3u]);
            acc0 = fma(vec4<f32>(a.x), b, acc0);
            acc1 = fma(vec4<f32>(a.y), b, acc1);
            acc2 = fma(vec4<f32>(a.z), b, acc2);
            acc3 = fma(vec4<f32>(a.w), b, acc3);
        }}
        workgroupBarrier();
    }}
    let mode = p[{bias_at}u];
    let alpha = pf({alpha_at}u);
    let accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var r = 0u; r < 4u; r = r + 1u) {{
        let i = row0 + lid.y * 4u + r;
        let row = accs[r];
        for (var c = 0u; c < 4u; c = c + 1u) {{
            let j = col0 + lid.x * 4u + c;
            if (i < m && j < n) {{
                var v = row[c] * alpha;
                if (mode == 1u) {{ v = v + bias[j]; }} else if (mode == 2u) {{ v = v + bias[i]; }}
                C[(batch * m + i) * n + j] = v;
            }}
        }}
    }}
}}
"#
    );
    s
}
