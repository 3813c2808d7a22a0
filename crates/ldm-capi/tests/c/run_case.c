/* Runs one shared case (tests/cases) through the C ABI, as a small command line:
 *
 *   run_case OUT.f32 txt2img|superres MODEL [--prompt TEXT]... [--steps N] [--guidance G]
 *            [--eta E] [--seed S] [--scheduler NAME] [--height H] [--width W]
 *            [--latents FILE.f32] [--image FILE.png] [--threads N]
 *
 * --latents is raw little-endian float32; --image is decoded by ldm_decode_image(). Writes the
 * images' rgb_f32 values as raw float32 to OUT.f32 and prints "count height width". */
#include "ldm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void fail(const char *what, LdmStatus s) {
    fprintf(stderr, "%s: %s: %s\n", what, ldm_status_name(s), ldm_last_error());
    exit(1);
}

static unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(1); }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc(n > 0 ? (size_t)n : 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) { perror(path); exit(1); }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: run_case OUT.f32 txt2img|superres MODEL [--key value]...\n");
        return 2;
    }
    const char *out_path = argv[1], *kind = argv[2], *model = argv[3];
    const char *prompts[64];
    size_t prompt_count = 0;
    LdmTxt2ImgParams t = ldm_txt2img_params_default();
    LdmSuperResParams s = ldm_superres_params_default();
    LdmLoadOptions options = ldm_load_options_default();
    unsigned char *latents = NULL;
    LdmImages *input = NULL;
    for (int i = 4; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--prompt") && prompt_count < 64) prompts[prompt_count++] = v;
        else if (!strcmp(k, "--steps")) t.steps = s.steps = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(k, "--guidance")) t.guidance = strtof(v, NULL);
        else if (!strcmp(k, "--eta")) t.eta = s.eta = strtof(v, NULL);
        else if (!strcmp(k, "--seed")) t.seed = s.seed = strtoull(v, NULL, 10);
        else if (!strcmp(k, "--scheduler")) t.scheduler = s.scheduler = v;
        else if (!strcmp(k, "--height")) t.height = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(k, "--width")) t.width = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(k, "--threads")) options.threads = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(k, "--device")) options.device = strcmp(v, "gpu") ? LDM_DEVICE_CPU : LDM_DEVICE_GPU;
        else if (!strcmp(k, "--latents")) {
            size_t len;
            latents = read_file(v, &len);
            t.latents = (const float *)latents;
            t.latent_count = len / sizeof(float);
        } else if (!strcmp(k, "--image")) {
            size_t len;
            unsigned char *bytes = read_file(v, &len);
            LdmStatus st = ldm_decode_image(bytes, len, &input);
            free(bytes);
            if (st != LDM_OK) fail("ldm_decode_image", st);
        } else {
            fprintf(stderr, "unknown option %s\n", k);
            return 2;
        }
    }

    LdmPipeline *pipeline = NULL;
    LdmStatus st = ldm_pipeline_load(model, &options, &pipeline);
    if (st != LDM_OK) fail("ldm_pipeline_load", st);

    LdmImages *images = NULL;
    if (!strcmp(kind, "txt2img")) {
        if (ldm_pipeline_kind(pipeline) != LDM_PIPELINE_TXT2IMG) { fprintf(stderr, "not a txt2img model\n"); return 1; }
        t.prompts = prompts;
        t.prompt_count = prompt_count;
        st = ldm_txt2img(pipeline, &t, &images);
    } else {
        if (ldm_pipeline_kind(pipeline) != LDM_PIPELINE_SUPERRES || !input) { fprintf(stderr, "superres needs a superres model and --image\n"); return 1; }
        s.rgb = input->rgb8;
        s.width = input->width;
        s.height = input->height;
        st = ldm_superres(pipeline, &s, &images);
    }
    if (st != LDM_OK) fail(kind, st);

    size_t n = (size_t)images->count * images->height * images->width * 3;
    FILE *f = fopen(out_path, "wb");
    if (!f || fwrite(images->rgb_f32, sizeof(float), n, f) != n || fclose(f) != 0) { perror(out_path); return 1; }
    printf("%u %u %u\n", images->count, images->height, images->width);

    ldm_images_free(images);
    ldm_images_free(input);
    ldm_pipeline_free(pipeline);
    free(latents);
    return 0;
}
