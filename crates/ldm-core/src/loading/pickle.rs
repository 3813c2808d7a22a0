//! PyTorch checkpoints (`torch.save` zip archives) read as data.
//!
//! A `.bin`/`.pt` file is a zip holding `ARCHIVE/data.pkl` (a pickle of the state dict) and one
//! `ARCHIVE/data/KEY` entry per storage. Python's `pickle` runs whatever the file names
//! (`GLOBAL posix system` + `REDUCE` is `os.system(...)`), so we interpret the opcodes ourselves
//! as data: the only callables are the handful `torch.save` writes for tensors
//! ([`ALLOWED_GLOBALS`]), evaluated by this module; any other global is refused by name before
//! anything else happens. Nothing from the file is ever executed.
//!
//! Every size is bounded: the pickle's length, the stack, the memo, the number of objects, and
//! each tensor against its storage (`offset + sum((size - 1) * stride) < numel`, and the storage
//! against its zip entry).

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;
use std::sync::Mutex;

use super::weights::{to_f32, TensorMeta, TensorSource};
use crate::{Error, Result};

/// The largest `data.pkl` read (a state dict of a few thousand tensors is well under 1 MiB).
pub const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// Bounds of the interpreter, far above what `torch.save` writes.
pub const MAX_STACK: usize = 1 << 20;
pub const MAX_MEMO: usize = 1 << 22;
pub const MAX_OBJECTS: usize = 1 << 23;
/// The most dimensions a tensor may have.
pub const MAX_DIMS: usize = 16;

/// Element type of a storage, named as in safetensors ("F32", "F16", ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    C64,
    C128,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
            Dtype::C64 => "C64",
            Dtype::C128 => "C128",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::U8 | Dtype::I8 | Dtype::Bool => 1,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::C64 => 8,
            Dtype::C128 => 16,
        }
    }
}

/// The globals a PyTorch state dict may name. Anything else is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    /// `torch.Tensor`, `torch.nn.parameter.Parameter`: only as arguments of `_rebuild_from_type_v2`.
    TensorType,
    /// `torch.FloatStorage` and friends, `torch.UntypedStorage`.
    Storage(Dtype),
    /// `torch.float32` and friends, as arguments.
    TorchDtype,
}

/// The `module.name` pairs accepted, with what they stand for.
pub const ALLOWED_GLOBALS: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2",
    "torch.Tensor",
    "torch.nn.parameter.Parameter",
    "torch.FloatStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.DoubleStorage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
    "torch.ComplexFloatStorage",
    "torch.ComplexDoubleStorage",
    "torch.UntypedStorage",
    "torch.float32 (and the other torch dtypes)",
];

fn lookup_global(module: &str, name: &str) -> Option<Global> {
    use Global::*;
    Some(match (module, name) {
        ("collections", "OrderedDict") => OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor") => RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => RebuildParameterWithState,
        ("torch._tensor", "_rebuild_from_type_v2") => RebuildFromTypeV2,
        ("torch", "Tensor") | ("torch._tensor", "Tensor") | ("torch.nn.parameter", "Parameter") => TensorType,
        ("torch", "FloatStorage") => Storage(Dtype::F32),
        ("torch", "HalfStorage") => Storage(Dtype::F16),
        ("torch", "BFloat16Storage") => Storage(Dtype::BF16),
        ("torch", "DoubleStorage") => Storage(Dtype::F64),
        ("torch", "LongStorage") => Storage(Dtype::I64),
        ("torch", "IntStorage") => Storage(Dtype::I32),
        ("torch", "ShortStorage") => Storage(Dtype::I16),
        ("torch", "CharStorage") => Storage(Dtype::I8),
        ("torch", "ByteStorage") => Storage(Dtype::U8),
        ("torch", "BoolStorage") => Storage(Dtype::Bool),
        ("torch", "ComplexFloatStorage") => Storage(Dtype::C64),
        ("torch", "ComplexDoubleStorage") => Storage(Dtype::C128),
        ("torch", "UntypedStorage") | ("torch.storage", "UntypedStorage") => Storage(Dtype::U8),
        (
            "torch",
            "float32" | "float" | "float16" | "half" | "bfloat16" | "float64" | "double" | "int64" | "long" | "int32"
            | "int" | "int16" | "short" | "int8" | "uint8" | "bool",
        ) => TorchDtype,
        _ => return None,
    })
}

/// A stack value. Containers live in the interpreter's arena and are referred to by index, so
/// that memo references share (as in Python) and copying a value is cheap whatever it holds.
#[derive(Clone, Copy, Debug, PartialEq)]
enum V {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Global(Global),
    Obj(u32),
}

#[derive(Clone, Debug)]
enum Obj {
    Str(String),
    Bytes(usize),
    Tuple(Vec<V>),
    List(Vec<V>),
    Dict(Vec<(V, V)>),
    Set,
    Storage { dtype: Dtype, key: String, numel: u64 },
    Tensor(TensorRef),
}

/// A tensor as the pickle describes it: a view into a storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRef {
    /// The storage's entry name under `ARCHIVE/data/`.
    pub storage: String,
    pub dtype: Dtype,
    /// Elements in the storage, as declared by the pickle.
    pub storage_numel: u64,
    /// In elements.
    pub offset: u64,
    pub shape: Vec<usize>,
    /// In elements.
    pub stride: Vec<usize>,
}

impl TensorRef {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// One past the last storage element the view touches (0 for an empty tensor).
    pub fn extent(&self) -> u64 {
        if self.numel() == 0 {
            return 0;
        }
        self.offset + self.shape.iter().zip(&self.stride).map(|(&d, &s)| (d as u64 - 1) * s as u64).sum::<u64>() + 1
    }

    fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected = expected.saturating_mul(d);
        }
        true
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<V>,
    marks: Vec<usize>,
    memo: HashMap<u32, V>,
    arena: Vec<Obj>,
}

type Res<T> = std::result::Result<T, String>;

fn op_name(op: u8) -> String {
    let printable = if op.is_ascii_graphic() { format!(" `{}`", op as char) } else { String::new() };
    format!("0x{op:02x}{printable}")
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), arena: Vec::new() }
    }

    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| {
            format!("the pickle ends inside an operand at byte {} (it is truncated)", self.pos)
        })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Res<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Res<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Res<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Res<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }
    fn line(&mut self) -> Res<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("the pickle ends inside a text operand (it is truncated)")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| format!("a text operand at byte {} is not UTF-8", self.pos))?;
        self.pos += n + 1;
        Ok(s)
    }
    fn len_of(&mut self, n: u64) -> Res<usize> {
        let remaining = (self.data.len() - self.pos) as u64;
        if n > remaining {
            return Err(format!(
                "an operand at byte {} claims {n} bytes, but only {remaining} remain (the pickle is truncated or damaged)",
                self.pos
            ));
        }
        Ok(n as usize)
    }

    fn alloc(&mut self, o: Obj) -> Res<V> {
        if self.arena.len() >= MAX_OBJECTS {
            return Err(format!("more than {MAX_OBJECTS} objects; not a state dict"));
        }
        self.arena.push(o);
        Ok(V::Obj((self.arena.len() - 1) as u32))
    }

    fn push(&mut self, v: V) -> Res<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(format!("the pickle stack grows beyond {MAX_STACK} entries; not a state dict"));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Res<V> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(format!("opcode at byte {} pops an empty stack (the pickle is damaged)", self.pos.saturating_sub(1)));
        }
        Ok(self.stack.pop().unwrap_or(V::None))
    }

    fn top_mut(&mut self) -> Res<&mut V> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(format!("opcode at byte {} needs a value on an empty stack", self.pos.saturating_sub(1)));
        }
        let n = self.stack.len();
        Ok(&mut self.stack[n - 1])
    }

    fn pop_mark(&mut self) -> Res<Vec<V>> {
        let m = self.marks.pop().ok_or_else(|| format!("opcode at byte {} has no MARK", self.pos.saturating_sub(1)))?;
        Ok(self.stack.split_off(m.min(self.stack.len())))
    }

    fn memo_put(&mut self, key: u32) -> Res<()> {
        let v = *self.top_mut()?;
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&key) {
            return Err(format!("more than {MAX_MEMO} memo entries; not a state dict"));
        }
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Res<()> {
        let v = *self.memo.get(&key).ok_or_else(|| format!("memo entry {key} is read before it is written"))?;
        self.push(v)
    }

    fn obj(&self, v: V) -> Option<&Obj> {
        match v {
            V::Obj(i) => self.arena.get(i as usize),
            _ => None,
        }
    }

    fn obj_mut(&mut self, v: V) -> Option<&mut Obj> {
        match v {
            V::Obj(i) => self.arena.get_mut(i as usize),
            _ => None,
        }
    }

    fn str_of(&self, v: V) -> Option<&str> {
        match self.obj(v) {
            Some(Obj::Str(s)) => Some(s),
            _ => None,
        }
    }

    fn describe(&self, v: V) -> String {
        match v {
            V::None => "None".into(),
            V::Bool(b) => b.to_string(),
            V::Int(i) => i.to_string(),
            V::Float(f) => f.to_string(),
            V::Global(g) => format!("{g:?}"),
            V::Obj(_) => match self.obj(v) {
                Some(Obj::Str(s)) => format!("{:?}", s.chars().take(40).collect::<String>()),
                Some(Obj::Bytes(n)) => format!("{n} bytes"),
                Some(Obj::Tuple(t)) => format!("a tuple of {}", t.len()),
                Some(Obj::List(t)) => format!("a list of {}", t.len()),
                Some(Obj::Dict(t)) => format!("a dict of {}", t.len()),
                Some(Obj::Set) => "a set".into(),
                Some(Obj::Storage { .. }) => "a storage".into(),
                Some(Obj::Tensor(_)) => "a tensor".into(),
                None => "?".into(),
            },
        }
    }

    fn items(&self, v: V) -> Option<&[V]> {
        match self.obj(v) {
            Some(Obj::Tuple(t)) | Some(Obj::List(t)) => Some(t),
            _ => None,
        }
    }

    fn global(&mut self, module: &str, name: &str) -> Res<()> {
        match lookup_global(module, name) {
            Some(g) => self.push(V::Global(g)),
            None => Err(format!(
                "pickle calls `{}.{}`, which is not tensor data; refusing to load (a PyTorch state dict only names {})",
                module.chars().take(100).collect::<String>(),
                name.chars().take(100).collect::<String>(),
                "collections.OrderedDict, torch._utils._rebuild_tensor_v2/_rebuild_parameter and torch storage types"
            )),
        }
    }

    fn run(mut self) -> Res<(V, Vec<Obj>)> {
        loop {
            let at = self.pos;
            let op = self.take(1).map_err(|_| "the pickle ends without a STOP opcode (it is truncated)".to_string())?[0];
            match op {
                0x80 => {
                    // PROTO
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(format!("pickle protocol {v} is not supported (0 to 5)"));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only.
                    self.u64()?;
                }
                b'.' => {
                    // STOP
                    let v = self.pop()?;
                    return Ok((v, self.arena));
                }
                b'(' => {
                    if self.marks.len() >= MAX_STACK {
                        return Err("too many nested MARKs".into());
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = *self.top_mut()?;
                    self.push(v)?;
                }
                b'N' => self.push(V::None)?,
                0x88 => self.push(V::Bool(true))?,
                0x89 => self.push(V::Bool(false))?,
                b'I' => {
                    let s = self.line()?;
                    let v = match s {
                        "00" => V::Bool(false),
                        "01" => V::Bool(true),
                        s => V::Int(s.trim().parse().map_err(|_| format!("INT operand `{s}` at byte {at} is not an integer"))?),
                    };
                    self.push(v)?;
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(V::Int(v as i64))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(V::Int(v as i64))?;
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(V::Int(v as i64))?;
                }
                b'L' => {
                    let s = self.line()?;
                    let s = s.trim_end_matches('L');
                    let v: i64 = s.trim().parse().map_err(|_| format!("LONG operand `{s}` at byte {at} is not a 64-bit integer"))?;
                    self.push(V::Int(v))?;
                }
                0x8a | 0x8b => {
                    // LONG1, LONG4: little-endian two's complement.
                    let n = if op == 0x8a { self.u8()? as u64 } else { self.u32()? as u64 };
                    let n = self.len_of(n)?;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(format!("integer of {n} bytes at byte {at} does not fit 64 bits"));
                    }
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) { [0xffu8; 8] } else { [0u8; 8] };
                    buf[..n].copy_from_slice(b);
                    self.push(V::Int(i64::from_le_bytes(buf)))?;
                }
                b'F' => {
                    let s = self.line()?;
                    let v: f64 = s.trim().parse().map_err(|_| format!("FLOAT operand `{s}` at byte {at} is not a number"))?;
                    self.push(V::Float(v))?;
                }
                b'G' => {
                    let b = self.take(8)?;
                    let v = f64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                    self.push(V::Float(v))?;
                }
                // Strings: STRING (quoted text), BINSTRING, SHORT_BINSTRING, UNICODE (raw text),
                // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8.
                b'S' | b'V' => {
                    let s = self.line()?;
                    let s = if op == b'S' { s.trim_matches(|c| c == '\'' || c == '"') } else { s };
                    let v = self.alloc(Obj::Str(s.to_string()))?;
                    self.push(v)?;
                }
                b'T' | b'U' | b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'U' | 0x8c => self.u8()? as u64,
                        0x8d => self.u64()?,
                        _ => self.u32()? as u64,
                    };
                    let n = self.len_of(n)?;
                    let b = self.take(n)?;
                    let s = String::from_utf8_lossy(b).into_owned();
                    let v = self.alloc(Obj::Str(s))?;
                    self.push(v)?;
                }
                // Bytes: BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8 (only their length is kept).
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'C' => self.u8()? as u64,
                        b'B' => self.u32()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len_of(n)?;
                    self.take(n)?;
                    let v = self.alloc(Obj::Bytes(n))?;
                    self.push(v)?;
                }
                b']' => {
                    let v = self.alloc(Obj::List(Vec::new()))?;
                    self.push(v)?;
                }
                b')' => {
                    let v = self.alloc(Obj::Tuple(Vec::new()))?;
                    self.push(v)?;
                }
                b'}' => {
                    let v = self.alloc(Obj::Dict(Vec::new()))?;
                    self.push(v)?;
                }
                0x8f => {
                    let v = self.alloc(Obj::Set)?;
                    self.push(v)?;
                }
                b'l' | b't' | 0x91 => {
                    let items = self.pop_mark()?;
                    let o = match op {
                        b'l' => Obj::List(items),
                        b't' => Obj::Tuple(items),
                        _ => Obj::Set,
                    };
                    let v = self.alloc(o)?;
                    self.push(v)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let floor = self.marks.last().copied().unwrap_or(0);
                    if self.stack.len() < floor + n {
                        return Err(format!("TUPLE{n} at byte {at} needs {n} values on the stack"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let v = self.alloc(Obj::Tuple(items))?;
                    self.push(v)?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(format!("DICT at byte {at} has an odd number of items"));
                    }
                    let pairs = items.chunks_exact(2).map(|p| (p[0], p[1])).collect();
                    let v = self.alloc(Obj::Dict(pairs))?;
                    self.push(v)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    let list = *self.top_mut()?;
                    match self.obj_mut(list) {
                        Some(Obj::List(l)) => l.push(v),
                        _ => return Err(format!("APPEND at byte {at} to something that is not a list")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = *self.top_mut()?;
                    match self.obj_mut(list) {
                        Some(Obj::List(l)) => l.extend(items),
                        _ => return Err(format!("APPENDS at byte {at} to something that is not a list")),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let dict = *self.top_mut()?;
                    match self.obj_mut(dict) {
                        Some(Obj::Dict(d)) => d.push((k, v)),
                        _ => return Err(format!("SETITEM at byte {at} on something that is not a dict")),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(format!("SETITEMS at byte {at} has an odd number of items"));
                    }
                    let dict = *self.top_mut()?;
                    match self.obj_mut(dict) {
                        Some(Obj::Dict(d)) => d.extend(items.chunks_exact(2).map(|p| (p[0], p[1]))),
                        _ => return Err(format!("SETITEMS at byte {at} on something that is not a dict")),
                    }
                }
                0x90 => {
                    self.pop_mark()?;
                    let set = *self.top_mut()?;
                    if !matches!(self.obj(set), Some(Obj::Set)) {
                        return Err(format!("ADDITEMS at byte {at} on something that is not a set"));
                    }
                }
                b'g' => {
                    let s = self.line()?;
                    let k: u32 = s.trim().parse().map_err(|_| format!("GET operand `{s}` at byte {at} is not an index"))?;
                    self.memo_get(k)?;
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?;
                }
                b'p' => {
                    let s = self.line()?;
                    let k: u32 = s.trim().parse().map_err(|_| format!("PUT operand `{s}` at byte {at} is not an index"))?;
                    self.memo_put(k)?;
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = u32::try_from(self.memo.len()).map_err(|_| "memo too large".to_string())?;
                    self.memo_put(k)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(m), Some(n)) = (self.str_of(module), self.str_of(name)) else {
                        return Err(format!("STACK_GLOBAL at byte {at} with operands that are not strings"));
                    };
                    let (m, n) = (m.to_string(), n.to_string());
                    self.global(&m, &n)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.call(func, args, at, 0)?;
                    self.push(v)?;
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args); only OrderedDict.
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    if cls != V::Global(Global::OrderedDict) {
                        return Err(format!("NEWOBJ at byte {at} builds {}, which is not tensor data; refusing to load", self.describe(cls)));
                    }
                    let v = self.alloc(Obj::Dict(Vec::new()))?;
                    self.push(v)?;
                }
                b'b' => {
                    // BUILD: sets the state of the object below. An OrderedDict's state is its
                    // `_metadata` attribute, a tensor's its hooks: neither matters here.
                    let _state = self.pop()?;
                    let target = *self.top_mut()?;
                    if !matches!(self.obj(target), Some(Obj::Dict(_)) | Some(Obj::Tensor(_))) {
                        return Err(format!("BUILD at byte {at} on {}, which is not tensor data", self.describe(target)));
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid, at)?;
                    self.push(v)?;
                }
                b'P' => {
                    return Err(format!("text persistent id (PERSID) at byte {at}: not written by torch.save; refusing to load"));
                }
                b'i' | b'o' | 0x92 | 0x82 | 0x83 | 0x84 | 0x97 | 0x98 => {
                    let name = match op {
                        b'i' => "INST",
                        b'o' => "OBJ",
                        0x92 => "NEWOBJ_EX",
                        0x97 => "NEXT_BUFFER",
                        0x98 => "READONLY_BUFFER",
                        _ => "EXT",
                    };
                    return Err(format!(
                        "pickle opcode {name} at byte {at} builds objects other than tensor data; refusing to load"
                    ));
                }
                other => {
                    return Err(format!("unknown pickle opcode {} at byte {at} (the file is damaged)", op_name(other)));
                }
            }
        }
    }

    /// `('storage', storage_type, key, location, numel)` -> a storage.
    fn persistent_load(&mut self, pid: V, at: usize) -> Res<V> {
        let bad = || format!("persistent id at byte {at} is not ('storage', type, key, location, numel)");
        let items = self.items(pid).ok_or_else(bad)?.to_vec();
        if items.len() != 5 || self.str_of(items[0]) != Some("storage") {
            return Err(bad());
        }
        let dtype = match items[1] {
            V::Global(Global::Storage(d)) => d,
            other => return Err(format!("storage at byte {at} has type {}, not a torch storage type", self.describe(other))),
        };
        let key = match items[2] {
            V::Int(i) => i.to_string(),
            k => self.str_of(k).ok_or_else(bad)?.to_string(),
        };
        if key.is_empty() || key.contains(['/', '\\']) || key.contains("..") || key.len() > 64 {
            return Err(format!("storage key `{}` at byte {at} is not a plain name", key.chars().take(64).collect::<String>()));
        }
        let numel = match items[4] {
            V::Int(n) if n >= 0 => n as u64,
            other => return Err(format!("storage `{key}` has {} elements, expected a count", self.describe(other))),
        };
        self.alloc(Obj::Storage { dtype, key, numel })
    }

    fn ints(&self, v: V, what: &str) -> Res<Vec<usize>> {
        let items = self.items(v).ok_or_else(|| format!("tensor {what} is {}, expected a tuple of integers", self.describe(v)))?;
        if items.len() > MAX_DIMS {
            return Err(format!("tensor {what} has {} dimensions (at most {MAX_DIMS})", items.len()));
        }
        items
            .iter()
            .map(|&x| match x {
                V::Int(i) if i >= 0 => usize::try_from(i).map_err(|_| format!("tensor {what} entry {i} is too large")),
                other => Err(format!("tensor {what} entry {} is not a non-negative integer", self.describe(other))),
            })
            .collect()
    }

    /// Evaluates `func(*args)` for the allowed callables.
    fn call(&mut self, func: V, args: V, at: usize, depth: usize) -> Res<V> {
        if depth > 4 {
            return Err(format!("REDUCE at byte {at} nests rebuild calls too deeply"));
        }
        let g = match func {
            V::Global(g) => g,
            other => return Err(format!("REDUCE at byte {at} calls {}, which is not a function", self.describe(other))),
        };
        let args = self
            .items(args)
            .ok_or_else(|| format!("REDUCE at byte {at} with arguments {} instead of a tuple", self.describe(args)))?
            .to_vec();
        match g {
            Global::OrderedDict => {
                let mut pairs = Vec::new();
                if let Some(&init) = args.first() {
                    for &p in self.items(init).unwrap_or(&[]) {
                        match self.items(p) {
                            Some([k, v]) => pairs.push((*k, *v)),
                            _ => return Err(format!("OrderedDict at byte {at} built from something other than pairs")),
                        }
                    }
                }
                self.alloc(Obj::Dict(pairs))
            }
            Global::RebuildTensorV2 | Global::RebuildTensor => {
                if args.len() < 4 {
                    return Err(format!("_rebuild_tensor at byte {at} with {} arguments (expected storage, offset, size, stride)", args.len()));
                }
                let (dtype, key, numel) = match self.obj(args[0]) {
                    Some(Obj::Storage { dtype, key, numel }) => (*dtype, key.clone(), *numel),
                    _ => return Err(format!("_rebuild_tensor at byte {at} on {}, not a storage", self.describe(args[0]))),
                };
                let offset = match args[1] {
                    V::Int(o) if o >= 0 => o as u64,
                    other => return Err(format!("tensor offset {} is not a non-negative integer", self.describe(other))),
                };
                let shape = self.ints(args[2], "size")?;
                let stride = self.ints(args[3], "stride")?;
                if shape.len() != stride.len() {
                    return Err(format!("tensor size {shape:?} and stride {stride:?} differ in length"));
                }
                // Checked arithmetic: the extent must fit in u64 before it is compared.
                let mut numel_view: u64 = 1;
                let mut extent: u64 = offset;
                for (&d, &s) in shape.iter().zip(&stride) {
                    numel_view = numel_view.checked_mul(d as u64).ok_or("tensor size overflows")?;
                    if d > 0 {
                        extent = (d as u64 - 1)
                            .checked_mul(s as u64)
                            .and_then(|x| x.checked_add(extent))
                            .ok_or("tensor stride overflows")?;
                    }
                }
                if numel_view > 0 && extent >= numel {
                    return Err(format!(
                        "storage `{key}` is shorter than its tensor: the storage holds {numel} elements, but the tensor \
                         (size {shape:?}, stride {stride:?}, offset {offset}) reaches element {extent}"
                    ));
                }
                self.alloc(Obj::Tensor(TensorRef { storage: key, dtype, storage_numel: numel, offset, shape, stride }))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
                Some(&t) if matches!(self.obj(t), Some(Obj::Tensor(_))) => Ok(t),
                _ => Err(format!("_rebuild_parameter at byte {at} without a tensor")),
            },
            Global::RebuildFromTypeV2 => {
                // (func, new_type, args, state): func(*args) viewed as new_type.
                if args.len() < 3 {
                    return Err(format!("_rebuild_from_type_v2 at byte {at} with {} arguments", args.len()));
                }
                if args[1] != V::Global(Global::TensorType) {
                    return Err(format!("_rebuild_from_type_v2 at byte {at} makes {}, not a tensor", self.describe(args[1])));
                }
                self.call(args[0], args[2], at, depth + 1)
            }
            Global::TensorType | Global::Storage(_) | Global::TorchDtype => {
                Err(format!("REDUCE at byte {at} calls {g:?}, which is not a rebuild function; refusing to load"))
            }
        }
    }
}

/// Interprets a `data.pkl` as a state dict: tensor name -> tensor view. Non-tensor entries
/// (counters, version numbers) are skipped; a dict whose only content is under `state_dict`
/// (Lightning-style checkpoints) is unwrapped. Any global outside [`ALLOWED_GLOBALS`] is an error.
pub fn read_state_dict(pickle: &[u8]) -> Res<Vec<(String, TensorRef)>> {
    let (root, arena) = Machine::new(pickle).run()?;
    let m = Machine { data: &[], pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), arena };
    let pairs = |v: V| match m.obj(v) {
        Some(Obj::Dict(d)) => Some(d.clone()),
        _ => None,
    };
    let mut dict = pairs(root).ok_or_else(|| format!("the pickle holds {}, not a state dict", m.describe(root)))?;
    let has_tensor = dict.iter().any(|(_, v)| matches!(m.obj(*v), Some(Obj::Tensor(_))));
    if !has_tensor {
        if let Some(inner) = dict.iter().find(|(k, _)| m.str_of(*k) == Some("state_dict")).and_then(|(_, v)| pairs(*v)) {
            dict = inner;
        }
    }
    let mut out: Vec<(String, TensorRef)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (k, v) in dict {
        let (Some(name), Some(Obj::Tensor(t))) = (m.str_of(k), m.obj(v)) else { continue };
        match index.get(name) {
            Some(&i) => out[i].1 = t.clone(),
            None => {
                index.insert(name.to_string(), out.len());
                out.push((name.to_string(), t.clone()));
            }
        }
    }
    Ok(out)
}

trait ReadSeek: Read + Seek + Send {}
impl<T: Read + Seek + Send> ReadSeek for T {}

/// A PyTorch `.bin`/`.pt` file (a zip holding `data.pkl` and the storages). The pickle is
/// interpreted as data by [`read_state_dict`]; nothing in it is executed.
pub struct PthFile {
    path: std::path::PathBuf,
    zip: Mutex<zip::ZipArchive<Box<dyn ReadSeek>>>,
    /// `ARCHIVE/data/`: where the storages are.
    data_dir: String,
    tensors: HashMap<String, TensorRef>,
}

impl PthFile {
    pub fn open(path: &Path) -> Result<Self> {
        if crate::vfs::mounted(path).is_some() {
            let bytes = crate::vfs::read(path).map_err(|e| Error::io(path, e))?;
            return Self::from_bytes(path, bytes);
        }
        let file = std::fs::File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound { path: path.to_path_buf(), what: "weight file".into() },
            _ => Error::io(path, e),
        })?;
        let mut head = [0u8; 4];
        let n = (&file).read(&mut head).map_err(|e| Error::io(path, e))?;
        let file: Box<dyn ReadSeek> = Box::new(std::io::BufReader::new(file));
        Self::from_reader(path, file, &head[..n])
    }

    /// Reads a checkpoint held in memory; `path` names it in messages.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let head: Vec<u8> = bytes.iter().take(4).copied().collect();
        Self::from_reader(path, Box::new(std::io::Cursor::new(bytes)), &head)
    }

    fn from_reader(path: &Path, mut reader: Box<dyn ReadSeek>, head: &[u8]) -> Result<Self> {
        let bad = |msg: String| Error::BadWeights { path: path.to_path_buf(), msg };
        reader.rewind().map_err(|e| Error::io(path, e))?;
        if head.is_empty() {
            return Err(bad("the file is empty (expected a PyTorch zip checkpoint as torch.save writes it)".into()));
        }
        if head.first() == Some(&0x80) {
            return Err(bad(
                "this is the legacy (pre-1.6) torch.save format, which is not supported; re-save it with a current \
                 PyTorch or convert it to safetensors"
                    .into(),
            ));
        }
        let mut zip = zip::ZipArchive::new(reader).map_err(|e| {
            bad(format!(
                "not a readable zip archive ({e}); expected a PyTorch checkpoint as torch.save writes it (the file may \
                 be truncated or damaged, e.g. an interrupted download)"
            ))
        })?;
        // The pickle is `ARCHIVE/data.pkl`, one level down (or at the root).
        let names: Vec<String> = zip.file_names().map(String::from).collect();
        let pkl = names
            .iter()
            .filter(|n| *n == "data.pkl" || (n.ends_with("/data.pkl") && n.matches('/').count() == 1))
            .min()
            .cloned()
            .ok_or_else(|| bad("the zip archive has no data.pkl (not a torch.save checkpoint)".into()))?;
        let prefix = &pkl[..pkl.len() - "data.pkl".len()];
        let data_dir = format!("{prefix}data/");
        // torch.save records the byte order of the storages; we read little-endian only.
        if let Ok(entry) = zip.by_name(&format!("{prefix}byteorder")) {
            let mut order = Vec::new();
            let _ = entry.take(16).read_to_end(&mut order);
            if order.trim_ascii() == b"big" {
                return Err(Error::UnsupportedDtype {
                    file: path.display().to_string(),
                    name: "(every tensor)".into(),
                    dtype: "big-endian storage (saved on a big-endian machine)".into(),
                });
            }
        }
        let pickle = {
            let entry = zip.by_name(&pkl).map_err(|e| bad(format!("{pkl}: {e}")))?;
            if entry.size() > MAX_PICKLE_BYTES {
                return Err(bad(format!("{pkl} is {} bytes, more than the {MAX_PICKLE_BYTES} accepted", entry.size())));
            }
            let mut buf = Vec::new();
            entry.take(MAX_PICKLE_BYTES + 1).read_to_end(&mut buf).map_err(|e| bad(format!("{pkl}: {e}")))?;
            if buf.len() as u64 > MAX_PICKLE_BYTES {
                return Err(bad(format!("{pkl} is more than {MAX_PICKLE_BYTES} bytes")));
            }
            buf
        };
        let list = read_state_dict(&pickle).map_err(|m| bad(format!("{pkl}: {m}")))?;
        let mut tensors = HashMap::new();
        for (name, t) in list {
            let entry_name = format!("{data_dir}{}", t.storage);
            let index = zip
                .index_for_name(&entry_name)
                .ok_or_else(|| bad(format!("tensor `{name}`: its storage {entry_name} is missing from the archive")))?;
            let size = zip.by_index_raw(index).map(|e| e.size()).map_err(|e| bad(format!("{entry_name}: {e}")))?;
            let needed = t.storage_numel.saturating_mul(t.dtype.size() as u64);
            if size < needed {
                return Err(bad(format!(
                    "tensor `{name}`: storage {entry_name} holds {size} bytes, shorter than the {} {} elements ({needed} bytes) \
                     the pickle declares (the file is truncated or damaged)",
                    t.storage_numel,
                    t.dtype.name()
                )));
            }
            tensors.insert(name, t);
        }
        Ok(Self { path: path.to_path_buf(), zip: Mutex::new(zip), data_dir, tensors })
    }

    /// The tensor views the pickle describes.
    pub fn tensor_refs(&self) -> &HashMap<String, TensorRef> {
        &self.tensors
    }
}

impl TensorSource for PthFile {
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.tensors.get(name).map(|t| TensorMeta { shape: t.shape.clone(), dtype: t.dtype.name().to_string() })
    }

    fn load_f32(&self, name: &str) -> Result<Vec<f32>> {
        let file = self.path.display().to_string();
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingWeight { file: file.clone(), name: name.into() })?;
        if !matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
            return Err(Error::UnsupportedDtype { file, name: name.into(), dtype: t.dtype.name().into() });
        }
        let bad = |msg: String| Error::BadWeights { path: self.path.clone(), msg: format!("tensor `{name}`: {msg}") };
        let es = t.dtype.size() as u64;
        let (start, end) = (t.offset * es, t.extent().max(t.offset) * es);
        let entry_name = format!("{}{}", self.data_dir, t.storage);
        let mut bytes = Vec::new();
        {
            let mut zip = self.zip.lock().map_err(|_| bad("the archive's lock is poisoned".into()))?;
            let entry = zip.by_name(&entry_name).map_err(|e| bad(format!("{entry_name}: {e}")))?;
            let mut r = entry.take(end);
            std::io::copy(&mut (&mut r).take(start), &mut std::io::sink()).map_err(|e| bad(format!("{entry_name}: {e}")))?;
            r.read_to_end(&mut bytes).map_err(|e| bad(format!("{entry_name}: {e}")))?;
        }
        if (bytes.len() as u64) < end - start {
            return Err(bad(format!(
                "storage {entry_name} ends after {} bytes, but the tensor needs bytes {start}..{end} (the file is truncated or damaged)",
                start + bytes.len() as u64
            )));
        }
        if t.is_contiguous() {
            return to_f32(&bytes, t.dtype.name(), &self.path, name);
        }
        // A strided view (a transposed or sliced tensor saved as is): gather it in order.
        let es = es as usize;
        let n = t.numel() as usize;
        let mut out = Vec::with_capacity(n * es);
        let mut idx = vec![0usize; t.shape.len()];
        for _ in 0..n {
            let off: usize = idx.iter().zip(&t.stride).map(|(&i, &s)| i * s).sum::<usize>() * es;
            out.extend_from_slice(&bytes[off..off + es]);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        to_f32(&out, t.dtype.name(), &self.path, name)
    }

    fn location(&self, _name: Option<&str>) -> String {
        self.path.display().to_string()
    }

    fn format(&self) -> String {
        "pytorch".into()
    }
}
