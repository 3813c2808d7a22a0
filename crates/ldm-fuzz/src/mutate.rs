//! Input mutation: a seeded PRNG and the classic byte-level mutations (bit flips, interesting
//! values, inserts, deletes, duplication, splicing, truncation) plus a per-target dictionary of
//! tokens worth inserting (JSON numbers, pickle opcodes, chunk names).

/// SplitMix64: small, fast and good enough to drive mutations reproducibly from a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

const INTERESTING_8: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, b'0', b'9', b'-', b'.', b'"', b'\n'];
const INTERESTING_32: &[u32] = &[0, 1, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0x8000, 0xffff, 0x1_0000, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff];
const INTERESTING_64: &[u64] = &[0, 1 << 32, 1 << 40, 1 << 62, i64::MAX as u64, 1 << 63, u64::MAX];

fn random_range(rng: &mut Rng, len: usize) -> (usize, usize) {
    let a = rng.below(len + 1);
    let max = (len - a).min(if rng.chance(4) { len } else { 32 });
    let n = rng.below(max + 1);
    (a, a + n)
}

/// Applies one to eight stacked mutations to `input`, drawing splice material from `others`
/// and tokens from `dict`; the result is at most `max_len` bytes.
pub fn mutate(rng: &mut Rng, input: &[u8], others: &[Vec<u8>], dict: &[&[u8]], max_len: usize) -> Vec<u8> {
    let mut data = input.to_vec();
    let rounds = 1 + rng.below(8).min(rng.below(8));
    for _ in 0..rounds {
        let len = data.len();
        match rng.below(14) {
            0 if len > 0 => {
                let i = rng.below(len * 8);
                data[i / 8] ^= 1 << (i % 8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next_u64() as u8;
            }
            2 if len > 0 => {
                let i = rng.below(len);
                data[i] = INTERESTING_8[rng.below(INTERESTING_8.len())];
            }
            3 if len >= 4 => {
                let i = rng.below(len - 3);
                let v = INTERESTING_32[rng.below(INTERESTING_32.len())];
                let b = if rng.chance(2) { v.to_le_bytes() } else { v.to_be_bytes() };
                data[i..i + 4].copy_from_slice(&b);
            }
            4 if len >= 8 => {
                let i = rng.below(len - 7);
                let v = INTERESTING_64[rng.below(INTERESTING_64.len())];
                data[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            5 => {
                // Insert random bytes.
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                data.splice(i..i, bytes);
            }
            6 if len > 0 => {
                let (a, b) = random_range(rng, len);
                data.drain(a..b);
            }
            7 if len > 0 => {
                // Duplicate a range somewhere.
                let (a, b) = random_range(rng, len);
                let chunk = data[a..b].to_vec();
                let at = rng.below(data.len() + 1);
                data.splice(at..at, chunk);
            }
            8 if !others.is_empty() => {
                // Splice: our head, another input's tail.
                let other = &others[rng.below(others.len())];
                let cut = rng.below(data.len() + 1);
                let from = rng.below(other.len() + 1);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            9 if len > 0 => {
                data.truncate(rng.below(len));
            }
            10 | 11 if !dict.is_empty() => {
                // Insert or overwrite with a dictionary token.
                let tok = dict[rng.below(dict.len())];
                let i = rng.below(len + 1);
                if rng.chance(2) || i + tok.len() > len {
                    data.splice(i..i, tok.iter().copied());
                } else {
                    data[i..i + tok.len()].copy_from_slice(tok);
                }
            }
            12 if len > 0 => {
                // Replace a run of ASCII digits (a JSON or text number) with another number.
                let start = rng.below(len);
                if let Some(p) = data[start..].iter().position(|b| b.is_ascii_digit()) {
                    let a = start + p;
                    let b = a + data[a..].iter().take_while(|c| c.is_ascii_digit()).count();
                    let n = match rng.below(6) {
                        0 => "0".to_string(),
                        1 => "-1".to_string(),
                        2 => "1000000000".to_string(),
                        3 => "18446744073709551615".to_string(),
                        4 => "1e309".to_string(),
                        _ => (rng.next_u64() % 100_000).to_string(),
                    };
                    data.splice(a..b, n.into_bytes());
                }
            }
            _ if len > 1 => {
                // Swap two bytes.
                let (i, j) = (rng.below(len), rng.below(len));
                data.swap(i, j);
            }
            _ => data.push(rng.next_u64() as u8),
        }
    }
    data.truncate(max_len);
    data
}
