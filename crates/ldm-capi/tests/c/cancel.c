/* Cancelling from the progress callback, on the caller's thread (threads = 0) and on the
 * pipeline's own threads (threads = 2).
 *
 *   cancel TXT2IMG_MODEL SUPERRES_MODEL
 *
 * Prints every callback call; exits 1 on any failed check. */
#include "ldm.h"

#include <stdio.h>
#include <string.h>

typedef struct {
    int calls;
    uint32_t steps[64], totals[64];
    uint32_t cancel_at; /* return false when step == cancel_at */
} Record;

static bool on_progress(void *user, uint32_t step, uint32_t total) {
    Record *r = user;
    if (r->calls < 64) {
        r->steps[r->calls] = step;
        r->totals[r->calls] = total;
    }
    r->calls++;
    return step != r->cancel_at;
}

static int failures = 0;

static void check(int ok, const char *what) {
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok) failures++;
}

static void show(const char *what, const Record *r) {
    printf("%s: %d call(s):", what, r->calls);
    for (int i = 0; i < r->calls && i < 64; i++) printf(" %u/%u", r->steps[i], r->totals[i]);
    printf("\n");
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: cancel TXT2IMG SUPERRES\n");
        return 2;
    }
    for (uint32_t threads = 0; threads <= 2; threads += 2) {
        printf("threads = %u\n", threads);
        LdmLoadOptions o = ldm_load_options_default();
        o.threads = threads;
        LdmPipeline *p = NULL, *sr = NULL;
        if (ldm_pipeline_load(argv[1], &o, &p) != LDM_OK || ldm_pipeline_load(argv[2], &o, &sr) != LDM_OK) {
            printf("FAIL load: %s\n", ldm_last_error());
            return 1;
        }
        const char *prompt = "a red circle";
        LdmTxt2ImgParams t = ldm_txt2img_params_default();
        t.prompts = &prompt;
        t.prompt_count = 1;
        t.steps = 3;
        t.progress = on_progress;

        /* Cancelled at step 1: the callback saw steps 0 and 1, then nothing more. */
        Record r = {.cancel_at = 1};
        t.progress_user = &r;
        LdmImages *im = (LdmImages *)1;
        LdmStatus s = ldm_txt2img(p, &t, &im);
        show("txt2img cancelled at step 1", &r);
        check(s == LDM_CANCELLED, "txt2img returns LDM_CANCELLED");
        check(im == NULL, "no images");
        check(strstr(ldm_last_error(), "ldm_txt2img: cancelled") != NULL, ldm_last_error());
        check(r.calls == 2 && r.steps[0] == 0 && r.steps[1] == 1 && r.totals[0] == 3, "callback called for steps 0 and 1 of 3, then no more");

        /* The same pipeline runs to the end afterwards: steps 0, 1, 2 and the final 3 of 3. */
        Record full = {.cancel_at = 1000};
        t.progress_user = &full;
        s = ldm_txt2img(p, &t, &im);
        show("txt2img not cancelled", &full);
        check(s == LDM_OK && im != NULL, "the pipeline still runs after a cancel");
        check(full.calls == 4 && full.steps[3] == 3 && full.totals[3] == 3, "steps 0..3 of 3");
        check(ldm_last_error()[0] == '\0', "no error after success");
        ldm_images_free(im);

        /* PNDM with 4 steps makes 13 model calls: total_steps counts them. */
        Record pndm = {.cancel_at = 1000};
        t.progress_user = &pndm;
        t.steps = 4;
        t.scheduler = "pndm";
        s = ldm_txt2img(p, &t, &im);
        show("txt2img pndm", &pndm);
        check(s == LDM_OK && pndm.calls == 14 && pndm.totals[0] == 13, "pndm: 13 model calls reported");
        ldm_images_free(im);

        /* Super-resolution cancelled before its first model call. */
        static unsigned char rgb[32 * 32 * 3];
        LdmSuperResParams sp = ldm_superres_params_default();
        sp.rgb = rgb;
        sp.width = sp.height = 32;
        sp.steps = 3;
        sp.progress = on_progress;
        Record sr0 = {.cancel_at = 0};
        sp.progress_user = &sr0;
        im = (LdmImages *)1;
        s = ldm_superres(sr, &sp, &im);
        show("superres cancelled at step 0", &sr0);
        check(s == LDM_CANCELLED && im == NULL && sr0.calls == 1, "superres returns LDM_CANCELLED after one call");

        ldm_pipeline_free(p);
        ldm_pipeline_free(sr);
    }
    printf("%d failure(s)\n", failures);
    return failures ? 1 : 0;
}
