/* Text to image with libldm, in C.
 *
 *   cc example.c $(pkg-config --cflags --libs ldm) -o example
 *   ./example MODEL "a red circle" out.png [STEPS]
 *
 * MODEL is a diffusers folder or a hub id such as CompVis/ldm-text2im-large-256. */
#include <ldm.h>

#include <stdio.h>
#include <stdlib.h>

static bool show_progress(void *user, uint32_t step, uint32_t total_steps) {
    (void)user;
    fprintf(stderr, "\rstep %u/%u", step, total_steps);
    return true; /* false would cancel the run */
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL PROMPT OUT.png [STEPS]\n", argv[0]);
        return 2;
    }
    const char *prompt = argv[2];
    LdmTxt2ImgParams params = ldm_txt2img_params_default();
    params.prompts = &prompt;
    params.prompt_count = 1;
    params.steps = argc > 4 ? (uint32_t)atoi(argv[4]) : 20;
    params.seed = 42;
    params.progress = show_progress;

    LdmPipeline *pipeline = NULL;
    LdmImages *images = NULL;
    LdmStatus status = ldm_pipeline_load(argv[1], NULL, &pipeline);
    if (status == LDM_OK) status = ldm_txt2img(pipeline, &params, &images);
    if (status == LDM_OK) status = ldm_images_write_png(images, 0, argv[3]);
    if (status == LDM_OK) printf("\nwrote %s (%ux%u)\n", argv[3], images->width, images->height);
    else fprintf(stderr, "\nerror: %s\n", ldm_last_error());

    ldm_images_free(images);
    ldm_pipeline_free(pipeline);
    return status == LDM_OK ? 0 : 1;
}
