/* Load, generate and free, twice over, with the other calls that hand out memory (decoding an
 * image, failures that set a message): run under valgrind by the tests, which must find no
 * definite leak and no memory error. Super-resolution is loaded but not run here: under valgrind
 * one run of it costs half a minute.
 *
 *   leak_loop TXT2IMG_MODEL SUPERRES_MODEL SCRATCH.png */
#include "ldm.h"

#include <stdio.h>
#include <stdlib.h>

static unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc(*len);
    if (buf && fread(buf, 1, *len, f) != *len) { free(buf); buf = NULL; }
    fclose(f);
    return buf;
}

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    for (int round = 0; round < 2; round++) {
        LdmLoadOptions o = ldm_load_options_default();
        o.threads = (uint32_t)round; /* the caller's thread, then a pool of one thread */
        LdmPipeline *p = NULL, *sr = NULL;
        if (ldm_pipeline_load(argv[1], &o, &p) != LDM_OK) { printf("load: %s\n", ldm_last_error()); return 1; }
        if (ldm_pipeline_load(argv[2], &o, &sr) != LDM_OK) { printf("load: %s\n", ldm_last_error()); return 1; }

        const char *prompt = "a red circle";
        LdmTxt2ImgParams t = ldm_txt2img_params_default();
        t.prompts = &prompt;
        t.prompt_count = 1;
        t.steps = 1;
        t.height = t.width = 32; /* a quarter of the model's size: valgrind is slow */
        LdmImages *im = NULL;
        if (ldm_txt2img(p, &t, &im) != LDM_OK) { printf("txt2img: %s\n", ldm_last_error()); return 1; }
        printf("round %d: txt2img %u x %ux%u, first value %f\n", round, im->count, im->width, im->height, (double)im->rgb_f32[0]);

        /* Written as PNG and decoded again. */
        size_t len = 0;
        unsigned char *png = NULL;
        LdmImages *decoded = NULL;
        if (ldm_images_write_png(im, 0, argv[3]) != LDM_OK || !(png = read_file(argv[3], &len)) ||
            ldm_decode_image(png, len, &decoded) != LDM_OK) {
            printf("png: %s\n", ldm_last_error());
            return 1;
        }
        printf("round %d: decoded %ux%u, first byte %u of %u\n", round, decoded->width, decoded->height, decoded->rgb8[0], im->rgb8[0]);

        /* Failures allocate their message; it must be freed too. */
        LdmImages *none = NULL;
        LdmPipeline *missing = NULL;
        t.steps = 0;
        if (ldm_txt2img(p, &t, &none) == LDM_OK || ldm_pipeline_load("/no/such/model", NULL, &missing) == LDM_OK) return 1;
        printf("round %d: %s\n", round, ldm_last_error());

        free(png);
        ldm_images_free(decoded);
        ldm_images_free(im);
        ldm_pipeline_free(p);
        ldm_pipeline_free(sr);
    }
    return 0;
}
