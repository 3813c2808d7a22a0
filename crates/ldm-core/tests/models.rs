//! Parity of every model with diffusers on the fixtures (max abs error 1e-4, scaled by the
//! output's magnitude where it exceeds 1; see `common::assert_close`).

mod common;

use common::*;
use ldm_core::backend::cpu::Cpu;
use ldm_core::backend::Backend;
use ldm_core::models::{unet_2d, unet_2d_condition};

const TOL: f32 = 1e-4;

fn unet_cond_case(folder: &str, reference: &str) {
    let dir = fixtures().join(folder);
    let cfg = unet_2d_condition::read_config(&dir).unwrap();
    let w = weights(folder, &["diffusion_pytorch_model"]);
    let unet = unet_2d_condition::UNet2DConditionModel::load(cfg, &dir, &w).unwrap();
    assert!(w.unused().is_empty(), "unused tensors: {:?}", w.unused());
    let r = Reference::open(reference);
    let sample = r.tensor("sample");
    let ctx = r.tensor("encoder_hidden_states");
    let mut i = 0;
    while r.has(&format!("out_{i}")) {
        let t = r.f32(&format!("timestep_{i}"));
        let out = unet.forward(&sample, &t, &ctx).unwrap();
        assert_eq!(Cpu.dims(&out), r.shape(&format!("out_{i}")));
        assert_close(&format!("{folder} t={t:?}"), &Cpu.download(&out).unwrap(), &r.f32(&format!("out_{i}")), TOL);
        i += 1;
    }
    assert!(i >= 4, "expected several timesteps in {reference}");
}

#[test]
fn unet_2d_condition_conv_projection_matches_diffusers() {
    unet_cond_case("txt2img-tiny/unet", "unet_cond");
}

#[test]
fn unet_2d_condition_linear_projection_matches_diffusers() {
    unet_cond_case("unet-linear-proj", "unet_cond_linear");
}

#[test]
fn unet_2d_matches_diffusers_with_old_attention_names() {
    let folder = "superres-tiny/unet";
    let dir = fixtures().join(folder);
    let cfg = unet_2d::read_config(&dir).unwrap();
    let w = weights(folder, &["diffusion_pytorch_model"]);
    let unet = unet_2d::UNet2DModel::load(cfg, &dir, &w).unwrap();
    assert!(w.unused().is_empty(), "unused tensors: {:?}", w.unused());
    let r = Reference::open("unet2d");
    let sample = r.tensor("sample");
    let mut i = 0;
    while r.has(&format!("out_{i}")) {
        let t = r.f32(&format!("timestep_{i}"));
        let out = unet.forward(&sample, &t).unwrap();
        assert_close(&format!("unet2d t={t:?}"), &Cpu.download(&out).unwrap(), &r.f32(&format!("out_{i}")), TOL);
        i += 1;
    }
    assert!(i >= 4);
}

#[test]
fn ldm_bert_matches_transformers_on_recorded_token_ids() {
    use ldm_core::models::ldm_bert;
    let folder = "txt2img-tiny/bert";
    let dir = fixtures().join(folder);
    let w = weights(folder, &["model", "pytorch_model"]);
    let bert = ldm_bert::LDMBertModel::load(ldm_bert::read_config(&dir).unwrap(), &dir, &w).unwrap();
    assert!(w.unused().is_empty(), "unused tensors: {:?}", w.unused());
    let tokens: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference/tokens.json")).unwrap()).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(tokens["input_ids"].clone()).unwrap();
    let out = bert.forward(&ids).unwrap();
    let r = Reference::open("bert");
    assert_eq!(Cpu.dims(&out), r.shape("last_hidden_state"));
    assert_close("ldm_bert", &Cpu.download(&out).unwrap(), &r.f32("last_hidden_state"), TOL);
}

#[test]
fn autoencoder_kl_decode_and_encode_match_diffusers() {
    use ldm_core::models::autoencoder_kl;
    let folder = "txt2img-tiny/vqvae";
    let dir = fixtures().join(folder);
    let w = weights(folder, &["diffusion_pytorch_model"]);
    let vae = autoencoder_kl::AutoencoderKL::load(autoencoder_kl::read_config(&dir).unwrap(), &dir, &w).unwrap();
    assert!(w.unused().is_empty(), "unused tensors: {:?}", w.unused());
    let r = Reference::open("vae_kl");
    let dec = vae.decode(&r.tensor("latents")).unwrap();
    assert_eq!(Cpu.dims(&dec), r.shape("decoded"));
    assert_close("vae_kl decode", &Cpu.download(&dec).unwrap(), &r.f32("decoded"), TOL);
    let x = vae.decoder_input(&r.tensor("latents")).unwrap();
    let err = tiled_decode_error(&Cpu, vae.decoder(), &x, &r, "decoded");
    assert!(err <= TOL, "vae_kl tiled decode: max abs error {err:e}");
    let dist = vae.encode(&r.tensor("image")).unwrap();
    assert_close("vae_kl encode mean", &Cpu.download(&dist.mean).unwrap(), &r.f32("encoded_mean"), TOL);
    assert_close("vae_kl encode std", &Cpu.download(&dist.std).unwrap(), &r.f32("encoded_std"), TOL);
}

#[test]
fn vq_model_quantize_decode_and_encode_match_diffusers() {
    use ldm_core::models::vq_model;
    let folder = "superres-tiny/vqvae";
    let dir = fixtures().join(folder);
    let w = weights(folder, &["diffusion_pytorch_model"]);
    let vq = vq_model::VQModel::load(vq_model::read_config(&dir).unwrap(), &dir, &w).unwrap();
    assert!(w.unused().is_empty(), "unused tensors: {:?}", w.unused());
    let r = Reference::open("vq");
    let latents = r.tensor("latents");
    let q = vq.quantize(&latents).unwrap();
    assert_close("vq quantized", &Cpu.download(&q).unwrap(), &r.f32("quantized"), TOL);
    let dec = vq.decode(&latents, false).unwrap();
    assert_eq!(Cpu.dims(&dec), r.shape("decoded"));
    assert_close("vq decode", &Cpu.download(&dec).unwrap(), &r.f32("decoded"), TOL);
    let err = tiled_decode_error(&Cpu, vq.decoder(), &vq.decoder_input(&latents, false).unwrap(), &r, "decoded");
    assert!(err <= TOL, "vq tiled decode: max abs error {err:e}");
    let dec = vq.decode(&latents, true).unwrap();
    assert_close("vq decode unquantized", &Cpu.download(&dec).unwrap(), &r.f32("decoded_force_not_quantize"), TOL);
    let enc = vq.encode(&r.tensor("image")).unwrap();
    assert_close("vq encode", &Cpu.download(&enc).unwrap(), &r.f32("encoded"), TOL);
}

/// A weight source that records the names of the tensors read from it.
struct Recording(Box<dyn ldm_core::loading::TensorSource>, std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl ldm_core::loading::TensorSource for Recording {
    fn names(&self) -> Vec<String> {
        self.0.names()
    }
    fn meta(&self, name: &str) -> Option<ldm_core::loading::TensorMeta> {
        self.0.meta(name)
    }
    fn load_f32(&self, name: &str) -> ldm_core::Result<Vec<f32>> {
        self.1.lock().unwrap().push(name.to_string());
        self.0.load_f32(name)
    }
    fn location(&self, name: Option<&str>) -> String {
        self.0.location(name)
    }
    fn format(&self) -> String {
        self.0.format()
    }
}

/// The pipelines load their autoencoder's decoding half only: the encoder's tensors are never
/// read (so take no memory), none is reported unused, decoding is unchanged, and encoding is
/// refused with a message naming the whole-model loader.
#[test]
fn autoencoders_loaded_for_decoding_read_no_encoder_tensor_and_decode_the_same() {
    use ldm_core::loading::find_weights;
    use ldm_core::models::{autoencoder_kl, vq_model};
    use ldm_core::nn::Weights;
    use std::sync::{Arc, Mutex};
    // a component's folder and its weights, recording what is read
    let open = |folder: &str| {
        let read = Arc::new(Mutex::new(Vec::new()));
        let src = find_weights(&fixtures().join(folder), &["diffusion_pytorch_model"]).unwrap();
        (fixtures().join(folder), Weights::new(Cpu, Box::new(Recording(src, read.clone()))), read)
    };
    let check = |what: &str, w: &Weights<Cpu>, read: &Mutex<Vec<String>>| {
        assert!(w.unused().is_empty(), "{what}: unused tensors: {:?}", w.unused());
        let read = read.lock().unwrap();
        assert!(read.iter().any(|n| n.starts_with("decoder.")), "{what}: no decoder tensor read");
        let enc: Vec<_> = read.iter().filter(|n| n.starts_with("encoder.") || n.starts_with("quant_conv.")).collect();
        assert!(enc.is_empty(), "{what}: encoder tensors read: {enc:?}");
    };

    let (dir, w, read) = open("txt2img-tiny/vqvae");
    let vae = autoencoder_kl::AutoencoderKL::load_decoder(autoencoder_kl::read_config(&dir).unwrap(), &dir, &w).unwrap();
    check("AutoencoderKL", &w, &read);
    let r = Reference::open("vae_kl");
    assert_close("vae_kl decode (decoder only)", &Cpu.download(&vae.decode(&r.tensor("latents")).unwrap()).unwrap(), &r.f32("decoded"), TOL);
    let err = vae.encode(&r.tensor("image")).err().expect("a decoder-only AutoencoderKL encoded");
    assert!(err.to_string().contains("AutoencoderKL::load to encode"), "{err}");

    let (dir, w, read) = open("superres-tiny/vqvae");
    let vq = vq_model::VQModel::load_decoder(vq_model::read_config(&dir).unwrap(), &dir, &w).unwrap();
    check("VQModel", &w, &read);
    let r = Reference::open("vq");
    assert_close("vq decode (decoder only)", &Cpu.download(&vq.decode(&r.tensor("latents"), false).unwrap()).unwrap(), &r.f32("decoded"), TOL);
    let err = vq.encode(&r.tensor("image")).err().expect("a decoder-only VQModel encoded");
    assert!(err.to_string().contains("VQModel::load to encode"), "{err}");
}
