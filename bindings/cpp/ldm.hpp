// ldm.hpp: a C++17 RAII layer over the C ABI of ldm (ldm.h). Header-only; link with -lldm.
//
//     ldm::Pipeline pipeline("path/to/model");
//     ldm::Txt2Img params;                       // the pipeline's defaults
//     params.prompts = {"a red circle"};
//     params.steps = 20;
//     ldm::Images images = pipeline.txt2img(params);
//     images.write_png(0, "out.png");
//
// Failures throw ldm::Error (status() and what() = ldm_last_error()); a run cancelled by its
// progress callback throws ldm::Cancelled; an exception thrown by the progress callback cancels
// the run and is rethrown to the caller. Thread safety is the C ABI's: a Pipeline may be shared by
// several threads calling txt2img()/superres() at once (they are const); it must outlive them.
#ifndef LDM_HPP
#define LDM_HPP

#include "ldm.h"

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace ldm {

/// A failed call: the LdmStatus and the message of ldm_last_error().
class Error : public std::runtime_error {
public:
    Error(LdmStatus status, const std::string &message) : std::runtime_error(message), status_(status) {}
    LdmStatus status() const noexcept { return status_; }
    /// "LDM_ERR_NOT_FOUND", ...
    const char *status_name() const noexcept { return ldm_status_name(static_cast<int>(status_)); }

private:
    LdmStatus status_;
};

/// The progress callback returned false.
class Cancelled : public Error {
public:
    using Error::Error;
};

/// Throws for a status other than LDM_OK (call right after the C function, on the same thread).
inline void check(LdmStatus status) {
    if (status == LDM_OK) return;
    if (status == LDM_CANCELLED) throw Cancelled(status, ldm_last_error());
    throw Error(status, ldm_last_error());
}

/// Images made by the library (owns an LdmImages *). Move-only.
class Images {
public:
    Images() noexcept = default;
    explicit Images(LdmImages *images) noexcept : p_(images) {}
    ~Images() { ldm_images_free(p_); }
    Images(Images &&o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
    Images &operator=(Images &&o) noexcept {
        if (this != &o) {
            ldm_images_free(p_);
            p_ = std::exchange(o.p_, nullptr);
        }
        return *this;
    }
    Images(const Images &) = delete;
    Images &operator=(const Images &) = delete;

    /// Decodes a PNG, JPEG or WebP file held in memory.
    static Images decode(const void *data, std::size_t len) {
        LdmImages *out = nullptr;
        check(ldm_decode_image(static_cast<const uint8_t *>(data), len, &out));
        return Images(out);
    }

    explicit operator bool() const noexcept { return p_ != nullptr; }
    uint32_t count() const noexcept { return p_ ? p_->count : 0; }
    uint32_t width() const noexcept { return p_ ? p_->width : 0; }
    uint32_t height() const noexcept { return p_ ? p_->height : 0; }
    /// Values per image: height * width * 3.
    std::size_t image_size() const noexcept { return std::size_t(height()) * width() * 3; }
    /// Image i as 8-bit RGB, row-major (image_size() bytes).
    const uint8_t *rgb8(uint32_t i = 0) const noexcept { return p_->rgb8 + i * image_size(); }
    /// Image i as floats in [0, 1] (image_size() values).
    const float *rgb_f32(uint32_t i = 0) const noexcept { return p_->rgb_f32 + i * image_size(); }
    /// Every image's floats, one after another.
    std::vector<float> floats() const { return p_ ? std::vector<float>(p_->rgb_f32, p_->rgb_f32 + count() * image_size()) : std::vector<float>(); }
    /// Writes image i as a PNG file.
    void write_png(uint32_t i, const std::string &path) const { check(ldm_images_write_png(p_, i, path.c_str())); }
    const LdmImages *get() const noexcept { return p_; }

private:
    LdmImages *p_ = nullptr;
};

/// Called with (step, total_steps) before each model call and once at the end; return false to
/// cancel. May run on one of the pipeline's threads (see ldm.h).
using Progress = std::function<bool(uint32_t step, uint32_t total_steps)>;

/// Text-to-image parameters; the constructor takes the pipeline's defaults from the library.
struct Txt2Img {
    std::vector<std::string> prompts;
    uint32_t steps, height, width;
    float guidance, eta;
    uint64_t seed;
    std::string scheduler;      ///< empty: the model's own
    std::vector<float> latents; ///< empty: drawn from the seed
    Progress progress;

    Txt2Img() {
        LdmTxt2ImgParams d = ldm_txt2img_params_default();
        steps = d.steps;
        height = d.height;
        width = d.width;
        guidance = d.guidance;
        eta = d.eta;
        seed = d.seed;
    }
};

/// Super-resolution parameters; the constructor takes the pipeline's defaults from the library.
struct SuperRes {
    const uint8_t *rgb = nullptr; ///< width * height * 3 bytes, read during the call
    uint32_t width = 0, height = 0;
    uint32_t steps;
    float eta;
    uint64_t seed;
    std::string scheduler; ///< empty: the model's own
    Progress progress;

    SuperRes() {
        LdmSuperResParams d = ldm_superres_params_default();
        steps = d.steps;
        eta = d.eta;
        seed = d.seed;
    }
};

namespace detail {
struct ProgressState {
    const Progress *fn;
    std::exception_ptr error;
};

// C++ exceptions must not cross the C ABI: one thrown by the user's callback cancels the run and
// is rethrown after it.
inline bool progress_trampoline(void *user, uint32_t step, uint32_t total) noexcept {
    auto *state = static_cast<ProgressState *>(user);
    try {
        return (*state->fn)(step, total);
    } catch (...) {
        state->error = std::current_exception();
        return false;
    }
}

inline void finish(LdmStatus status, ProgressState &state) {
    if (state.error) std::rethrow_exception(state.error);
    check(status);
}
} // namespace detail

/// Load options (LdmLoadOptions with the library's defaults).
inline LdmLoadOptions load_options(uint32_t threads = 0) {
    LdmLoadOptions o = ldm_load_options_default();
    o.threads = threads;
    return o;
}

/// A loaded model (owns an LdmPipeline *). Move-only.
class Pipeline {
public:
    /// Loads a diffusers folder or hub id; throws ldm::Error on failure.
    explicit Pipeline(const std::string &model, const LdmLoadOptions &options = ldm_load_options_default()) {
        check(ldm_pipeline_load(model.c_str(), &options, &p_));
    }
    ~Pipeline() { ldm_pipeline_free(p_); }
    Pipeline(Pipeline &&o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
    Pipeline &operator=(Pipeline &&o) noexcept {
        if (this != &o) {
            ldm_pipeline_free(p_);
            p_ = std::exchange(o.p_, nullptr);
        }
        return *this;
    }
    Pipeline(const Pipeline &) = delete;
    Pipeline &operator=(const Pipeline &) = delete;

    LdmPipelineKind kind() const noexcept { return ldm_pipeline_kind(p_); }

    /// Text to image: one image per prompt.
    Images txt2img(const Txt2Img &t) const {
        std::vector<const char *> prompts;
        prompts.reserve(t.prompts.size());
        for (const auto &s : t.prompts) prompts.push_back(s.c_str());
        LdmTxt2ImgParams c = ldm_txt2img_params_default();
        c.prompts = prompts.data();
        c.prompt_count = prompts.size();
        c.steps = t.steps;
        c.guidance = t.guidance;
        c.eta = t.eta;
        c.seed = t.seed;
        c.height = t.height;
        c.width = t.width;
        c.scheduler = t.scheduler.empty() ? nullptr : t.scheduler.c_str();
        c.latents = t.latents.empty() ? nullptr : t.latents.data();
        c.latent_count = t.latents.size();
        detail::ProgressState state{&t.progress, nullptr};
        if (t.progress) {
            c.progress = detail::progress_trampoline;
            c.progress_user = &state;
        }
        LdmImages *out = nullptr;
        LdmStatus status = ldm_txt2img(p_, &c, &out);
        Images images(out);
        detail::finish(status, state);
        return images;
    }

    /// 4x super-resolution of one image.
    Images superres(const SuperRes &s) const {
        LdmSuperResParams c = ldm_superres_params_default();
        c.rgb = s.rgb;
        c.width = s.width;
        c.height = s.height;
        c.steps = s.steps;
        c.eta = s.eta;
        c.seed = s.seed;
        c.scheduler = s.scheduler.empty() ? nullptr : s.scheduler.c_str();
        detail::ProgressState state{&s.progress, nullptr};
        if (s.progress) {
            c.progress = detail::progress_trampoline;
            c.progress_user = &state;
        }
        LdmImages *out = nullptr;
        LdmStatus status = ldm_superres(p_, &c, &out);
        Images images(out);
        detail::finish(status, state);
        return images;
    }

    LdmPipeline *get() const noexcept { return p_; }

private:
    LdmPipeline *p_ = nullptr;
};

/// The library's version, e.g. "0.1.0".
inline std::string version() { return ldm_version(); }

} // namespace ldm

#endif // LDM_HPP
