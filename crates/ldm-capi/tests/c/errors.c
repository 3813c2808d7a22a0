/* Reaches every LdmStatus from C and checks the message of ldm_last_error().
 *
 *   errors TXT2IMG_MODEL SUPERRES_MODEL BAD_MODEL UNSUPPORTED_MODEL NAN_MODEL SCRATCH_DIR
 *
 * BAD_MODEL has an invalid model_index.json, UNSUPPORTED_MODEL names a UNet class the library
 * does not have, NAN_MODEL is the super-resolution model with NaN decoder weights, SCRATCH_DIR is
 * an empty folder. Prints one line per check and the statuses reached; exits 1 on any mismatch. */
#include "ldm.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;
static int reached[LDM_ERR_INTERNAL + 1];

/* Checks a call's status, that its message names `needle`, and that its out-parameter is NULL. */
static void expect(const char *what, LdmStatus got, LdmStatus want, const char *needle, const void *out) {
    const char *msg = ldm_last_error();
    int ok = got == want && (want == LDM_OK ? msg[0] == '\0' : strstr(msg, needle) != NULL) && (want == LDM_OK || out == NULL);
    printf("%s %-28s %-26s %s\n", ok ? "ok  " : "FAIL", what, ldm_status_name((int)got), msg);
    if (!ok) {
        printf("     expected %s with a message containing \"%s\"%s\n", ldm_status_name((int)want), needle, out ? " and a NULL out" : "");
        failures++;
    }
    if (got >= 0 && got <= LDM_ERR_INTERNAL && ok) reached[got] = 1;
}

static bool cancel_at_first_step(void *user, uint32_t step, uint32_t total) {
    (void)user; (void)step; (void)total;
    return false;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: errors TXT2IMG SUPERRES BAD UNSUPPORTED NAN SCRATCH_DIR\n");
        return 2;
    }
    const char *txt2img_model = argv[1], *sr_model = argv[2], *bad_model = argv[3];
    const char *unsupported_model = argv[4], *nan_model = argv[5], *scratch = argv[6];
    LdmPipeline *p = (LdmPipeline *)1, *sr = NULL, *q = (LdmPipeline *)1;
    LdmImages *im = (LdmImages *)1;
    LdmStatus s;

    /* Loading. */
    s = ldm_pipeline_load(NULL, NULL, &q);
    expect("load NULL model", s, LDM_ERR_INVALID_ARGUMENT, "`model` is NULL", q);
    s = ldm_pipeline_load(txt2img_model, NULL, NULL);
    expect("load NULL out", s, LDM_ERR_INVALID_ARGUMENT, "`out` is NULL", NULL);
    s = ldm_pipeline_load("\xff\xfe", NULL, &q);
    expect("load invalid UTF-8", s, LDM_ERR_INVALID_ARGUMENT, "model is not valid UTF-8", q);
    s = ldm_pipeline_load("/no/such/model", NULL, &q);
    expect("load missing folder", s, LDM_ERR_NOT_FOUND, "/no/such/model", q);
    s = ldm_pipeline_load("no-such-org/no-such-model", NULL, &q);
    expect("load uncached hub id", s, LDM_ERR_NOT_FOUND, "no-such-org/no-such-model", q);
    s = ldm_pipeline_load(bad_model, NULL, &q);
    expect("load bad model_index.json", s, LDM_ERR_BAD_MODEL, "model_index.json", q);
    s = ldm_pipeline_load(unsupported_model, NULL, &q);
    expect("load unknown class", s, LDM_ERR_UNSUPPORTED, "UNet3DConditionModel", q);

    LdmLoadOptions o = ldm_load_options_default();
    o.device = 7;
    s = ldm_pipeline_load(txt2img_model, &o, &q);
    expect("load device 7", s, LDM_ERR_INVALID_ARGUMENT, "options->device is 7", q);
    o = ldm_load_options_default();
    o.struct_size = 3;
    s = ldm_pipeline_load(txt2img_model, &o, &q);
    expect("load struct_size 3", s, LDM_ERR_INVALID_ARGUMENT, "options->struct_size is 3", q);
    o = ldm_load_options_default();
    o.threads = 5000;
    s = ldm_pipeline_load(txt2img_model, &o, &q);
    expect("load 5000 threads", s, LDM_ERR_INVALID_ARGUMENT, "threads 5000", q);
    o = ldm_load_options_default();
    o.cache_dir = "\xc3\x28";
    s = ldm_pipeline_load(txt2img_model, &o, &q);
    expect("load cache_dir not UTF-8", s, LDM_ERR_INVALID_ARGUMENT, "options->cache_dir is not valid UTF-8", q);
    o = ldm_load_options_default();
    o.precision = 9;
    s = ldm_pipeline_load(txt2img_model, &o, &q);
    expect("load precision 9", s, LDM_ERR_INVALID_ARGUMENT, "options->precision is 9", q);
    o = ldm_load_options_default();
    o.precision = LDM_PRECISION_BF16;
    o.device = LDM_DEVICE_GPU;
    s = ldm_pipeline_load(txt2img_model, &o, &q);
    expect("load bf16 on the GPU", s, LDM_ERR_INVALID_ARGUMENT, "needs options->device LDM_DEVICE_CPU", q);

    o = ldm_load_options_default();
    o.offline = 1;
    s = ldm_pipeline_load(txt2img_model, &o, &p);
    expect("load txt2img", s, LDM_OK, "", p);
    s = ldm_pipeline_load(sr_model, NULL, &sr);
    expect("load superres", s, LDM_OK, "", sr);
    if (!p || !sr) return 1;
    if (ldm_pipeline_kind(p) != LDM_PIPELINE_TXT2IMG || ldm_pipeline_kind(sr) != LDM_PIPELINE_SUPERRES || ldm_pipeline_kind(NULL) != LDM_PIPELINE_NONE) {
        printf("FAIL ldm_pipeline_kind\n");
        failures++;
    }

    /* Text to image. */
    const char *prompt = "a red circle";
    const char *bad_utf8 = "caf\xe9";
    const char *null_prompt[1] = {NULL};
    LdmTxt2ImgParams t, t0 = ldm_txt2img_params_default();
    t0.prompts = &prompt;
    t0.prompt_count = 1;
    t0.steps = 2;

    s = ldm_txt2img(NULL, &t0, &im);
    expect("txt2img NULL pipeline", s, LDM_ERR_INVALID_ARGUMENT, "`pipeline` is NULL", im);
    s = ldm_txt2img(p, NULL, &im);
    expect("txt2img NULL params", s, LDM_ERR_INVALID_ARGUMENT, "`params` is NULL", im);
    s = ldm_txt2img(p, &t0, NULL);
    expect("txt2img NULL out", s, LDM_ERR_INVALID_ARGUMENT, "`out` is NULL", NULL);
    t = t0; t.struct_size = 8;
    s = ldm_txt2img(p, &t, &im);
    expect("txt2img struct_size 8", s, LDM_ERR_INVALID_ARGUMENT, "params->struct_size is 8", im);
    t = t0; t.prompt_count = 0;
    s = ldm_txt2img(p, &t, &im);
    expect("txt2img no prompt", s, LDM_ERR_INVALID_ARGUMENT, "prompt_count is 0", im);
    t = t0; t.prompt_count = SIZE_MAX;
    s = ldm_txt2img(p, &t, &im);
    expect("txt2img SIZE_MAX prompts", s, LDM_ERR_INVALID_ARGUMENT, "at most 64 prompts", im);
    t = t0; t.prompts = NULL;
    s = ldm_txt2img(p, &t, &im);
    expect("txt2img NULL prompts", s, LDM_ERR_INVALID_ARGUMENT, "`params->prompts` is NULL", im);
    t = t0; t.prompts = null_prompt;
    s = ldm_txt2img(p, &t, &im);
    expect("txt2img NULL prompt", s, LDM_ERR_INVALID_ARGUMENT, "`params->prompts[0]` is NULL", im);
    t = t0; t.prompts = &bad_utf8;
    s = ldm_txt2img(p, &t, &im);
    expect("txt2img prompt not UTF-8", s, LDM_ERR_INVALID_ARGUMENT, "params->prompts[0] is not valid UTF-8 (invalid byte at offset 3)", im);
    t = t0; t.height = 60;
    s = ldm_txt2img(p, &t, &im);
    expect("txt2img height 60", s, LDM_ERR_INVALID_ARGUMENT, "height 60", im);
    t = t0; t.width = 4000000000u;
    s = ldm_txt2img(p, &t, &im);
    expect("txt2img width 4e9", s, LDM_ERR_INVALID_ARGUMENT, "width 4000000000", im);
    t = t0; t.steps = 0;
    s = ldm_txt2img(p, &t, &im);
    expect("txt2img 0 steps", s, LDM_ERR_INVALID_ARGUMENT, "0 inference steps", im);
    t = t0; t.scheduler = "heun";
    s = ldm_txt2img(p, &t, &im);
    expect("txt2img scheduler heun", s, LDM_ERR_INVALID_ARGUMENT, "unknown scheduler `heun`", im);
    t = t0; t.scheduler = bad_utf8;
    s = ldm_txt2img(p, &t, &im);
    expect("txt2img scheduler not UTF-8", s, LDM_ERR_INVALID_ARGUMENT, "params->scheduler is not valid UTF-8", im);
    t = t0; t.guidance = NAN;
    s = ldm_txt2img(p, &t, &im);
    expect("txt2img guidance NaN", s, LDM_ERR_INVALID_ARGUMENT, "guidance must be a finite number", im);
    t = t0; t.eta = -1.0f;
    s = ldm_txt2img(p, &t, &im);
    expect("txt2img eta -1", s, LDM_ERR_INVALID_ARGUMENT, "eta must be >= 0", im);
    float latents[5] = {0};
    t = t0; t.latents = latents; t.latent_count = 5;
    s = ldm_txt2img(p, &t, &im);
    expect("txt2img 5 latents", s, LDM_ERR_INVALID_ARGUMENT, "latent_count is 5, but this run's initial latents have shape [1, 4, 8, 8]: 256 floats", im);
    t = t0; t.latent_count = 5;
    s = ldm_txt2img(p, &t, &im);
    expect("txt2img latents NULL", s, LDM_ERR_INVALID_ARGUMENT, "params->latents is NULL", im);
    s = ldm_txt2img(sr, &t0, &im);
    expect("txt2img on superres model", s, LDM_ERR_INVALID_ARGUMENT, "is a super-resolution model", im);
    /* 64 prompts of 8192 x 8192 pixels: refused before anything is allocated. */
    const char *many[64];
    for (int i = 0; i < 64; i++) many[i] = prompt;
    t = t0; t.prompts = many; t.prompt_count = 64; t.height = 8192; t.width = 8192; t.guidance = 3.0f;
    s = ldm_txt2img(p, &t, &im);
    expect("txt2img 64 x 8192^2", s, LDM_ERR_OUT_OF_MEMORY, "of memory", im);
    t = t0; t.progress = cancel_at_first_step;
    s = ldm_txt2img(p, &t, &im);
    expect("txt2img cancelled", s, LDM_CANCELLED, "cancelled: the progress callback returned false", im);
    s = ldm_txt2img(p, &t0, &im);
    expect("txt2img", s, LDM_OK, "", im);

    /* Images. */
    char path[4096];
    s = ldm_images_write_png(im, 1, "x.png");
    expect("write_png index 1 of 1", s, LDM_ERR_INVALID_ARGUMENT, "index 1 is out of range", NULL);
    s = ldm_images_write_png(NULL, 0, "x.png");
    expect("write_png NULL images", s, LDM_ERR_INVALID_ARGUMENT, "`images` is NULL", NULL);
    s = ldm_images_write_png(im, 0, NULL);
    expect("write_png NULL path", s, LDM_ERR_INVALID_ARGUMENT, "`path` is NULL", NULL);
    s = ldm_images_write_png(im, 0, scratch);
    expect("write_png to a folder", s, LDM_ERR_INVALID_ARGUMENT, scratch, NULL);
    s = ldm_images_write_png(im, 0, "/no/such/dir/x.png");
    expect("write_png missing folder", s, LDM_ERR_NOT_FOUND, "/no/such/dir/x.png", NULL);
    snprintf(path, sizeof path, "%s/out.png", scratch);
    s = ldm_images_write_png(im, 0, path);
    expect("write_png", s, LDM_OK, "", NULL);
    ldm_images_free(im);
    im = (LdmImages *)1;

    const unsigned char not_an_image[] = "plain text, not an image";
    s = ldm_decode_image(not_an_image, sizeof not_an_image, &im);
    expect("decode text", s, LDM_ERR_INVALID_ARGUMENT, "the image", im);
    s = ldm_decode_image(NULL, 10, &im);
    expect("decode NULL", s, LDM_ERR_INVALID_ARGUMENT, "`data` is NULL", im);

    /* Super-resolution. */
    static unsigned char rgb[64 * 64 * 3];
    LdmSuperResParams r, r0 = ldm_superres_params_default();
    r0.rgb = rgb; r0.width = 32; r0.height = 32; r0.steps = 2;
    s = ldm_superres(NULL, &r0, &im);
    expect("superres NULL pipeline", s, LDM_ERR_INVALID_ARGUMENT, "`pipeline` is NULL", im);
    s = ldm_superres(sr, NULL, &im);
    expect("superres NULL params", s, LDM_ERR_INVALID_ARGUMENT, "`params` is NULL", im);
    r = r0; r.struct_size = 1000;
    s = ldm_superres(sr, &r, &im);
    expect("superres struct_size 1000", s, LDM_ERR_INVALID_ARGUMENT, "params->struct_size is 1000", im);
    r = r0; r.rgb = NULL;
    s = ldm_superres(sr, &r, &im);
    expect("superres NULL rgb", s, LDM_ERR_INVALID_ARGUMENT, "`params->rgb` is NULL", im);
    r = r0; r.width = 1u << 30; r.height = 1u << 30;
    s = ldm_superres(sr, &r, &im);
    expect("superres 2^30 x 2^30", s, LDM_ERR_INVALID_ARGUMENT, "at most 4096", im);
    r = r0; r.width = 16; r.height = 16;
    s = ldm_superres(sr, &r, &im);
    expect("superres 16 x 16", s, LDM_ERR_INVALID_ARGUMENT, "at least 32x32", im);
    r = r0; r.scheduler = "heun";
    s = ldm_superres(sr, &r, &im);
    expect("superres scheduler heun", s, LDM_ERR_INVALID_ARGUMENT, "unknown scheduler `heun`", im);
    r = r0; r.eta = INFINITY;
    s = ldm_superres(sr, &r, &im);
    expect("superres eta inf", s, LDM_ERR_INVALID_ARGUMENT, "eta must be a finite number", im);
    s = ldm_superres(p, &r0, &im);
    expect("superres on txt2img model", s, LDM_ERR_INVALID_ARGUMENT, "is a text-to-image model", im);
    r = r0; r.progress = cancel_at_first_step;
    s = ldm_superres(sr, &r, &im);
    expect("superres cancelled", s, LDM_CANCELLED, "cancelled", im);
    s = ldm_superres(sr, &r0, &im);
    expect("superres", s, LDM_OK, "", im);
    if (im && (im->width != 128 || im->height != 128 || im->count != 1)) {
        printf("FAIL superres output is %ux%u x%u\n", im->width, im->height, im->count);
        failures++;
    }
    ldm_images_free(im);
    im = (LdmImages *)1;

    /* A model whose decoder weights are NaN fails when loaded or when run, never with a black image. */
    s = ldm_pipeline_load(nan_model, NULL, &q);
    if (s == LDM_OK) {
        s = ldm_superres(q, &r0, &im);
        expect("superres with NaN weights", s, LDM_ERR_BAD_MODEL, "NaN", im);
        ldm_pipeline_free(q);
    } else {
        expect("load NaN weights", s, LDM_ERR_BAD_MODEL, "NaN", q);
    }

    ldm_pipeline_free(p);
    ldm_pipeline_free(sr);
    ldm_pipeline_free(NULL);
    ldm_images_free(NULL);

    printf("reached:");
    for (int i = 0; i <= LDM_ERR_INTERNAL; i++)
        if (reached[i]) printf(" %s", ldm_status_name(i));
    printf("\nunknown status name: %s\n", ldm_status_name(42));
    printf("version: %s\n", ldm_version());
    printf("%d failure(s)\n", failures);
    return failures ? 1 : 0;
}
