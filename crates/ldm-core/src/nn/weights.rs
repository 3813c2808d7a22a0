//! Named weights for model construction: a prefix path into a [`TensorSource`], with shape
//! checks that name the tensor and both shapes, and a record of which tensors were used.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::backend::Backend;
use crate::loading::TensorSource;
use crate::{Error, Result};

struct Inner<B> {
    backend: B,
    source: Box<dyn TensorSource>,
    used: Mutex<BTreeSet<String>>,
}

/// A view of a weight set under a key prefix, e.g. `down_blocks.0.resnets.1`.
pub struct Weights<B: Backend> {
    inner: Arc<Inner<B>>,
    prefix: String,
}

impl<B: Backend> Clone for Weights<B> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), prefix: self.prefix.clone() }
    }
}

impl<B: Backend> Weights<B> {
    pub fn new(backend: B, source: Box<dyn TensorSource>) -> Self {
        Self { inner: Arc::new(Inner { backend, source, used: Mutex::new(BTreeSet::new()) }), prefix: String::new() }
    }

    pub fn backend(&self) -> &B {
        &self.inner.backend
    }

    pub fn source(&self) -> &dyn TensorSource {
        self.inner.source.as_ref()
    }

    /// The view one level down: `pp("down_blocks").pp(0)`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix =
            if self.prefix.is_empty() { name.to_string() } else { format!("{}.{}", self.prefix, name) };
        Self { inner: self.inner.clone(), prefix }
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.inner.source.meta(&self.key(name)).is_some()
    }

    /// The tensor `name` under this prefix, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<B::Tensor> {
        let data = self.read(name, shape)?;
        self.inner.backend.upload_weight(data, shape)
    }

    /// The weight `(out, in)` of a linear layer, in the memory layout the backend's `linear`
    /// reads fastest ([`Backend::upload_linear_weight`]); checked as [`Weights::get`].
    pub fn get_linear(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<B::Tensor> {
        let data = self.read(name, &[out_dim, in_dim])?;
        self.inner.backend.upload_linear_weight(data, out_dim, in_dim)
    }

    /// The weight `(o, c, k, k)` of a convolution, in the layout the backend's `conv2d` reads
    /// fastest ([`Backend::upload_conv_weight`]); checked as [`Weights::get`].
    pub fn get_conv(&self, name: &str, shape: [usize; 4]) -> Result<B::Tensor> {
        let data = self.read(name, &shape)?;
        self.inner.backend.upload_conv_weight(data, shape)
    }

    /// The float32 values of tensor `name`, once its shape is checked and its values are finite.
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let key = self.key(name);
        let src = &self.inner.source;
        let meta = src
            .meta(&key)
            .ok_or_else(|| Error::MissingWeight { file: src.location(None), name: key.clone() })?;
        if meta.shape != shape {
            return Err(Error::ShapeMismatch {
                file: src.location(Some(&key)),
                name: key,
                expected: shape.to_vec(),
                found: meta.shape,
            });
        }
        let data = src.load_f32(&key)?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::BadWeights {
                path: src.location(Some(&key)).into(),
                msg: format!("tensor `{key}` holds a non-finite value ({}) at index {i}", data[i]),
            });
        }
        self.inner.used.lock().map_err(|_| Error::Backend("weights lock poisoned".into()))?.insert(key);
        Ok(data)
    }

    /// Marks every tensor under this prefix as accounted for without reading it: a part of a
    /// checkpoint the model deliberately leaves out (an autoencoder loaded for decoding only
    /// skips its encoder), so that [`Weights::unused`] does not report it.
    pub fn skip(&self) -> Result<()> {
        let dotted = format!("{}.", self.prefix);
        let names = self.inner.source.names().into_iter().filter(|n| self.prefix.is_empty() || n.starts_with(&dotted));
        self.inner.used.lock().map_err(|_| Error::Backend("weights lock poisoned".into()))?.extend(names);
        Ok(())
    }

    /// Tensors in the source that no layer asked for (an extra tensor usually means the config
    /// and the weights disagree).
    pub fn unused(&self) -> Vec<String> {
        let used = match self.inner.used.lock() {
            Ok(u) => u.clone(),
            Err(_) => return Vec::new(),
        };
        let mut names: Vec<String> = self.inner.source.names().into_iter().filter(|n| !used.contains(n)).collect();
        names.sort();
        names
    }
}
